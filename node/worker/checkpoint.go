package worker

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/pipeswarm/pipeswarm/node/ckpt"
	"github.com/pipeswarm/pipeswarm/node/stage"
	"github.com/pipeswarm/pipeswarm/node/train"
)

func (w *Worker) checkpointPath() string {
	return ckpt.PairAt(w.dir, ckpt.Base(w.idx, w.rep, w.sp.Pipeline.Replicas)).Weights
}

// checkpointHeld is checkpointPath if a checkpoint is there, "" otherwise (a stage
// stopped before it wrote one).
func (w *Worker) checkpointHeld() string {
	if _, err := os.Stat(w.checkpointPath()); err != nil {
		return ""
	}
	return w.checkpointPath()
}

// checkpoint writes the stage's tensors (global layer names), the spec and the step.
// It runs only while the compute goroutine is idle or stopped.
func (w *Worker) checkpoint() error {
	if err := w.writeCheckpoint(); err != nil {
		return fmt.Errorf("%w at step %d in %s: %w", ErrCheckpointWrite, w.doneStep, w.dir, err)
	}
	// A long run keeps its launcher record fresh: a node restarted days into it
	// still dials its launcher (see relaunchWindow).
	now := time.Now() // a file's time, read by other processes: the wall clock
	_ = os.Chtimes(filepath.Join(w.dir, ckpt.LauncherFile), now, now)
	return nil
}

// ErrCheckpointWrite is wrapped by the error of a stage whose checkpoint could not be
// written (a full disk, an I/O error): the run stops with that reason, as waiting
// for the node would not help.
var ErrCheckpointWrite = errors.New("could not write its checkpoint")

func (w *Worker) writeCheckpoint() error {
	if err := os.MkdirAll(w.dir, 0o755); err != nil {
		return err
	}
	base := ckpt.Base(w.idx, w.rep, w.sp.Pipeline.Replicas)
	pair := ckpt.PairAt(w.dir, base)
	meta := map[string]string{train.MetaSpec: w.sp.String(), train.MetaStep: strconv.Itoa(w.doneStep),
		ckpt.MetaStage: strconv.Itoa(w.idx), ckpt.MetaReplica: strconv.Itoa(w.rep)}
	// Whole only if no optimiser step has run since the step's end was recorded (a
	// stage stopped between its optimiser step and its outer step is not).
	whole := w.doneStep == w.ckStep
	if whole {
		meta[ckpt.MetaResumable] = "1"
	}
	if d := w.plan.Data; d != nil && d.TokenizerSHA256 != "" {
		meta[ckpt.MetaTokenizer] = d.TokenizerSHA256
	}
	if err := ckpt.Rotate(w.dir, base, w.doneStep, whole); err != nil {
		return err
	}
	// Where the data stream was at the step's end; the unit saves the boundaries'
	// residuals of then (stepTaken marked them).
	if w.ckSampler != nil {
		meta[stage.MetaSampler] = hex.EncodeToString(w.ckSampler)
	}
	return w.unit.Save(stage.Paths(pair), meta)
}
