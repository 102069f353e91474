// Package train is the centralised trainer: every stage of a run in one process, in
// order, on one data stream. It is the baseline every distributed run is measured
// against, and the reference its losses must match.
package train

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/data/tokenizer"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/stage"
	"github.com/pipeswarm/pipeswarm/optim"
	"github.com/pipeswarm/pipeswarm/shard"
	"github.com/pipeswarm/pipeswarm/shard/backend"
	"github.com/pipeswarm/pipeswarm/shard/compute"
)

// ErrDiverged means the training loss stopped being a finite number.
var ErrDiverged = errors.New("train: loss is not finite")

// Output file names inside a run's directory.
const (
	MetricsFile    = "metrics.jsonl"
	SpecFile       = "spec.yaml"
	CheckpointFile = "model.safetensors"
	HFConfigFile   = "config.json"
	// TokenizerFile is the run's tokenizer.json, beside config.json as in a Hugging Face
	// model directory; a byte-level run has none.
	TokenizerFile = "tokenizer.json"
	PlotFile      = "loss.png"
	// RunFile records what computed the run: backend, precision, GEMM provider with
	// its library version and kernels, compute threads.
	RunFile = "run.json"
)

// oldStateFile is where an earlier version kept the training state, in a format
// this one refuses to resume from (every stage's checkpoint is now its own pair of
// files, as a launched run's are; see saveState).
const oldStateFile = "train-state.safetensors"

// Metadata keys a trainer writes into checkpoints.
const (
	MetaSpec = stage.MetaSpec
	MetaStep = stage.MetaStep
	// metaTokens (training state only) is how many tokens the run had trained on.
	metaTokens = "pipeswarm.tokens"
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
	// Trace, if set, sees every piece of compute as the stage of a pipeline that would
	// do it, timed (the WAN bench's meter schedules a swarm from these).
	Trace func(Op)
	// Resume continues the run whose checkpoint and training state are in OutDir
	// (written at its last evaluation, or when it was stopped) with the same spec, from
	// the step after them, exactly as if it had not stopped; metrics.jsonl keeps its
	// rows up to that step and grows from there.
	Resume bool
}

// OpKind names a piece of a stage's compute in a trace.
type OpKind uint8

const (
	OpForward  OpKind = iota // a training micro-batch forward (the last stage's includes the loss)
	OpBackward               // its backward
	OpOptimize               // the step's norm, clipping and AdamW
	OpEval                   // a validation batch's forward
	OpOuter                  // the outer step's arithmetic (the all-reduce is network)
)

// Op is one piece of compute the trainer did as stage Stage of replica pipeline
// Replica would do it, how long it took here, and the encoded bytes of the frame it
// then sends (forward and eval: to the next stage; backward: to the previous one;
// outer: both phases of the all-reduce).
type Op struct {
	Replica, Stage int
	Kind           OpKind
	Step, Item     int // Item: the micro-batch or validation batch
	Dur            time.Duration
	Bytes          int64
}

// Result summarises a finished (or interrupted) run.
type Result struct {
	Steps      int
	Params     int     // parameters of the whole model
	Loss       float64 // last training loss (mean over replicas)
	ValLoss    float64 // last validation loss
	Tokens     int64
	Elapsed    time.Duration
	Checkpoint string
	// Per stage boundary: encoded bytes of the training frames sent forward and back.
	BoundaryFwd, BoundaryBwd []int64
	// SyncBytes[r][s]: what replica r of stage s sent in all its outer steps (both
	// phases of every all-reduce), as the swarm would.
	SyncBytes [][]int64
}

// SetBackend makes sp's model.precision the one backend name computes in (the
// --backend override of the commands), so the spec every run records says what ran.
func SetBackend(sp *spec.Spec, name string) error {
	be, err := backend.Open(name)
	if err != nil {
		return err
	}
	sp.Model.Precision = be.Precision()
	return nil
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

// LoadTokenizer returns the tokenizer data.tokenizer names, or nil for bytes.
func LoadTokenizer(sp *spec.Spec) (*tokenizer.Tokenizer, error) {
	if sp.Data.ByteLevel() {
		return nil, nil
	}
	tk, err := tokenizer.Load(sp.Data.Tokenizer)
	if err != nil {
		return nil, fmt.Errorf("data.tokenizer: %w", err)
	}
	return tk, nil
}

// Tokenize returns the tokens of text: its bytes without a tokenizer, else the ids tk
// gives it (no special tokens), each checked to be below vocab.
func Tokenize(tk *tokenizer.Tokenizer, text []byte, vocab int) ([]int32, error) {
	if tk == nil {
		return data.Widen(text), nil
	}
	ids := tk.Encode(string(text))
	out := make([]int32, len(ids))
	for i, id := range ids {
		if id >= vocab {
			return nil, fmt.Errorf("train: token %d of the text is id %d, outside model.vocab %d", i, id, vocab)
		}
		out[i] = int32(id)
	}
	return out, nil
}

// Run trains sp's model in one process and writes metrics.jsonl, spec.yaml,
// model.safetensors (+ config.json, and tokenizer.json with data.tokenizer) and loss.png into OutDir. On ctx cancellation it
// stops after the current step, still writes the checkpoint and plot of what it did,
// and returns ctx's error with the partial Result. It is long because it is the run read
// top to bottom (set up, resume, the step loop, the last checkpoint); each part that is
// more than bookkeeping is a function of its own.
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

	tk, err := LoadTokenizer(sp)
	if err != nil {
		return nil, err
	}
	ds, err := LoadDataset(sp, tk)
	if err != nil {
		return nil, err
	}
	valText := ds.Val
	if data.ValWindows(valText, cfg.SeqLen) == 0 {
		return nil, fmt.Errorf("train: validation split of %d tokens holds no window of seq_len+1 = %d tokens; use more text or a larger data.val_fraction (or data.val_path)",
			len(valText), cfg.SeqLen+1)
	}
	R := sp.Pipeline.Replicas
	reps := make([]*replica, R)
	for r := range reps {
		rp, err := newReplica(sp, ds, r)
		if err != nil {
			return nil, err
		}
		reps[r] = rp
	}
	m := reps[0].m
	be := m.stages[0].Backend()
	log.Info("compute", "backend", be.Name(), "precision", sp.Model.Precision, "gemm", be.GEMM().Describe(),
		"impl", be.Describe(), "workers", compute.Workers())
	log.Info("training", "spec", sp.Name, "corpus", ds.Name, "tokenizer", sp.Data.TokenizerName(),
		"train_tokens", ds.Tokens, "val_tokens", len(valText), "params", m.numParams(),
		"stages", len(m.stages), "replicas", R, "steps", sp.Train.Steps, "tokens_per_step", sp.TokensPerStep()*R)

	logAsync(log, sp, m)
	var sync *syncer
	if R > 1 {
		sync = newSyncer(sp, reps)
	}
	// A resumed run checks and loads everything it continues from before it writes
	// anything, so a refused resume leaves the directory as it was.
	var from *resumePoint
	if o.Resume {
		if from, err = loadResume(o.OutDir, sp, reps); err != nil {
			return nil, err
		}
		if sync != nil {
			sync.resumeAfter(from.done, sp.Train.Steps)
		}
	}

	if err := os.MkdirAll(o.OutDir, 0o755); err != nil {
		return nil, fmt.Errorf("train: %w", err)
	}
	if err := writeRunFiles(o.OutDir, sp, cfg, m.stages[0].Backend(), tk); err != nil {
		return nil, err
	}
	mw, err := metrics.Create(filepath.Join(o.OutDir, MetricsFile))
	if err != nil {
		return nil, err
	}
	defer mw.Close()

	// Validation runs on replica 0's weights, which right after an outer step are the
	// global weights every replica holds.
	eval := NewEvaluator(m.stages, valText, sp.EvalBatches)
	eval.Reuse(m.tapes)
	eval.bounds = m.bounds
	res := &Result{Checkpoint: filepath.Join(o.OutDir, CheckpointFile), ValLoss: math.NaN(), SyncBytes: make([][]int64, R), Params: m.numParams()}
	for r := range res.SyncBytes {
		res.SyncBytes[r] = make([]int64, len(m.stages))
	}
	var history []metrics.Step
	start := now()
	finish := func(step int) error {
		meta := map[string]string{MetaSpec: sp.String(), MetaStep: strconv.Itoa(step)}
		err := shard.SaveCheckpoint(res.Checkpoint, meta, m.stages...)
		meta[metaTokens] = strconv.FormatInt(res.Tokens, 10)
		err = errors.Join(err, saveState(o.OutDir, step, meta, reps))
		if len(history) > 0 {
			err = errors.Join(err, metrics.PlotLoss(filepath.Join(o.OutDir, PlotFile), sp.Name, history))
		}
		return err
	}

	mb := sp.Train.BatchSize / sp.Pipeline.MicroBatches
	inputs, targets := make([]int32, mb*cfg.SeqLen), make([]int32, mb*cfg.SeqLen)
	first := 1
	if from != nil {
		if history, err = from.carryOver(mw, res, R, len(m.stages)); err != nil {
			return nil, err
		}
		if n := len(from.steps); n > 0 { // elapsed_s goes on from where it was
			start = now().Add(-time.Duration(from.steps[n-1].ElapsedS * float64(time.Second)))
		}
		first = from.done + 1
		log.Info("resuming", "after_step", from.done, "tokens", from.tokens, "dir", o.OutDir)
	}
	ck, lastCk := checkpoints(sp), now()
	for step := first; step <= sp.Train.Steps; step++ {
		if err := ctx.Err(); err != nil {
			log.Info("interrupted; writing checkpoint", "step", step-1)
			return res, errors.Join(err, finish(step-1))
		}
		t0 := now()
		lr := m.sched.At(step - 1)
		recs, mean, err := stepReplicas(o, reps, step, lr, inputs, targets, res)
		if err != nil {
			return res, err
		}
		outers := outerSteps(o, sync, step, now, res)
		dt := now().Sub(t0)
		res.Steps, res.Loss = step, mean
		for r := range recs {
			recs[r].TokensPerS = float64(sp.TokensPerStep()*R) / dt.Seconds()
			recs[r].ElapsedS = now().Sub(start).Seconds()
		}
		if core.EvalAt(step, sp.Train.Steps, sp.EvalInterval) {
			if o.Trace != nil {
				eval.trace = func(stage, batch int, d time.Duration, b int64) {
					o.Trace(Op{Stage: stage, Kind: OpEval, Step: step, Item: batch, Dur: d, Bytes: b})
				}
			}
			v := eval.Loss()
			recs[0].ValLoss, res.ValLoss = &v, v
			log.Info("eval", "step", step, "loss", round4(mean), "val_loss", round4(v),
				"tokens_per_s", int(recs[0].TokensPerS), "elapsed", time.Duration(recs[0].ElapsedS*float64(time.Second)).Round(time.Second))
			recs[0].ElapsedS = now().Sub(start).Seconds()
		}
		if err := writeRows(o, mw, recs, outers, now().Sub(start)); err != nil {
			return res, err
		}
		// The plot shows the mean over replicas.
		plotRec := recs[0]
		plotRec.Loss, plotRec.Replica = mean, nil
		history = append(history, plotRec)
		// Checkpoints by count at the steps a launched run's stages take them, and by
		// time since the last one, bound what a crash can lose (the last step's is
		// written below).
		if ck.DueAfter(step, now().Sub(lastCk)) {
			lastCk = now()
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

// stepReplicas takes step on every replica in turn and returns each one's metrics row
// and the mean loss over them.
func stepReplicas(o Options, reps []*replica, step int, lr float32, inputs, targets []int32, res *Result) ([]metrics.Step, float64, error) {
	sp, R := o.Spec, len(reps)
	recs := make([]metrics.Step, R)
	var mean float64
	for r, rp := range reps {
		var tr tracer
		if o.Trace != nil {
			tr = func(k OpKind, stage, item int, d time.Duration, b int64) {
				o.Trace(Op{Replica: r, Stage: stage, Kind: k, Step: step, Item: item, Dur: d, Bytes: b})
			}
		}
		var loss, norm float64
		if rp.m.async != nil {
			loss, norm = rp.m.asyncStep(step, rp.sampler, inputs, targets, lr, tr)
		} else {
			loss, norm = rp.m.step(rp.sampler, inputs, targets, lr, sp.Train.GradClip, tr)
		}
		if math.IsNaN(loss) || math.IsInf(loss, 0) {
			return nil, 0, fmt.Errorf("%w at step %d (loss %g, replica %d); try a lower train.lr", ErrDiverged, step, loss, r)
		}
		res.Tokens += int64(sp.TokensPerStep())
		recs[r] = metrics.Step{Step: step, Loss: loss, Tokens: res.Tokens, LR: float64(lr), GradNorm: norm}
		if R > 1 {
			recs[r].Replica = &r
		}
		mean += loss / float64(R)
	}
	return recs, mean, nil
}

// outerSteps takes the outer steps due after step (none without replicas) and counts
// their bytes into res.
func outerSteps(o Options, sync *syncer, step int, now func() time.Time, res *Result) []metrics.Outer {
	if sync == nil {
		return nil
	}
	t0 := time.Now()
	outers := sync.step(step, o.Spec.Train.Steps, now)
	// The arithmetic of all R×S outer steps ran here in turn; each node does its own.
	each := time.Since(t0) / time.Duration(max(1, len(outers)))
	for _, or := range outers {
		res.SyncBytes[or.Replica][or.Stage] += or.SyncBytes
		if o.Trace != nil {
			o.Trace(Op{Replica: or.Replica, Stage: or.Stage, Kind: OpOuter, Step: step, Dur: each, Bytes: or.SyncBytes})
		}
	}
	return outers
}

// writeRows records a step's rows, then its outer steps' (elapsed since the run began).
func writeRows(o Options, mw *metrics.Writer, recs []metrics.Step, outers []metrics.Outer, elapsed time.Duration) error {
	for _, rec := range recs {
		if err := mw.Write(rec); err != nil {
			return err
		}
		if o.OnStep != nil {
			o.OnStep(rec)
		}
	}
	for _, or := range outers {
		or.ElapsedS = elapsed.Seconds()
		if err := mw.WriteOuter(or); err != nil {
			return err
		}
	}
	return nil
}

// logAsync says how an async run's schedule delays each stage and what the stashed
// weight versions cost.
func logAsync(log *slog.Logger, sp *spec.Spec, m *model) {
	a := m.async
	if a == nil {
		return
	}
	var delays []float64
	var lrs []float32
	var stashed int64
	for s, u := range m.units {
		delays = append(delays, a.sched.Delay(s))
		stashed += a.Stashed(u)
		if sp.Train.Delay == spec.DelayNesterov {
			lrs = append(lrs, optim.DelayLR(a.sched.Delay(s)))
		}
	}
	attrs := []any{"delay", sp.Train.Delay, "updates_of_delay", delays}
	if lrs != nil {
		attrs = append(attrs, "lr_scale", lrs)
	}
	log.Info("async pipeline", append(attrs, "stashed_bytes", stashed, "clip_per_stage", a.clip)...)
}

// replica is one replica pipeline: a whole model on its own shard of the text.
type replica struct {
	m       *model
	sampler *data.Sampler[int32]
	outers  []*stage.Outer // per stage; nil with one replica
}

func newReplica(sp *spec.Spec, ds *Dataset, r int) (*replica, error) {
	m, err := newModel(sp)
	if err != nil {
		return nil, err
	}
	sampler, err := ds.Sampler(r, sp.Model.SeqLen, sp.Seed)
	if err != nil {
		return nil, fmt.Errorf("train: replica %d: %w", r, err)
	}
	rp := &replica{m: m, sampler: sampler}
	if sp.Pipeline.Replicas > 1 {
		for _, u := range m.units {
			rp.outers = append(rp.outers, u.Outer)
		}
	}
	return rp, nil
}

// resumePoint is where a stopped run continues from: the step its checkpoint holds,
// the tokens trained by then, and its metrics rows up to that step (raw, to be
// written back as they were, and parsed).
type resumePoint struct {
	done   int
	tokens int64
	rows   []json.RawMessage
	steps  []metrics.Step
	outers []metrics.Outer
}

// loadResume loads the training state in dir into reps, which must be fresh replicas
// of sp, after checking it was written by a run of sp, and reads the run's metrics up
// to the checkpoint (a row torn by a crash, or written after the checkpoint, is
// dropped).
// carryOver writes the rows recorded before the resumed step into mw, counts what they
// record into res and returns the loss history to plot.
func (from *resumePoint) carryOver(mw *metrics.Writer, res *Result, replicas, stages int) ([]metrics.Step, error) {
	for _, row := range from.rows {
		if err := mw.WriteRaw(row); err != nil {
			return nil, err
		}
	}
	for _, or := range from.outers {
		if or.Replica < replicas && or.Stage < stages {
			res.SyncBytes[or.Replica][or.Stage] += or.SyncBytes
		}
	}
	res.Steps, res.Tokens = from.done, from.tokens
	return meanHistory(from.steps, replicas), nil
}

func loadResume(dir string, sp *spec.Spec, reps []*replica) (*resumePoint, error) {
	meta, err := loadState(dir, sp, reps)
	if err != nil {
		return nil, err
	}
	done, err1 := strconv.Atoi(meta[MetaStep])
	tokens, err2 := strconv.ParseInt(meta[metaTokens], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return nil, fmt.Errorf("train: resume: %s: %w", dir, err)
	}
	b, err := os.ReadFile(filepath.Join(dir, MetricsFile))
	if err != nil {
		return nil, fmt.Errorf("train: nothing to resume in %s: %w", dir, err)
	}
	p := &resumePoint{done: done, tokens: tokens}
	for _, line := range bytes.Split(b, []byte("\n")) {
		var probe struct {
			Step int      `json:"step"`
			Loss *float64 `json:"loss"`
		}
		if line = bytes.TrimSpace(line); len(line) == 0 || json.Unmarshal(line, &probe) != nil || probe.Step > done {
			continue
		}
		p.rows = append(p.rows, json.RawMessage(line))
		if probe.Loss != nil {
			var st metrics.Step
			if err := json.Unmarshal(line, &st); err == nil {
				p.steps = append(p.steps, st)
			}
		} else {
			var or metrics.Outer
			if err := json.Unmarshal(line, &or); err == nil {
				p.outers = append(p.outers, or)
			}
		}
	}
	return p, nil
}

// meanHistory rebuilds the loss plot's points (the mean over replicas per step, with
// replica 0's validation loss) from a run's step rows.
func meanHistory(steps []metrics.Step, replicas int) []metrics.Step {
	var out []metrics.Step
	sum := map[int]float64{}
	for _, s := range steps {
		sum[s.Step] += s.Loss / float64(replicas)
	}
	for _, s := range steps {
		if s.Replica == nil || *s.Replica == 0 {
			s.Loss, s.Replica = sum[s.Step], nil
			out = append(out, s)
		}
	}
	return out
}

func round4(x float64) float64 { return math.Round(x*1e4) / 1e4 }

// RunInfo is the content of RunFile.
type RunInfo struct {
	Backend   string `json:"backend"`
	Precision string `json:"precision"`
	GEMM      string `json:"gemm"`      // go, onednn, openblas
	GEMMImpl  string `json:"gemm_impl"` // library version and kernels
	Workers   int    `json:"workers"`
}

func writeRunFiles(dir string, sp *spec.Spec, cfg shard.Config, be backend.Backend, tk *tokenizer.Tokenizer) error {
	info, err := json.MarshalIndent(RunInfo{Backend: be.Name(), Precision: be.Precision(), GEMM: be.GEMM().Name,
		GEMMImpl: be.GEMM().Describe(), Workers: compute.Workers()}, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, RunFile), append(info, '\n'), 0o644); err != nil {
		return fmt.Errorf("train: %w", err)
	}
	hf, err := shard.HFConfig(cfg)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, HFConfigFile), hf, 0o644); err != nil {
		return fmt.Errorf("train: %w", err)
	}
	if tk != nil {
		if err := os.WriteFile(filepath.Join(dir, TokenizerFile), tk.JSON(), 0o644); err != nil {
			return fmt.Errorf("train: %w", err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, SpecFile), []byte(sp.String()), 0o644); err != nil {
		return fmt.Errorf("train: %w", err)
	}
	return nil
}
