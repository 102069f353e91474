package train

import (
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/p2p/reduce"
	"github.com/pipeswarm/pipeswarm/shard"
)

// syncer takes the outer steps of a replicated run in one process exactly as the
// swarm takes them: per stage, per fragment due, the same contributions, the same
// all-reduce arithmetic (reduce.Reference), the same order; with Streaming DiLoCo the
// same overlap, an outer step begun after one inner step and applied after the next.
type syncer struct {
	sp      *spec.Spec
	reps    []*replica
	pending []begun // overlapped outer steps to apply after the next inner step
}

// begun is an overlapped outer step of fragment f of stage s whose all-reduce is done.
type begun struct {
	s, f int
	ys   [][]float32 // per replica: the Outer's scratch, untouched until applied
	own  [][]float32
	avg  []float32
	sent []int64
}

func newSyncer(sp *spec.Spec, reps []*replica) *syncer {
	return &syncer{sp: sp, reps: reps}
}

// step takes the outer-step work after inner step step (applying what the step before
// began, then the outer steps due now) and returns one row per (stage, replica) that
// applied an outer step.
func (y *syncer) step(step, steps int, now func() time.Time) []metrics.Outer {
	S, R := len(y.reps[0].outers), len(y.reps)
	sent := make([][]int64, S)
	took := make([]float64, S)
	applied := make([]bool, S)
	for s := range sent {
		sent[s] = make([]int64, R)
	}
	for _, p := range y.pending {
		for r, rp := range y.reps {
			rp.outers[p.s].Apply(p.f, p.ys[r], p.own[r], p.avg, rp.m.stages[p.s], true)
			sent[p.s][r] += p.sent[r]
		}
		applied[p.s] = true
	}
	y.pending = y.pending[:0]
	y.begin(step, steps, sent, took, applied, now)
	var out []metrics.Outer
	for s := range S {
		if !applied[s] {
			continue
		}
		for r, rp := range y.reps {
			o := rp.outers[s]
			o.Rounds++
			out = append(out, metrics.Outer{Step: step, OuterStep: o.Rounds, Stage: s, Replica: r, SyncBytes: sent[s][r],
				SyncS: took[s], WeightsHash: o.Hash(), Contributors: R})
		}
	}
	return out
}

// begin takes the outer steps due after step: overlapped ones are all-reduced now and
// left pending, the others applied (marked in applied, their bytes added to sent).
func (y *syncer) begin(step, steps int, sent [][]int64, took []float64, applied []bool, now func() time.Time) {
	d := y.sp.DiLoCo
	S, R := len(y.reps[0].outers), len(y.reps)
	overlap := d.Overlapped() && step != steps
	for s := range S {
		t0 := now()
		for f := range d.Fragments {
			if !d.Due(f, step, steps) {
				continue
			}
			ys := make([][]float32, R)
			for r, rp := range y.reps {
				if overlap {
					ys[r] = rp.outers[s].Begin(f, rp.m.stages[s].Params)
				} else {
					ys[r] = rp.outers[s].Contribution(f, rp.m.stages[s].Params)
				}
			}
			avg, own, bytes := reduce.Reference(y.reps[0].outers[s].Codec, ys)
			if overlap {
				y.pending = append(y.pending, begun{s: s, f: f, ys: ys, own: own, avg: avg, sent: bytes})
				continue
			}
			for r, rp := range y.reps {
				rp.outers[s].Apply(f, ys[r], own[r], avg, rp.m.stages[s], false)
				sent[s][r] += bytes[r]
			}
			applied[s] = true
		}
		took[s] = now().Sub(t0).Seconds()
	}
}

// resumeAfter restores what a run stopped after step had in flight: overlapped outer
// steps begun after it, begun again from the same state (the checkpoint holds the
// weights, residuals and momentum as they were when they began), so they give the
// same results.
func (y *syncer) resumeAfter(step, steps int) {
	d := y.sp.DiLoCo
	if !d.Overlapped() || step == steps || !d.AnyDue(step, steps) {
		return
	}
	S, R := len(y.reps[0].outers), len(y.reps)
	sent, took, applied := make([][]int64, S), make([]float64, S), make([]bool, S)
	for s := range sent {
		sent[s] = make([]int64, R)
	}
	y.begin(step, steps, sent, took, applied, time.Now)
}

// saveState writes what model.safetensors does not hold and a resumed run needs: per
// replica its weights, AdamW moments and step, data sampler position and boundary
// error-feedback residuals, and with replicas per stage the global weights and outer
// momentum and per replica the pseudo-gradient residual and Begin's snapshot.
func saveState(path string, meta map[string]string, reps []*replica) error {
	m := map[string]string{}
	for k, v := range meta {
		m[k] = v
	}
	var ts []shard.Named
	add := func(name string, data []float32) {
		if data != nil {
			ts = append(ts, shard.Named{Name: name, Data: data})
		}
	}
	for s, o := range reps[0].outers {
		add(stateName(s, -1, "global"), o.Global)
		add(stateName(s, -1, "outer_momentum"), o.Momentum())
		m[stateName(s, -1, "outer_steps")] = strconv.Itoa(o.Rounds)
	}
	for r, rp := range reps {
		for s, st := range rp.m.stages {
			add(stateName(s, r, "params"), st.Params)
			mo, vo := rp.m.opts[s].Moments()
			add(stateName(s, r, "adam_m"), mo)
			add(stateName(s, r, "adam_v"), vo)
			m[stateName(s, r, "adam_step")] = strconv.Itoa(rp.m.opts[s].StepCount())
		}
		for s, o := range rp.outers {
			add(stateName(s, r, "ef_residual"), o.Residual())
			add(stateName(s, r, "base"), o.Base())
		}
		for b, bd := range rp.m.bounds {
			add(replicaName(r, "boundary."+strconv.Itoa(b)+".ef_residual"), bd.Residual())
		}
		st, err := rp.sampler.State()
		if err != nil {
			return err
		}
		m[replicaName(r, "sampler")] = hex.EncodeToString(st)
	}
	return shard.SaveTensors(path, m, ts)
}

// loadState restores a run from saveState's file; reps must be fresh replicas of the
// same spec.
func loadState(path string, reps []*replica) (*shard.Checkpoint, error) {
	ck, err := shard.LoadSealed(path)
	if err != nil {
		return nil, err
	}
	get := func(name string, dst []float32) error {
		t, ok := ck.Tensors[name]
		if !ok {
			return fmt.Errorf("train: resume: %s has no %s", path, name)
		}
		if len(t.Data) != len(dst) {
			return fmt.Errorf("train: resume: %s: %s has %d values, want %d", path, name, len(t.Data), len(dst))
		}
		copy(dst, t.Data)
		return nil
	}
	getInt := func(key string) (int, error) {
		v, err := strconv.Atoi(ck.Metadata[key])
		if err != nil {
			return 0, fmt.Errorf("train: resume: %s: metadata %s: %w", path, key, err)
		}
		return v, nil
	}
	for r, rp := range reps {
		for s, st := range rp.m.stages {
			if err := get(stateName(s, r, "params"), st.Params); err != nil {
				return nil, err
			}
			mo, vo := make([]float32, len(st.Params)), make([]float32, len(st.Params))
			if err := errors.Join(get(stateName(s, r, "adam_m"), mo), get(stateName(s, r, "adam_v"), vo)); err != nil {
				return nil, err
			}
			n, err := getInt(stateName(s, r, "adam_step"))
			if err != nil {
				return nil, err
			}
			if err := rp.m.opts[s].SetState(n, mo, vo); err != nil {
				return nil, err
			}
		}
		for s, o := range rp.outers {
			n, err := getInt(stateName(s, -1, "outer_steps"))
			if err != nil {
				return nil, err
			}
			o.Rounds = n
			if err := errors.Join(get(stateName(s, -1, "global"), o.Global), get(stateName(s, -1, "outer_momentum"), o.Momentum()),
				get(stateName(s, r, "base"), o.Base())); err != nil {
				return nil, err
			}
			if res := o.Residual(); res != nil {
				if err := get(stateName(s, r, "ef_residual"), res); err != nil {
					return nil, err
				}
			}
		}
		for b, bd := range rp.m.bounds {
			if t, ok := ck.Tensors[replicaName(r, "boundary."+strconv.Itoa(b)+".ef_residual")]; ok {
				bd.SetResidual(t.Data)
			}
		}
		st, err := hex.DecodeString(ck.Metadata[replicaName(r, "sampler")])
		if err == nil {
			err = rp.sampler.SetState(st)
		}
		if err != nil {
			return nil, fmt.Errorf("train: resume: %s: replica %d's sampler: %w", path, r, err)
		}
	}
	return ck, nil
}

func replicaName(r int, name string) string { return "replica." + strconv.Itoa(r) + "." + name }

// stateName names a state tensor: "stage.S.NAME" for one shared by the replicas of a
// stage (r < 0), "stage.S.replica.R.NAME" otherwise.
func stateName(s, r int, name string) string {
	if r < 0 {
		return "stage." + strconv.Itoa(s) + "." + name
	}
	return "stage." + strconv.Itoa(s) + ".replica." + strconv.Itoa(r) + "." + name
}
