package launcher

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p/clock"
)

// watch turns reports into metrics until every stage of every replica pipeline still
// whole is done. With one replica any failure ends the run; with several, a failed or
// lost stage breaks its replica pipeline (its other stages are told to go idle) and the
// run goes on while one pipeline is whole. Every outer step's weight hashes must agree
// across the replicas of a stage, or the run fails.
func watch(ctx context.Context, o Options, log *slog.Logger, plan *wire.Plan, reports <-chan wire.Report, lost <-chan peer.ID,
	abort func(string), idle func(int, string), up func(stage, replica int) bool, rj rejoiner, tell stageOrders) (*Result, error) {
	sp := o.Spec
	out := o.OutDir
	S, R := sp.Pipeline.Stages, sp.Pipeline.Replicas
	o.Clock = clock.Or(o.Clock)
	if err := os.WriteFile(filepath.Join(out, train.SpecFile), []byte(sp.String()), 0o644); err != nil {
		return nil, fmt.Errorf("launch: %w", err)
	}
	// A resumed run keeps the rows of the steps it continues from, and only those.
	var kept *keptRows
	if plan.Resume != nil {
		var err error
		if kept, err = readKeptRows(filepath.Join(out, train.MetricsFile), plan.Resume.Step); err != nil {
			return nil, err
		}
	}
	mw, err := metrics.Create(filepath.Join(out, train.MetricsFile))
	if err != nil {
		return nil, err
	}
	defer mw.Close()
	pending := map[int]*metrics.Step{} // replica 0's steps whose evaluation is still to come
	// A run that ends with a step's evaluation still to come records the step without
	// it: every stage holds that step's checkpoint (stages stop right after a step), and
	// a resumed run evaluates it again first (core.Config.EvalFrom) and fills it in.
	defer func() {
		for _, step := range slices.Sorted(maps.Keys(pending)) {
			if err := mw.Write(*pending[step]); err != nil {
				log.Warn("a step's row was not recorded", "step", step, "err", err)
			}
		}
	}()
	if kept != nil {
		for _, row := range kept.rows {
			if st, ok := evalRow(row, plan.Resume.Step, sp); ok {
				pending[st.Step] = st // written with its validation loss, evaluated again
				continue
			}
			if err := mw.WriteRaw(row); err != nil {
				return nil, err
			}
		}
	}
	res := newResult(plan.ID, S, R)
	var history []metrics.Step
	start := o.Clock.Now()
	began := start
	// However the run ends, its times are known.
	defer func() {
		res.Elapsed, res.TimeRun = o.Clock.Since(start), o.Clock.Since(began)
	}()
	if kept != nil {
		// Tokens and elapsed time go on from where the interrupted run left them.
		res.Tokens, res.Steps, res.FromStep = kept.tokens, plan.Resume.Step, plan.Resume.Step
		start = start.Add(-time.Duration(kept.elapsedS * float64(time.Second)))
		for _, s := range kept.steps {
			if (s.Replica == nil || *s.Replica == 0) && pending[s.Step] == nil {
				history = append(history, s)
			}
		}
	}
	last := make([]time.Time, R)
	for r := range last {
		last[r] = o.Clock.Now()
	}
	// Checkpoints: the count rule's steps and the time rule's, ordered here, are taken
	// by every stage; once every row up to one is recorded, the stages are told, and
	// keep no older checkpoint.
	partStart := o.Clock.Now()
	align := 1
	if R > 1 {
		align = sp.DiLoCo.InnerSteps
	}
	ckClock := core.CheckpointClock{Every: time.Duration(sp.CheckpointSeconds) * time.Second, Interval: sp.CheckpointInterval,
		Align: align, Last: sp.Train.Steps, Lead: time.Second}
	commonCk := map[int]bool{} // steps of orders every cell took
	ckAcked := make(chan int, 16)
	rowsIn := map[int]bool{} // replica 0's rows recorded past through
	through, toldRecorded := 0, 0
	if plan.Resume != nil {
		through, toldRecorded = plan.Resume.Step, plan.Resume.Step
	}
	latest := map[int]int{}   // replica > 0 -> its last row recorded
	var recordedTo func() int // set once the broken pipelines are known, below
	// tellRecorded tells the stages the newest common checkpoint step whose rows are
	// all recorded (as recordedThrough will read them): replica 0's through, and no
	// later than any other replica whose pipeline is whole has got.
	recordedAll := func(live func(r int) bool) int {
		n := through
		for r, l := range latest {
			if live(r) {
				n = min(n, l)
			}
		}
		return n
	}
	tellRecorded := func() {
		upTo := recordedTo()
		c := 0
		if sp.CheckpointInterval > 0 {
			c = upTo / sp.CheckpointInterval * sp.CheckpointInterval
		}
		for k := range commonCk {
			if k <= upTo {
				c = max(c, k)
			}
		}
		if c > toldRecorded && tell.recorded != nil {
			toldRecorded = c
			tell.recorded(c)
		}
	}
	// Stopping: a node stopping gracefully said after which step; the other stages of
	// its pipeline were told to stop after it too, and the pipeline is taken out once
	// every stage has stopped (or stopWait has passed).
	type stopState struct {
		step    int
		why     string
		since   time.Time
		stopped map[int]bool
	}
	stopping := map[int]*stopState{}
	done := map[[2]int]bool{}
	broken := map[int]string{}
	trained := make([]int, R)              // steps each replica pipeline reported in this part of the run
	brokeWhy := map[int]string{}           // why each pipeline last broke, kept when it rejoins
	hashes := map[[2]int]string{}          // (stage, step) -> the first replica's global weights hash
	outers := map[[2]int][]metrics.Outer{} // (stage, step) -> rows so far
	lagging := map[int]bool{}              // replica pipelines left behind by an outer step, still connected
	// Rejoining: a broken pipeline whose nodes are all reachable again is brought back
	// at the next outer step every stage has taken; reports of a pipeline's earlier
	// incarnation (its join nonce) are ignored.
	epoch := make([]uint64, R)
	joinedAt := make([]int, R) // the outer step after which a pipeline rejoined
	wantJoin := map[int]bool{}
	back := make(chan int, R)
	stageSynced := map[[2]int]bool{} // (stage, step) whose live replicas have all reported the outer step
	synced := map[int]int{}          // step -> stages whose outer step is complete
	rejoinable := R > 1 && sp.DiLoCo.Fragments == 1 && rj.reach != nil
	stopProbes := make(chan struct{})
	defer close(stopProbes)
	probe := func(r int) {
		go func() {
			for {
				select {
				case <-ctx.Done():
					return
				case <-stopProbes:
					return
				case <-o.Clock.After(2 * time.Second):
				}
				if rj.reach(r) {
					select {
					case back <- r:
					case <-stopProbes:
					}
					return
				}
			}
		}()
	}
	recordedTo = func() int {
		return recordedAll(func(r int) bool { _, b := broken[r]; return !b && !lagging[r] })
	}
	emit := func(s metrics.Step) error {
		if err := mw.Write(s); err != nil {
			return err
		}
		if o.OnStep != nil {
			o.OnStep(s)
		}
		if s.Replica != nil && *s.Replica > 0 {
			latest[*s.Replica] = max(latest[*s.Replica], s.Step)
			tellRecorded()
		}
		if s.Replica == nil || *s.Replica == 0 {
			history = append(history, s) // the plot follows replica 0, which also carries validation
			rowsIn[s.Step] = true
			for rowsIn[through+1] {
				through++
				delete(rowsIn, through)
			}
			tellRecorded()
		}
		return nil
	}
	plot := func() {
		if len(history) > 0 {
			if err := metrics.PlotLoss(filepath.Join(out, train.PlotFile), sp.Name, history); err != nil {
				log.Warn("no loss plot", "err", err)
			}
		}
	}
	evalDue := func(step int) bool { return core.EvalAt(step, sp.Train.Steps, sp.EvalInterval) }
	// breakPipeline takes replica pipeline r out of the run, or fails the run when it
	// was the last one whole (or there is only one).
	breakPipeline := func(r int, why string) error {
		if _, ok := broken[r]; ok {
			return nil
		}
		if R == 1 || len(broken)+1 == R {
			abort(why)
			plot()
			return fmt.Errorf("%w: %w: %s", ErrRunFailed, ErrStageDown, why)
		}
		broken[r], brokeWhy[r] = why, why
		res.Broken = append(res.Broken, r)
		if rj.broke != nil {
			rj.broke(r, true)
		}
		log.Warn("replica pipeline broken; the run goes on without it", "replica", r, "reason", why, "whole", R-len(broken))
		idle(r, why)
		if rejoinable {
			probe(r)
		}
		return nil
	}
	// stopped notes that cell (stage, r) has stopped; if its pipeline is stopping it
	// reports whether every stage of it has (then the pipeline is out).
	stopped := func(stage, r int) (handled bool, err error) {
		st, ok := stopping[r]
		if !ok {
			return false, nil
		}
		st.stopped[stage] = true
		if len(st.stopped) == S {
			delete(stopping, r)
			return true, breakPipeline(r, st.why)
		}
		return true, nil
	}
	remaining := func() int {
		n := 0
		for r := range R {
			if _, ok := broken[r]; ok || lagging[r] {
				continue
			}
			for s := range S {
				if !done[[2]int{s, r}] {
					n++
				}
			}
		}
		return n
	}
	// The launcher's own deadline, a last resort behind the stages' (which name the
	// stage that stalled): no report at all for much longer than the steps have taken.
	var silence silenceClock
	silence.staff = time.Duration(sp.Pipeline.StaffTimeout) * time.Second
	silence.heard(o.Clock.Now(), false)
	check := o.Clock.NewTicker(time.Second)
	defer check.Stop()
	// nodeLost takes the news that node id's connection closed.
	nodeLost := func(id peer.ID) error {
		a := cellOf(plan, id)
		if a == nil || done[[2]int{a.Stage, a.Replica}] {
			return nil
		}
		if _, ok := broken[a.Replica]; ok {
			return nil
		}
		if handled, err := stopped(a.Stage, a.Replica); handled {
			return err
		}
		return breakPipeline(a.Replica, fmt.Sprintf("the node holding %s (%s) disconnected", wire.CellName(sp, *a), id))
	}
	// A node's reports are queued before it has their replies, hence before its
	// connection can close: a lost node waits here until the reports queued when it was
	// lost are taken, so that its last ones (the step it stopped after) count first.
	type lostNode struct {
		id    peer.ID
		after int // reports still to take before it
	}
	var gone []lostNode
	for remaining() > 0 {
		if len(gone) > 0 && gone[0].after <= 0 {
			id := gone[0].id
			gone = gone[1:]
			if err := nodeLost(id); err != nil {
				return res, err
			}
			continue
		}
		select {
		case <-ctx.Done():
			abort("launcher interrupted")
			plot()
			return res, ctx.Err()
		case r := <-back:
			if _, ok := broken[r]; ok {
				wantJoin[r] = true
				log.Info("the nodes of a broken replica pipeline are reachable again; it rejoins at the next outer step", "replica", r)
			}
		case at := <-ckAcked:
			commonCk[at] = true
			tellRecorded()
		case now := <-check.C():
			for r, st := range stopping {
				if now.Sub(st.since) > stopWait {
					delete(stopping, r)
					if err := breakPipeline(r, st.why+" (not every stage had stopped "+stopWait.String()+" later)"); err != nil {
						return res, err
					}
				}
			}
			if quiet, dl := silence.overdue(now, len(pending) > 0); quiet > 0 {
				why := fmt.Sprintf("no report from any stage for %s (deadline %s, from the steps measured)", quiet.Round(time.Second), dl.Round(time.Second))
				abort(why)
				plot()
				return res, fmt.Errorf("%w: %s", ErrRunFailed, why)
			}
		case id := <-lost:
			gone = append(gone, lostNode{id, len(reports)})
		case r := <-reports:
			for i := range gone {
				gone[i].after--
			}
			a, ok := plan.Cell(r.Stage, r.Replica)
			if !ok || a.Peer != r.Peer || r.Join != epoch[r.Replica] {
				continue // not from the peer holding that cell, or from before it rejoined
			}
			silence.heard(o.Clock.Now(), r.Kind == wire.ReportStep)
			if _, ok := broken[r.Replica]; ok && r.Kind != wire.ReportOuter {
				if r.Kind == wire.ReportIdle || r.Kind == wire.ReportError {
					res.stageEnded(r)
					log.Info("stage of a broken replica pipeline stopped", "stage", r.Stage, "replica", r.Replica, "reason", r.Error)
				}
				continue
			}
			switch r.Kind {
			case wire.ReportStep:
				now := o.Clock.Now()
				if r.Replica == 0 {
					res.Steps, res.Loss = r.Step, r.Loss
					res.StepsRun++
				}
				trained[r.Replica]++
				res.Tokens += int64(sp.TokensPerStep())
				res.TokensRun += int64(sp.TokensPerStep())
				s := metrics.Step{Step: r.Step, Loss: r.Loss, Tokens: res.Tokens, LR: r.LR, GradNorm: r.GradNorm,
					TokensPerS: float64(sp.TokensPerStep()) / now.Sub(last[r.Replica]).Seconds(), ElapsedS: now.Sub(start).Seconds()}
				if R > 1 {
					rep := r.Replica
					s.Replica = &rep
				}
				last[r.Replica] = now
				if r.Replica == 0 {
					var mean time.Duration
					if silence.steps > 0 {
						mean = silence.sum / time.Duration(silence.steps)
					}
					if at, ok := ckClock.Recorded(r.Step, o.Clock.Since(partStart), mean); ok && tell.checkpoint != nil {
						log.Info("checkpoint due by time; every stage takes it at a step ahead", "step", at, "now_at", r.Step)
						tell.checkpoint(at, ckAcked)
					}
				}
				if r.Replica == 0 && evalDue(r.Step) {
					pending[r.Step] = &s
					continue
				}
				if err := emit(s); err != nil {
					return res, err
				}
			case wire.ReportEval:
				p := pending[r.Step]
				if p == nil {
					continue
				}
				v := r.ValLoss
				p.ValLoss, res.ValLoss = &v, v
				// As train does: an evaluated step's time is when its validation loss is known.
				p.ElapsedS = o.Clock.Since(start).Seconds()
				if err := emit(*p); err != nil {
					return res, err
				}
				delete(pending, r.Step)
				last[0] = o.Clock.Now() // evaluation time is not training throughput
			case wire.ReportOuter:
				if r.Outer == nil {
					continue
				}
				k := [2]int{r.Stage, r.Step}
				if r.Outer.Fetched {
					// It fell behind and took the others' newer global state: its hash is of
					// a later outer step than its own step number says.
					if lagging[r.Replica] {
						delete(lagging, r.Replica)
						log.Info("replica pipeline caught up: it fetched the global state", "replica", r.Replica, "stage", r.Stage, "step", r.Step)
					}
				} else if want, ok := hashes[k]; !ok {
					hashes[k] = r.Outer.Hash
				} else if want != r.Outer.Hash {
					why := fmt.Sprintf("stage %d after step %d: replica %d's global weights hash %s, another replica's %s: the replicas diverged",
						r.Stage, r.Step, r.Replica, r.Outer.Hash, want)
					abort("replicas diverged")
					plot()
					return res, fmt.Errorf("%w: %s", ErrRunFailed, why)
				}
				row := metrics.Outer{Step: r.Step, OuterStep: r.Outer.OuterStep, Stage: r.Stage, Replica: r.Replica, SyncBytes: r.Outer.SyncBytes,
					SyncS: r.Outer.SyncS, WeightsHash: r.Outer.Hash, Contributors: r.Outer.Contributors, ElapsedS: o.Clock.Since(start).Seconds()}
				if err := mw.WriteOuter(row); err != nil {
					return res, err
				}
				res.SyncBytes[r.Replica][r.Stage] += r.Outer.SyncBytes
				if r.Stage == 0 && r.Replica == 0 {
					res.OuterSteps++
				}
				if r.Stage == 0 && !stageSynced[k] {
					silence.outer(o.Clock.Now(), time.Duration(r.Outer.SyncS*float64(time.Second)))
				}
				outers[k] = append(outers[k], row)
				complete := len(outers[k]) >= R-len(broken)-len(lagging)
				if o.OnOuter != nil && complete {
					o.OnOuter(outers[k])
					delete(outers, k)
				}
				if complete && !stageSynced[k] {
					stageSynced[k] = true
					synced[r.Step]++
					if synced[r.Step] == S && len(wantJoin) > 0 && r.Step < sp.Train.Steps {
						for _, j := range slices.Sorted(maps.Keys(wantJoin)) {
							nonce, err := rj.join(j, r.Step)
							if err != nil {
								log.Warn("replica pipeline could not rejoin; trying again at the next outer step", "replica", j, "step", r.Step, "err", err)
								continue
							}
							delete(wantJoin, j)
							delete(broken, j)
							if rj.broke != nil {
								rj.broke(j, false)
							}
							delete(lagging, j)
							epoch[j], joinedAt[j] = nonce, r.Step
							for s := range S {
								delete(done, [2]int{s, j})
							}
							res.Rejoined = append(res.Rejoined, j)
							log.Info("replica pipeline rejoined", "replica", j, "after_step", r.Step, "whole", R-len(broken))
						}
					}
				}
				for _, m := range r.Outer.Missing {
					if _, ok := broken[m]; ok || lagging[m] || r.Step <= joinedAt[m] {
						continue // already out, or missing from a step before it rejoined
					}
					if !up(r.Stage, m) {
						if err := breakPipeline(m, fmt.Sprintf("stage %d of replica %d missed the outer step after step %d and is gone", r.Stage, m, r.Step)); err != nil {
							return res, err
						}
						continue
					}
					// Stalled, not gone: if it comes back it fetches the global state and
					// trains on; the others do not wait for it.
					lagging[m] = true
					log.Warn("replica pipeline fell behind; the others go on without waiting", "replica", m, "stage", r.Stage, "step", r.Step)
				}
			case wire.ReportDone:
				done[[2]int{r.Stage, r.Replica}] = true
				if r.Time != nil {
					t := *r.Time
					t.Stage, t.Replica = r.Stage, r.Replica
					res.Times = append(res.Times, t)
				}
				res.stageEnded(r)
			case wire.ReportStopping:
				if _, ok := stopping[r.Replica]; ok {
					continue
				}
				why := fmt.Sprintf("the node holding %s (%s) is stopping; every stage of its pipeline stops after step %d", wire.CellName(sp, a), r.Peer, r.Step)
				log.Warn("a node is stopping: every stage of its pipeline stops after the same step, keeping its checkpoint",
					"cell", wire.CellName(sp, a), "node", r.Peer, "after_step", r.Step)
				stopping[r.Replica] = &stopState{step: r.Step, why: why, since: o.Clock.Now(), stopped: map[int]bool{}}
				if tell.stopAt != nil {
					tell.stopAt(r.Replica, r.Step, fmt.Sprintf("the node holding %s is stopping", wire.CellName(sp, a)))
				}
			case wire.ReportIdle, wire.ReportError:
				res.stageEnded(r)
				if r.Kind == wire.ReportError && r.Diverged {
					// Every replica trains the same way: the run cannot go on.
					abort(r.Error)
					plot()
					return res, fmt.Errorf("%w: %w", ErrRunFailed, &divergedErr{fmt.Sprintf("%s (node %s)", r.Error, r.Peer)})
				}
				if r.Kind == wire.ReportError && r.CheckpointFailed {
					// A node that cannot write its checkpoint cannot keep what it trains;
					// waiting for it would not help.
					abort(fmt.Sprintf("%s could not write its checkpoint", wire.CellName(sp, a)))
					plot()
					return res, fmt.Errorf("%w: %s on %s %s (free space or fix the disk on that node, then continue with launch --resume)",
						ErrRunFailed, wire.CellName(sp, a), r.Peer, r.Error)
				}
				if r.Kind == wire.ReportError && !replicable(r.Error) {
					abort(fmt.Sprintf("stage %d failed", r.Stage))
					plot()
					return res, fmt.Errorf("%w: %s on %s: %s", ErrRunFailed, wire.CellName(sp, a), r.Peer, r.Error)
				}
				if handled, err := stopped(r.Stage, r.Replica); handled {
					if err != nil {
						return res, err
					}
					continue
				}
				if err := breakPipeline(r.Replica, fmt.Sprintf("%s on %s stopped: %s", wire.CellName(sp, a), r.Peer, r.Error)); err != nil {
					return res, err
				}
			}
		}
	}
	// Whatever is still behind when every other pipeline has finished has no one left
	// to sync with.
	for r := range lagging {
		if err := breakPipeline(r, fmt.Sprintf("replica %d fell behind and had not caught up when the others finished", r)); err != nil {
			return res, err
		}
	}
	plot()
	return res, finishedWell(sp, res, trained, brokeWhy)
}

// replicable says whether an error a stage reports is one a replicated run survives by
// dropping that stage's replica pipeline: anything but a run that cannot work at all
// (a bad spec; a divergence is reported as such) — those would fail every replica alike.
func replicable(msg string) bool {
	return !strings.Contains(msg, "refused")
}

// silenceClock measures the time between the reports a launcher gets, and says when
// silence has lasted far longer than that: 10 mean steps or 3 of the longest gap seen
// (which includes evaluations), plus 5 s; before two steps are measured, or while an
// evaluation is under way, at least the staffing timeout.
type silenceClock struct {
	staff          time.Duration
	last, lastStep time.Time
	sum, longest   time.Duration
	steps          int
	// With replicas, an outer step may wait for a replica that is gone: three times
	// the time between outer steps (the all-reduce's own rule), plus what syncs took.
	lastOuter         time.Time
	outerGap, syncMax time.Duration
}

// outer notes an outer step of stage 0 reported.
func (c *silenceClock) outer(now time.Time, sync time.Duration) {
	if !c.lastOuter.IsZero() {
		c.outerGap = max(c.outerGap, now.Sub(c.lastOuter))
	}
	c.lastOuter = now
	c.syncMax = max(c.syncMax, sync)
}

func (c *silenceClock) heard(now time.Time, step bool) {
	if step {
		if !c.lastStep.IsZero() {
			d := now.Sub(c.lastStep)
			c.sum += d
			c.longest = max(c.longest, d)
			c.steps++
		}
		c.lastStep = now
	}
	c.last = now
}

// overdue returns how long it has been silent, if that is past the deadline (also
// returned); 0 otherwise.
func (c *silenceClock) overdue(now time.Time, evaluating bool) (quiet, deadline time.Duration) {
	deadline = 2 * c.staff
	if c.steps >= 2 {
		deadline = clock.Deadline(clock.Outwait(c.sum/time.Duration(c.steps), c.longest)+3*c.outerGap+4*c.syncMax, 0, clock.Busy)
		if evaluating {
			deadline = max(deadline, c.staff)
		}
	}
	if q := now.Sub(c.last); q > deadline {
		return q, deadline
	}
	return 0, deadline
}

// stopWait bounds how long a pipeline whose node is stopping waits for all of its
// stages to stop after the same step before it is taken out regardless.
const stopWait = 15 * time.Second

// stageOrders is how watch tells a run's stages when to checkpoint and stop. Each
// returns at once; the calls go on on their own goroutines.
type stageOrders struct {
	// checkpoint orders every cell to checkpoint at step too; acked is sent step if
	// every cell took the order in time.
	checkpoint func(step int, acked chan<- int)
	// recorded tells every cell that every row up to step, a checkpoint step of every
	// stage, is recorded.
	recorded func(step int)
	// stopAt tells the cells of replica pipeline r to stop after step.
	stopAt func(r, step int, reason string)
}

// rejoiner is how watch brings a broken replica pipeline back: reach connects to its
// nodes, join gives them a signed rejoin plan and starts it (returning its nonce).
type rejoiner struct {
	reach func(r int) bool
	join  func(r, step int) (uint64, error)
	broke func(r int, broken bool) // the watch loop says which pipelines are broken
}
