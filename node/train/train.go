// Package train is the centralised trainer: every stage of a run in one process, in
// order, on one data stream. It is the baseline every distributed run is measured
// against, and the reference its losses must match.
package train

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/shard"
)

// ErrDiverged means the training loss stopped being a finite number.
var ErrDiverged = errors.New("train: loss is not finite")

// Output file names inside a run's directory.
const (
	MetricsFile    = "metrics.jsonl"
	SpecFile       = "spec.yaml"
	CheckpointFile = "model.safetensors"
	HFConfigFile   = "config.json"
	PlotFile       = "loss.png"
)

// Metadata keys a trainer writes into checkpoints.
const (
	MetaSpec = "pipeswarm.spec"
	MetaStep = "pipeswarm.step"
)

// EvalBatch is how many validation windows one forward pass takes; fixed so that the
// trainer and `eval` sum the same numbers in the same order.
const EvalBatch = 16

// Options configure Run.
type Options struct {
	Spec   *spec.Spec
	OutDir string       // created if missing; metrics, spec, checkpoint and plot go here
	Log    *slog.Logger // nil: slog.Default()
	// OnStep, if set, sees every step's record as it is written (progress display).
	OnStep func(metrics.Step)
	Now    func() time.Time // nil: time.Now
}

// Result summarises a finished (or interrupted) run.
type Result struct {
	Steps      int
	Loss       float64 // last training loss
	ValLoss    float64 // last validation loss
	Tokens     int64
	Elapsed    time.Duration
	Checkpoint string
	// Per stage boundary: encoded bytes of the training frames sent forward and back.
	BoundaryFwd, BoundaryBwd []int64
}

// ModelConfig is the shard.Config a spec describes.
func ModelConfig(sp *spec.Spec) shard.Config {
	m := sp.Model
	return shard.Config{Vocab: m.Vocab, DModel: m.DModel, NLayers: m.NLayers, NHeads: m.NHeads,
		DFF: m.DFF, SeqLen: m.SeqLen, RopeTheta: m.RopeTheta, NormEps: float32(m.NormEps)}
}

// Corpus loads the text a run trains on: the file or directory at path, or the
// built-in default when path is empty. name says which, for logs.
func Corpus(path string) (text []byte, name string, err error) {
	if path == "" {
		text, name = data.Builtin()
		return text, name, nil
	}
	text, err = data.Load(path)
	return text, path, err
}

// Run trains sp's model in one process and writes metrics.jsonl, spec.yaml,
// model.safetensors (+ config.json) and loss.png into OutDir. On ctx cancellation it
// stops after the current step, still writes the checkpoint and plot of what it did,
// and returns ctx's error with the partial Result.
func Run(ctx context.Context, o Options) (*Result, error) {
	if o.Spec == nil {
		return nil, errors.New("train: no spec")
	}
	if err := o.Spec.Validate(); err != nil {
		return nil, err
	}
	log := o.Log
	if log == nil {
		log = slog.Default()
	}
	now := o.Now
	if now == nil {
		now = time.Now
	}
	sp := o.Spec
	cfg := ModelConfig(sp)

	text, corpusName, err := Corpus(sp.Data.Path)
	if err != nil {
		return nil, err
	}
	trainText, valText := data.Split(text, sp.Data.ValFraction)
	if data.ValWindows(valText, cfg.SeqLen) == 0 {
		return nil, fmt.Errorf("train: validation split of %d bytes holds no window of seq_len+1 = %d bytes; use more text or a larger data.val_fraction",
			len(valText), cfg.SeqLen+1)
	}
	sampler, err := data.NewSampler(trainText, cfg.SeqLen, sp.Seed, 0)
	if err != nil {
		return nil, fmt.Errorf("train: %w", err)
	}

	m, err := newModel(sp)
	if err != nil {
		return nil, err
	}
	log.Info("training", "spec", sp.Name, "corpus", corpusName, "bytes", len(text),
		"train_bytes", len(trainText), "val_bytes", len(valText), "params", m.numParams(),
		"stages", len(m.stages), "steps", sp.Train.Steps, "tokens_per_step", sp.TokensPerStep())

	if err := os.MkdirAll(o.OutDir, 0o755); err != nil {
		return nil, fmt.Errorf("train: %w", err)
	}
	if err := writeRunFiles(o.OutDir, sp, cfg); err != nil {
		return nil, err
	}
	mw, err := metrics.Create(filepath.Join(o.OutDir, MetricsFile))
	if err != nil {
		return nil, err
	}
	defer mw.Close()

	eval := NewEvaluator(m.stages, valText)
	eval.Reuse(m.tapes)
	eval.bounds = m.bounds
	res := &Result{Checkpoint: filepath.Join(o.OutDir, CheckpointFile), ValLoss: math.NaN()}
	var history []metrics.Step
	start := now()
	finish := func(step int) error {
		meta := map[string]string{MetaSpec: sp.String(), MetaStep: strconv.Itoa(step)}
		err := shard.SaveCheckpoint(res.Checkpoint, meta, m.stages...)
		if len(history) > 0 {
			err = errors.Join(err, metrics.PlotLoss(filepath.Join(o.OutDir, PlotFile), sp.Name, history))
		}
		return err
	}

	mb := sp.Train.BatchSize / sp.Pipeline.MicroBatches
	inputs, targets := make([]int32, mb*cfg.SeqLen), make([]int32, mb*cfg.SeqLen)
	for step := 1; step <= sp.Train.Steps; step++ {
		if err := ctx.Err(); err != nil {
			log.Info("interrupted; writing checkpoint", "step", step-1)
			return res, errors.Join(err, finish(step-1))
		}
		t0 := now()
		lr := m.sched.At(step - 1)
		loss, norm := m.step(sampler, inputs, targets, lr, sp.Train.GradClip)
		if math.IsNaN(loss) || math.IsInf(loss, 0) {
			return res, fmt.Errorf("%w at step %d (loss %g); try a lower train.lr", ErrDiverged, step, loss)
		}
		dt := now().Sub(t0)
		res.Steps, res.Loss = step, loss
		res.Tokens += int64(sp.TokensPerStep())
		rec := metrics.Step{Step: step, Loss: loss, Tokens: res.Tokens, LR: float64(lr), GradNorm: norm,
			TokensPerS: float64(sp.TokensPerStep()) / dt.Seconds(), ElapsedS: now().Sub(start).Seconds()}
		if (sp.EvalInterval > 0 && step%sp.EvalInterval == 0) || step == sp.Train.Steps {
			v := eval.Loss()
			rec.ValLoss, res.ValLoss = &v, v
			log.Info("eval", "step", step, "loss", round4(loss), "val_loss", round4(v),
				"tokens_per_s", int(rec.TokensPerS), "elapsed", time.Duration(rec.ElapsedS*float64(time.Second)).Round(time.Second))
			rec.ElapsedS = now().Sub(start).Seconds()
		}
		if err := mw.Write(rec); err != nil {
			return res, err
		}
		history = append(history, rec)
		if o.OnStep != nil {
			o.OnStep(rec)
		}
		if rec.ValLoss != nil && step != sp.Train.Steps {
			// A checkpoint at every evaluation bounds what a crash can lose.
			if err := finish(step); err != nil {
				return res, err
			}
		}
	}
	res.Elapsed = now().Sub(start)
	for _, b := range m.bounds {
		res.BoundaryFwd, res.BoundaryBwd = append(res.BoundaryFwd, b.BytesFwd), append(res.BoundaryBwd, b.BytesBwd)
	}
	if err := finish(res.Steps); err != nil {
		return res, err
	}
	return res, nil
}

func round4(x float64) float64 { return math.Round(x*1e4) / 1e4 }

func writeRunFiles(dir string, sp *spec.Spec, cfg shard.Config) error {
	hf, err := shard.HFConfig(cfg)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, HFConfigFile), hf, 0o644); err != nil {
		return fmt.Errorf("train: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, SpecFile), []byte(sp.String()), 0o644); err != nil {
		return fmt.Errorf("train: %w", err)
	}
	return nil
}
