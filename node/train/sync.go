package train

import (
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
	d := y.sp.DiLoCo
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

// saveState writes the optimiser state model.safetensors leaves out: per stage the
// outer momentum (the global weights are model.safetensors' own, as every replica
// holds them after the last outer step), and per replica and stage the AdamW moments
// and step and the error-feedback residual.
func saveState(path string, meta map[string]string, reps []*replica) error {
	var ts []shard.Named
	for s, o := range reps[0].outers {
		ts = append(ts, shard.Named{Name: stateName(s, -1, "outer_momentum"), Data: o.Momentum()})
	}
	m := map[string]string{}
	for k, v := range meta {
		m[k] = v
	}
	for r, rp := range reps {
		for s, o := range rp.outers {
			mo, vo := rp.m.opts[s].Moments()
			ts = append(ts, shard.Named{Name: stateName(s, r, "adam_m"), Data: mo}, shard.Named{Name: stateName(s, r, "adam_v"), Data: vo})
			if res := o.Residual(); res != nil {
				ts = append(ts, shard.Named{Name: stateName(s, r, "ef_residual"), Data: res})
			}
			m[stateName(s, r, "adam_step")] = itoa(rp.m.opts[s].StepCount())
		}
	}
	return shard.SaveTensors(path, m, ts)
}

// stateName names a state tensor: "stage.S.NAME" for one shared by the replicas of a
// stage (r < 0), "stage.S.replica.R.NAME" otherwise.
func stateName(s, r int, name string) string {
	if r < 0 {
		return "stage." + itoa(s) + "." + name
	}
	return "stage." + itoa(s) + ".replica." + itoa(r) + "." + name
}

func itoa(i int) string { return strconv.Itoa(i) }
