package worker

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"slices"
	"sync"
	"time"

	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/clock"
	"github.com/pipeswarm/pipeswarm/p2p/reduce"
)

type fetchedState struct {
	round uint64
	vecs  [][]float32
}

// servedState is the stage's global weights and outer momentum as of the last outer
// step, and this replica's AdamW moments then, copied for the all-reduce group to
// serve to a replica that fell behind or joins.
// The previous outer step's state is kept too: a replica pipeline rejoining at an
// outer step asks for that one, which the others may have moved past while it started.
type servedState struct {
	mu    sync.Mutex
	slots [2]servedSlot
	cur   int
}

type servedSlot struct {
	round uint64
	vecs  [][]float32
	set   bool
}

func (s *servedState) set(round uint64, vecs ...[]float32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	next := &s.slots[1-s.cur]
	if len(next.vecs) != len(vecs) {
		next.vecs = make([][]float32, len(vecs))
		for i, v := range vecs {
			next.vecs[i] = make([]float32, len(v))
		}
	}
	for i, v := range vecs {
		copy(next.vecs[i], v)
	}
	next.round, next.set = round, true
	s.cur = 1 - s.cur
}

// get returns the state as of round want if held (want 0, or not held: the latest).
func (s *servedState) get(want uint64) (uint64, [][]float32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sl := &s.slots[s.cur]
	if p := &s.slots[1-s.cur]; want != 0 && p.set && p.round == want {
		sl = p
	}
	out := make([][]float32, len(sl.vecs))
	for i, v := range sl.vecs {
		out[i] = append([]float32(nil), v...)
	}
	return sl.round, out
}

// startReduce takes this replica's contributions to the outer step after a.Step on
// a.Frags, with compute idle, and all-reduces them on another goroutine, so the loop
// keeps taking frames (and, overlapped, the next step runs meanwhile); the core hears
// ReduceDone when they are done and asks for ApplyOuter.
func (w *Worker) startReduce(a core.StartReduce) {
	e := &syncDone{step: a.Step, overlapped: a.Overlap, frags: a.Frags}
	for _, f := range a.Frags {
		// Fragments are disjoint parts of the Outer's scratch, untouched until applied.
		if a.Overlap {
			e.ys = append(e.ys, w.outer.Begin(f, w.stage.Params))
		} else {
			e.ys = append(e.ys, w.outer.Contribution(f, w.stage.Params))
		}
	}
	w.syncStart = w.clock.Now()
	w.reduces[a.Step] = e
	w.runReduce(e)
}

// runReduce all-reduces e's contributions on its own goroutine and posts e back.
func (w *Worker) runReduce(e *syncDone) {
	d := w.sp.DiLoCo
	// A replica still computing its inner steps is waited for up to three times what
	// this one took since its last sync, or on average between syncs, whichever is
	// longer: replicas share the same work per step, so one slower than that is stalled
	// or dead. It is left behind and fetches the result if it comes back.
	span := w.syncStart.Sub(w.lastSync)
	mean := w.syncStart.Sub(w.started0) / time.Duration(w.syncs+1)
	arrive := 3 * max(span, mean)
	w.outerAllow = arrive + 4*w.syncTook + time.Second
	go func() {
		w.connectReplicas()
		var results []*reduce.Result
		var fetched *fetchedState
		var err error
		for i, f := range e.frags {
			round := uint64(e.step)*uint64(d.Fragments) + uint64(f)
			var res *reduce.Result
			res, err = w.group.AllReduce(w.ctx, round, e.ys[i], arrive)
			if errors.Is(err, reduce.ErrBehind) {
				w.log.Warn("fell behind the other replicas; fetching the stage's global state", "step", e.step)
				if fetched, err = w.fetchState(e.step, arrive); err == nil {
					break
				}
			}
			if err != nil {
				err = fmt.Errorf("outer step after step %d: %w", e.step, err)
				break
			}
			results = append(results, res)
		}
		w.post(reduceDone{e: e, results: results, fetched: fetched, err: err})
	}()
}

// reduced keeps a finished all-reduce's results for ApplyOuter and tells the core.
func (w *Worker) reduced(r reduceDone) error {
	e := r.e
	e.results, e.fetched, e.err = r.results, r.fetched, r.err
	return w.handle(core.ReduceDone{Step: e.step})
}

// fetchState downloads the stage's global weights and outer momentum from a live
// replica as of the outer step after step: the others may still be finishing it when
// this one learns it was left out, or already be a step further (they keep the one
// before too). A later state would not do: this stage would hold another step's
// weights than the others at this one. It tries for as long as a replica is waited for.
func (w *Worker) fetchState(step int, wait time.Duration) (*fetchedState, error) {
	F := uint64(w.sp.DiLoCo.Fragments)
	want := uint64(step)*F + F - 1
	deadline := w.clock.Now().Add(wait)
	for pause := 50 * time.Millisecond; ; pause = min(2*pause, time.Second) {
		r, vecs, err := w.group.FetchStateAt(w.ctx, want)
		switch {
		case err == nil && r == want:
			return &fetchedState{round: r, vecs: vecs}, nil
		case err == nil && r < want:
			err = fmt.Errorf("the replicas' state is of round %d, before round %d", r, want)
		case err == nil:
			err = fmt.Errorf("the replicas' state is of round %d, past round %d", r, want)
		}
		if w.clock.Now().After(deadline) || w.ctx.Err() != nil {
			return nil, fmt.Errorf("behind the other replicas, and fetching their state failed: %w", err)
		}
		select {
		case <-w.clock.After(pause):
		case <-w.ctx.Done():
		}
	}
}

// connectReplicas makes sure this stage is connected to the other replicas of its
// stage (as the loop last published them; it runs on goroutines of its own): the all-reduce only speaks on connections that exist, so that a member
// whose connection dies is given up at once instead of redialled mid-round.
//
// The dials go in parallel, each given the deadline rule's round trips and
// clock.Brief: a replica that is gone must not hold up the outer step longer than the
// all-reduce would wait for it.
func (w *Worker) connectReplicas() {
	var wg sync.WaitGroup
	for r, id := range *w.replicas.Load() {
		if r == w.rep || p2p.Linked(w.host.Network(), id) {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(w.ctx, clock.Deadline(0, w.host.Peerstore().LatencyEWMA(id), clock.Brief))
			defer cancel()
			// Dialled again until the deadline: replicas left apart by one failed
			// dial would each step alone and drift apart. One whose every address
			// refuses the connection is down: it is left out of this outer step at
			// once, as one not reached by the deadline is.
			if err := w.host.ReachUnlessRefused(ctx, id); err != nil {
				w.log.Warn("cannot reach a replica of this stage", "replica", r, "peer", id, "err", err)
			}
		}()
	}
	wg.Wait()
}

// applyOuter applies the all-reduce begun after a.Step (with compute idle, the core
// waiting for it as for a compute) and adds it to this step's outer report.
func (w *Worker) applyOuter(a core.ApplyOuter) error {
	e := w.reduces[a.Step]
	delete(w.reduces, a.Step)
	if e == nil {
		return fmt.Errorf("outer step: no all-reduce was begun after step %d", a.Step)
	}
	if w.outerRep == nil {
		w.outerRep = &wire.OuterReport{Contributors: w.sp.Pipeline.Replicas}
	}
	if err := w.apply(e, w.outerRep, a.Overlapped); err != nil {
		return err
	}
	return w.handle(core.Done{})
}

// apply applies a finished all-reduce (or the global state fetched instead) to the
// stage and adds it to rep.
func (w *Worker) apply(e *syncDone, rep *wire.OuterReport, overlapped bool) error {
	if e.err != nil {
		return e.err
	}
	rep.SyncS = max(rep.SyncS, w.clock.Since(w.syncStart).Seconds())
	w.syncTook = w.clock.Since(w.syncStart)
	if e.fetched != nil {
		if len(e.fetched.vecs) < 2 || len(e.fetched.vecs[0]) != len(w.outer.Global) || len(e.fetched.vecs[1]) != len(w.outer.Momentum()) {
			return fmt.Errorf("fetched stage state has the wrong shape")
		}
		copy(w.outer.Global, e.fetched.vecs[0])
		copy(w.outer.Momentum(), e.fetched.vecs[1])
		copy(w.stage.Params, w.outer.Global)
		rep.Fetched = true
		return nil
	}
	for i, f := range e.frags {
		res := e.results[i]
		w.outer.Apply(f, e.ys[i], res.Own, res.Avg, w.stage, overlapped)
		rep.SyncBytes += res.Sent
		for _, m := range res.Missing {
			if !slices.Contains(rep.Missing, m) {
				rep.Missing = append(rep.Missing, m)
			}
		}
		for _, c := range res.Chunks {
			rep.Contributors = min(rep.Contributors, bits.OnesCount64(c.Contributors))
		}
	}
	slices.Sort(rep.Missing)
	return nil
}

// finishOuter records the outer step applied after step: the state served to replicas
// that fall behind, the log line and the report to the launcher.
func (w *Worker) finishOuter(step int) {
	rep := w.outerRep
	w.outerRep = nil
	w.outer.Rounds++
	rep.OuterStep, rep.Hash = w.outer.Rounds, w.outer.Hash()
	w.serve(uint64(step)*uint64(w.sp.DiLoCo.Fragments) + uint64(w.sp.DiLoCo.Fragments-1))
	w.lastSync = w.clock.Now()
	w.syncs++
	w.log.Info("outer step", "step", step, "outer_step", rep.OuterStep, "sync_bytes", rep.SyncBytes,
		"sync_s", fmt.Sprintf("%.3f", rep.SyncS), "weights_hash", rep.Hash, "contributors", rep.Contributors, "missing", rep.Missing, "fetched", rep.Fetched)
	w.report(wire.Report{Kind: wire.ReportOuter, Step: step, Outer: rep})
}
