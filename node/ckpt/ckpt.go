// Package ckpt is where a stage's checkpoints live on disk, and what a run directory
// on a node holds besides them.
//
// A stage keeps its checkpoints in its run directory: the newest under the stage's
// name (Base), and older ones beside it with ".step-N" in the name, as many as a
// resumed run may need: every one since the newest step the launcher has recorded
// every metrics row of (it says so, see Prune). Stages checkpoint the same steps
// (core.Checkpoints) and stop on the same step, so a step every stage holds is
// always among them. Each checkpoint is a Pair of files, the weights and the
// optimiser state; only a pair whose two files agree on a whole step is resumed from
// or offered (HeldIn).
package ckpt

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/pipeswarm/pipeswarm/node/stage"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/shard"
)

// Metadata keys of a stage checkpoint besides train's.
const (
	// MetaResumable is "1" when the checkpoint is a whole step: the parameters, the
	// optimiser state, the data position and the residuals all as of its step's end.
	MetaResumable = "resumable"
	MetaStage     = "stage"
	MetaReplica   = "replica"
	// MetaTokenizer is the plan's tokenizer hash (DataPlan.TokenizerSHA256); absent for
	// bytes. An exported model carries it too.
	MetaTokenizer = "pipeswarm.tokenizer_sha256"
)

// Base is the file name, without extension, of a stage's checkpoint.
func Base(idx, rep, replicas int) string { return stage.Name(idx, rep, replicas) }

// Pair is a checkpoint's two files, the weights and the optimiser state beside
// them, as stage.Unit.Save writes them.
type Pair stage.Paths

// PairAt is the pair of files named base in dir.
func PairAt(dir, base string) Pair { return Pair(stage.At(dir, base)) }

// Pairs are the checkpoints of a stage in dir: the newest, then the older ones
// kept, newest first.
func Pairs(dir, base string) []Pair {
	out := []Pair{PairAt(dir, base)}
	type kept struct {
		step int
		p    Pair
	}
	var ks []kept
	names, _ := filepath.Glob(filepath.Join(dir, base+".step-*.safetensors"))
	for _, n := range names {
		rest := strings.TrimSuffix(strings.TrimPrefix(filepath.Base(n), base+".step-"), ".safetensors")
		if step, err := strconv.Atoi(rest); err == nil {
			ks = append(ks, kept{step, PairAt(dir, fmt.Sprintf("%s.step-%d", base, step))})
		}
	}
	slices.SortFunc(ks, func(a, b kept) int { return b.step - a.step })
	for _, k := range ks {
		out = append(out, k.p)
	}
	return out
}

// ResumableStep is the step a checkpoint pair can resume from, if its two files agree
// on it and say they are a whole step of a run of spec (any spec if spec is "").
func (p Pair) ResumableStep(spec string) (int, error) {
	// Read whole and checked against their checksums: a corrupt file is never offered
	// nor resumed from.
	wm, err := shard.VerifyCheckpoint(p.Weights)
	if err != nil {
		return 0, err
	}
	sm, err := shard.VerifyCheckpoint(p.State)
	if err != nil {
		return 0, err
	}
	switch {
	case wm[stage.MetaStep] != sm[stage.MetaStep]:
		return 0, fmt.Errorf("%s is of step %s, %s of step %s (a crash between the two writes)", p.Weights, wm[stage.MetaStep], p.State, sm[stage.MetaStep])
	case wm[MetaResumable] != "1" || sm[MetaResumable] != "1":
		return 0, fmt.Errorf("%s was written in the middle of a step", p.Weights)
	case spec != "" && wm[stage.MetaSpec] != spec:
		return 0, fmt.Errorf("%s was written by a run of another spec", p.Weights)
	}
	return strconv.Atoi(wm[stage.MetaStep])
}

// Find is the checkpoint named base in dir that a run of spec can resume from at
// step, or an error saying what each one found is instead.
func Find(dir, base, spec string, step int) (Pair, error) {
	var why []string
	for _, p := range Pairs(dir, base) {
		s, err := p.ResumableStep(spec)
		if err == nil && s == step {
			return p, nil
		}
		if err != nil {
			why = append(why, err.Error())
		} else {
			why = append(why, fmt.Sprintf("%s is of step %d", p.Weights, s))
		}
	}
	return Pair{}, fmt.Errorf("no checkpoint of %s at step %d here: %s", base, step, strings.Join(why, "; "))
}

// Rotate makes room for a new checkpoint of step (whole, or written mid-step): the
// newest, if it is a whole step other than the one a whole one replaces, is kept
// under its step's name. A checkpoint written mid-step never replaces a whole one.
func Rotate(dir, base string, step int, whole bool) error {
	newest := PairAt(dir, base)
	have, err := newest.ResumableStep("")
	if err != nil || (whole && have == step) {
		return nil
	}
	to := PairAt(dir, fmt.Sprintf("%s.step-%d", base, have))
	for _, mv := range [][2]string{{newest.Weights, to.Weights}, {newest.State, to.State}} {
		if err := os.Rename(mv[0], mv[1]); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("keeping the previous checkpoint: %w", err)
		}
	}
	return nil
}

// Prune removes the stage's kept checkpoints older than step, once it holds step:
// the launcher has recorded every metrics row up to step, which every stage
// checkpointed, so a resumed run never goes back further.
func Prune(dir, base string, step int) (removed int) {
	ps := Pairs(dir, base)
	holds := false
	for _, p := range ps {
		if s, err := p.ResumableStep(""); err == nil && s == step {
			holds = true
		}
	}
	if !holds {
		return 0
	}
	for _, p := range ps[1:] {
		if s, err := p.ResumableStep(""); err == nil && s < step {
			if os.Remove(p.Weights) == nil {
				removed++
			}
			_ = os.Remove(p.State)
		}
	}
	return removed
}

// HeldIn lists the resumable stage checkpoints of a run of spec in runDir; each
// corrupt file found is logged on log, by name, and left out.
func HeldIn(runDir, spec string, stages, replicas int, log *slog.Logger) []wire.Held {
	var out []wire.Held
	for s := range stages {
		for r := range replicas {
			h := wire.Held{Stage: s, Replica: r}
			for _, p := range Pairs(runDir, Base(s, r, replicas)) {
				step, err := p.ResumableStep(spec)
				if errors.Is(err, shard.ErrCorrupt) {
					log.Error("corrupt checkpoint: not offered for resuming", "err", err)
				}
				if err == nil && !slices.Contains(h.Steps, step) {
					h.Steps = append(h.Steps, step)
				}
			}
			if len(h.Steps) > 0 {
				slices.Sort(h.Steps)
				slices.Reverse(h.Steps)
				out = append(out, h)
			}
		}
	}
	return out
}

// LauncherFile, in a run's directory on a node, says who launched the run and where
// it listened, so that a node that restarts can let the launcher know it is back.
const LauncherFile = "launcher.json"
