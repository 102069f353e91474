package train

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/pipeswarm/pipeswarm/node/ckpt"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/stage"
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
	S, R := len(y.reps[0].outers), len(y.reps)
	frags, overlap := OuterSchedule(y.sp).Begin(step, steps) // as a stage's core begins them
	for s := range S {
		t0 := now()
		// Every due fragment's contributions are taken before any is applied, as a
		// node's stage takes them (its all-reduces start together): applying one
		// fragment projects the whole stage into the subspace.
		contrib := make([][][]float32, 0, len(frags))
		for _, f := range frags {
			ys := make([][]float32, R)
			for r, rp := range y.reps {
				if overlap {
					ys[r] = rp.outers[s].Begin(f, rp.m.stages[s].Params)
				} else {
					ys[r] = rp.outers[s].Contribution(f, rp.m.stages[s].Params)
				}
			}
			contrib = append(contrib, ys)
		}
		for i, f := range frags {
			ys := contrib[i]
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
	if _, overlap := OuterSchedule(y.sp).Begin(step, steps); !overlap {
		return
	}
	S, R := len(y.reps[0].outers), len(y.reps)
	sent, took, applied := make([][]int64, S), make([]float64, S), make([]bool, S)
	for s := range sent {
		sent[s] = make([]int64, R)
	}
	y.begin(step, steps, sent, took, applied, time.Now)
}

// saveState writes every unit's checkpoint of step into dir (stage.Unit.Save), named
// and kept as a launched run's stages keep theirs (node/ckpt): what
// model.safetensors does not hold and a resumed run needs. Each replica's first
// stage also keeps its data position. A unit's previous checkpoint is kept until
// every unit has written this one, so that a crash while writing leaves a step every
// unit holds.
func saveState(dir string, step int, meta map[string]string, reps []*replica) error {
	R := len(reps)
	for r, rp := range reps {
		for s, u := range rp.m.units {
			m := maps.Clone(meta)
			m[ckpt.MetaResumable], m[ckpt.MetaStage], m[ckpt.MetaReplica] = "1", strconv.Itoa(s), strconv.Itoa(r)
			if s == 0 {
				st, err := rp.sampler.State()
				if err != nil {
					return err
				}
				m[stage.MetaSampler] = hex.EncodeToString(st)
			}
			base := ckpt.Base(s, r, R)
			if err := ckpt.Rotate(dir, base, step, true); err != nil {
				return err
			}
			u.Mark()
			if err := u.Save(stage.Paths(ckpt.PairAt(dir, base)), m); err != nil {
				return err
			}
		}
	}
	for r, rp := range reps {
		for s := range rp.m.units {
			ckpt.Prune(dir, ckpt.Base(s, r, R), step)
		}
	}
	return nil
}

// loadState restores into reps, fresh replicas of sp, the newest step of which every
// unit holds a checkpoint in dir (saveState's), and returns that checkpoint's
// metadata, shared by the units.
func loadState(dir string, sp *spec.Spec, reps []*replica) (map[string]string, error) {
	R, S := len(reps), len(reps[0].m.units)
	newest := ckpt.PairAt(dir, ckpt.Base(0, 0, R))
	meta, err := shard.ReadCheckpointMetadata(newest.State)
	if errors.Is(err, fs.ErrNotExist) {
		if _, err := os.Stat(filepath.Join(dir, oldStateFile)); err == nil {
			return nil, fmt.Errorf("train: resume: %s holds the training state of an earlier version of pipeswarm, which this one does not read: "+
				"resume it with that version, or train afresh (--force)", filepath.Join(dir, oldStateFile))
		}
	}
	if err != nil {
		return nil, fmt.Errorf("train: nothing to resume in %s: %w", dir, err)
	}
	if meta[MetaSpec] != sp.String() {
		return nil, fmt.Errorf("train: resume: %s was written by a run of another spec; resume with the spec in %s",
			newest.State, filepath.Join(dir, SpecFile))
	}
	held := ckpt.HeldIn(dir, sp.String(), S, R, slog.Default())
	count := map[int]int{}
	for _, h := range held {
		for _, st := range h.Steps {
			count[st]++
		}
	}
	step := -1
	for st, n := range count {
		if n == S*R && st > step {
			step = st
		}
	}
	if step < 0 {
		return nil, fmt.Errorf("train: nothing to resume in %s: no step of which every stage holds a whole checkpoint", dir)
	}
	for r, rp := range reps {
		for s, u := range rp.m.units {
			p, err := ckpt.Find(dir, ckpt.Base(s, r, R), sp.String(), step)
			if err != nil {
				return nil, fmt.Errorf("train: resume: %w", err)
			}
			m, err := u.Restore(stage.Paths(p))
			if err != nil {
				return nil, fmt.Errorf("train: resume: %w", err)
			}
			if s == 0 && r == 0 {
				meta = m
			}
			if s > 0 {
				continue
			}
			st, err := hex.DecodeString(m[stage.MetaSampler])
			if err == nil {
				err = rp.sampler.SetState(st)
			}
			if err != nil {
				return nil, fmt.Errorf("train: resume: %s: replica %d's sampler: %w", p.State, r, err)
			}
		}
	}
	return meta, nil
}
