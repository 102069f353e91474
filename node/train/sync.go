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
// all-reduce arithmetic (reduce.Reference), the same order.
type syncer struct {
	sp   *spec.Spec
	reps []*replica
	ys   [][]float32
}

func newSyncer(sp *spec.Spec, reps []*replica) *syncer {
	return &syncer{sp: sp, reps: reps, ys: make([][]float32, len(reps))}
}

// step takes the outer steps due after inner step step and returns one row per
// (stage, replica) that synced.
func (y *syncer) step(step, steps int, now func() time.Time) []metrics.Outer {
	var out []metrics.Outer
	d := y.sp.DiLoCo
	for s := range y.reps[0].outers {
		t0 := now()
		sent := make([]int64, len(y.reps))
		due := false
		for f := range d.Fragments {
			if !d.Due(f, step, steps) {
				continue
			}
			due = true
			for r, rp := range y.reps {
				y.ys[r] = rp.outers[s].Contribution(f, rp.m.stages[s].Params)
			}
			avg, own, bytes := reduce.Reference(y.reps[0].outers[s].Codec, y.ys)
			for r, rp := range y.reps {
				rp.outers[s].Apply(f, y.ys[r], own[r], avg, rp.m.stages[s])
				sent[r] += bytes[r]
			}
		}
		if !due {
			continue
		}
		dt := now().Sub(t0).Seconds()
		for r, rp := range y.reps {
			o := rp.outers[s]
			o.Rounds++
			out = append(out, metrics.Outer{Step: step, OuterStep: o.Rounds, Stage: s, Replica: r, SyncBytes: sent[r],
				SyncS: dt, WeightsHash: o.Hash(), Contributors: len(y.reps)})
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
