package worker

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/pipeswarm/pipeswarm/node/ckpt"
	"github.com/pipeswarm/pipeswarm/node/stage"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/shard"
)

// resumeFrom loads into the worker's stage the checkpoint of its cell at step from
// runDir: weights, AdamW moments and step, outer state, residuals and the data
// sampler's position (applied when the data is loaded).
func (w *Worker) resumeFrom(runDir string, step int) error {
	base := ckpt.Base(w.idx, w.rep, w.sp.Pipeline.Replicas)
	pair, err := ckpt.Find(runDir, base, w.sp.String(), step)
	if err != nil {
		return err
	}
	meta, err := w.unit.Restore(stage.Paths(pair))
	if err != nil {
		return err
	}
	if w.outer != nil {
		w.serve(uint64(step)*uint64(w.sp.DiLoCo.Fragments) + uint64(w.sp.DiLoCo.Fragments-1))
	}
	if w.stage.First {
		if w.resumeSampler, err = hex.DecodeString(meta[stage.MetaSampler]); err != nil || len(w.resumeSampler) == 0 {
			return fmt.Errorf("%s: no data sampler position: %v", pair.State, err)
		}
	}
	// The new run's directory starts with the checkpoint it resumed from, so that if
	// this run stops too, even before its first step, it can be resumed in turn.
	if filepath.Clean(runDir) != filepath.Clean(w.dir) {
		if err := os.MkdirAll(w.dir, 0o755); err != nil {
			return err
		}
		to := ckpt.PairAt(w.dir, base)
		if err := errors.Join(shard.CopyCheckpoint(to.Weights, pair.Weights), shard.CopyCheckpoint(to.State, pair.State)); err != nil {
			return fmt.Errorf("keeping the resumed checkpoint: %w", err)
		}
	}
	// Nothing trained yet: stopping now keeps the copy rather than writing a
	// checkpoint without the data position, which is only known once the data loads.
	w.doneStep, w.ckStep, w.stepped = step, step, false
	w.log.Info("resuming from checkpoint", "step", step, "checkpoint", pair.Weights)
	return nil
}

// serve publishes the state a replica that falls behind or joins fetches: the global
// weights and outer momentum as of round, and this replica's AdamW moments.
func (w *Worker) serve(round uint64) {
	m, v := w.unit.Moments()
	w.served.set(round, w.outer.Global, w.outer.Momentum(), m, v)
}

// rejoin brings this stage into a running run as the plan's Join says: it fetches
// the stage's global weights and outer momentum from every live replica at once and
// its update rule's moments from one (AdamW's, or in an async run with train.delay
// nesterov NAdam's; each vector verified by its sha256; see reduce.FetchState), which
// must be as of the outer step after the plan's step, and puts the data sampler where
// this replica's would be. The all-reduce group counts it in from the next round. In
// an async run the fetched weights also stand for the past versions the stage keeps:
// it has no older ones, and its schedule refills from the join on these.
func (w *Worker) rejoin() error {
	j := w.plan.Join
	want := uint64(j.Step)*uint64(w.sp.DiLoCo.Fragments) + uint64(w.sp.DiLoCo.Fragments-1)
	t0 := time.Now()
	w.connectReplicas() // the group fetches over connections that exist
	round, vecs, err := w.group.FetchStateAt(w.ctx, want)
	if err != nil {
		return fmt.Errorf("rejoin: fetching the stage's state: %w", err)
	}
	n := len(w.stage.Params)
	switch {
	case round != want:
		return fmt.Errorf("rejoin: the live replicas are at round %d, the plan's step %d is round %d (they moved on: rejoin at a later step)", round, j.Step, want)
	case len(vecs) != 4 || len(vecs[0]) != n || len(vecs[1]) != n || len(vecs[2]) != n || len(vecs[3]) != n:
		return fmt.Errorf("rejoin: fetched state has the wrong shape (%d vectors)", len(vecs))
	}
	copy(w.outer.Global, vecs[0])
	copy(w.outer.Momentum(), vecs[1])
	copy(w.stage.Params, vecs[0])
	w.unit.FillPast()
	// Every replica has taken as many inner steps: the moments' step count is j.Step.
	if err := w.unit.SetMoments(j.Step, vecs[2], vecs[3]); err != nil {
		return fmt.Errorf("rejoin: %w", err)
	}
	outer := train.OuterSchedule(w.sp)
	for s := 1; s <= j.Step; s++ {
		if outer.Applied(s, w.sp.Train.Steps) {
			w.outer.Rounds++
		}
	}
	w.serve(round)
	if w.sampler != nil {
		// This replica's data stream, where it would be after j.Step steps.
		mb := w.sp.Train.BatchSize / w.sp.Pipeline.MicroBatches
		io := w.slotIO[0]
		for range j.Step * w.sp.Pipeline.MicroBatches {
			w.sampler.Next(io.tokens[:mb*w.stage.Config.SeqLen], io.targets[:mb*w.stage.Config.SeqLen])
		}
	}
	w.doneStep, w.ckStep, w.stepped = j.Step, j.Step, true
	if err := w.stepTaken(j.Step); err != nil {
		return err
	}
	rep := w.group.LastFetch()
	w.log.Info("rejoined: state fetched and verified", "step", j.Step, "round", round, "weights_hash", w.outer.Hash(),
		"replicas", len(rep.Pieces), "pieces_resent", rep.Resent, "took", time.Since(t0).Round(time.Millisecond))
	return nil
}
