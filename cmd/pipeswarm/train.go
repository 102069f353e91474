package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/pipeswarm/pipeswarm/examples"
	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/data/tokenizer"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/shard"
)

func runTrain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("train", "train [SPEC] [--data PATH] [--steps N] [--out DIR] [--resume | --force]", `
Train every stage of the run spec SPEC in this one process: the centralised
baseline that distributed runs are compared against. Without SPEC it trains the
built-in example tiny; without data it trains on a built-in corpus
generated in code, so nothing needs downloading.

With pipeline.replicas > 1 it simulates the replica pipelines and their DiLoCo outer
steps exactly as a swarm computes them (each replica on its own shard of the text,
the same pseudo-gradient codec, the same all-reduce arithmetic), and prints what the
outer syncs would send: the quick way to tune diloco.* before launching.

Writes into DIR: metrics.jsonl (one JSON object per step and replica, and per outer
step and stage), spec.yaml (the effective spec), run.json (backend and GEMM
provider), model.safetensors with a Hugging Face config.json beside it, loss.png,
and every stage's checkpoint as a launched run's nodes keep it: stage-S.safetensors
(stage-S-replica-R with replicas) and stage-S.state.safetensors beside it (AdamW
moments and step, data position, error-feedback residuals, outer momentum).
Ctrl-C stops after the current step and still writes the checkpoint and plot;
--resume continues from there (or from the last evaluation after a crash) and takes
the same steps the uninterrupted run would have.
A directory that holds a run is never written over: without --out a new run goes to
runs/NAME, or runs/NAME-2, runs/NAME-3, … if that holds one; an --out DIR that holds
a run is refused unless --resume continues it or --force overwrites it.

`+specHelp(), stderr)
	dataPath := fs.String("data", "", "training text: a file, a directory of text files, or .jsonl with a \"text\" field (overrides data.path)")
	steps := fs.Int("steps", 0, "number of optimiser steps (overrides train.steps)")
	out := fs.String("out", "", "output directory (default runs/<spec name>, or runs/<spec name>-N if that holds a run)")
	force := fs.Bool("force", false, "overwrite the run in --out DIR")
	quiet := fs.Bool("quiet", false, "no progress display")
	logf := addLogFlags(fs, slog.LevelInfo)
	resume := fs.Bool("resume", false, "continue the run in --out from its last checkpoint (same SPEC, --data and --steps), exactly as if it had not stopped")
	be := fs.String("backend", "", "compute backend, cpu32 or bf16 (overrides model.precision: fp32 or bf16)")
	gemm := addGEMMFlag(fs)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 1 {
		fmt.Fprintf(stderr, "pipeswarm train: one SPEC at most, got %q\n", pos)
		return errUsage
	}
	log, err := logf.logger(stderr, stderr, "train")
	if err != nil {
		return err
	}
	sp, err := loadSpec(pos, *dataPath, *steps, log)
	if err != nil {
		return err
	}
	if err := useGEMM(*gemm, log); err != nil {
		return err
	}
	if *be != "" {
		if err := train.SetBackend(sp, *be); err != nil {
			return fmt.Errorf("--backend: %w", err)
		}
	}
	dir, note, err := runDir(*out, sp.Name, *resume, *force)
	if err != nil {
		return err
	}
	if note != "" {
		fmt.Fprintln(stderr, note)
	}
	*out = dir
	prog := newProgress(stderr, sp.Train.Steps, *quiet)
	res, err := train.Run(ctx, train.Options{Spec: sp, OutDir: *out, Log: log, OnStep: prog.step, Resume: *resume})
	prog.done()
	if res != nil && res.Steps > 0 {
		fmt.Fprintf(stdout, "trained %d steps in %s: loss %.4f, val_loss %.4f\n",
			res.Steps, res.Elapsed.Round(time.Second), res.Loss, res.ValLoss)
		if R := sp.Pipeline.Replicas; R > 1 {
			// What one replica pipeline sends per inner step, against fp32 gradients of
			// the whole model every step (data parallel's all-reduce payload).
			var sync int64
			for _, row := range res.SyncBytes {
				for _, b := range row {
					sync += b
				}
			}
			perStep := float64(sync) / float64(R) / float64(res.Steps)
			dense := 4 * float64(res.Params)
			fmt.Fprintf(stdout, "outer syncs: %.0f bytes per inner step per replica pipeline (both phases), %.0f× fewer than fp32 gradients every step (%.0f)\n",
				perStep, dense/perStep, dense)
		}
		fmt.Fprintf(stdout, "wrote %s\n", *out)
	}
	if res != nil && res.Steps > 0 && errors.Is(err, context.Canceled) {
		fmt.Fprintf(stderr, "resume with: %s\n", resumeCommand("train", args, *out))
	}
	return err
}

// loadSpec reads the one positional SPEC, or the embedded default, and applies the
// commands' common overrides: --data (if set) and --steps (if > 0, shortening warmup
// to fit), then validates the result and checks that its text exists. What it
// changed is logged.
func loadSpec(pos []string, data string, steps int, log *slog.Logger) (*spec.Spec, error) {
	return loadSpecOr(examples.Default, pos, data, steps, log)
}

// evalText returns the validation tokens of sp's data, as train cuts them, and the
// corpus name.
func evalText(sp *spec.Spec, tk *tokenizer.Tokenizer) ([]int32, string, error) {
	if sp.Data.Prepared() {
		val, err := train.LoadValShards(sp)
		return val, sp.Data.ValPath, err
	}
	if sp.Data.ValPath != "" {
		text, err := data.LoadField(sp.Data.ValPath, sp.Data.TextField)
		if err != nil {
			return nil, "", fmt.Errorf("data.val_path: %w", err)
		}
		val, err := train.Tokenize(tk, text, sp.Model.Vocab)
		return val, sp.Data.ValPath, err
	}
	text, name, err := train.CorpusField(sp.Data.Path, sp.Data.TextField)
	if err != nil {
		return nil, "", err
	}
	tokens, err := train.Tokenize(tk, text, sp.Model.Vocab)
	if err != nil {
		return nil, "", err
	}
	_, val := data.Split(tokens, sp.Data.ValFraction)
	return val, name, nil
}

// specHelp is what the commands' --help says a SPEC argument is.
func specHelp() string {
	return "SPEC is a YAML file, or the name of a built-in example (from any directory):\n  " +
		strings.Join(examples.Specs(), ", ")
}

// loadSpecOr is loadSpec with another built-in example as the default.
func loadSpecOr(builtin string, pos []string, data string, steps int, log *slog.Logger) (*spec.Spec, error) {
	name := strings.TrimSuffix(builtin, ".yaml") // a built-in example, by its name
	if len(pos) == 1 {
		name = pos[0]
	}
	sp, err := readSpec(name)
	if err != nil {
		return nil, err
	}
	for _, n := range sp.Notes() {
		log.Warn(n)
	}
	if data != "" {
		if _, err := os.Stat(data); err != nil && !strings.ContainsAny(data, "*?[") { // a glob is checked with the spec's data
			var pe *fs.PathError
			if errors.As(err, &pe) {
				err = pe.Err
			}
			return nil, fmt.Errorf("--data %s: %w", data, err)
		}
		sp.Data.Path = data
	}
	if steps > 0 {
		sp.Train.Steps = steps
		if was, now, ok := sp.FitWarmup(); ok {
			log.Warn(fmt.Sprintf("train.warmup %d is not less than --steps %d; shortened to %d (a tenth of the steps)", was, steps, now))
		}
	}
	if err := sp.Validate(); err != nil {
		return nil, err
	}
	if _, err := sp.CheckTokenizer(); err != nil {
		return nil, err
	}
	if data == "" {
		return sp, sp.CheckData()
	}
	return sp, nil
}

// readSpec reads the spec at path or, if no file is there and arg is a bare name
// (no directory, no .yaml), the built-in example of that name.
func readSpec(arg string) (*spec.Spec, error) {
	bare := !strings.ContainsAny(arg, `/\`) && !strings.HasSuffix(arg, ".yaml") && !strings.HasSuffix(arg, ".yml")
	if _, err := os.Stat(arg); err == nil || !bare {
		sp, err := spec.Load(arg)
		if errors.Is(err, fs.ErrNotExist) {
			if _, _, eerr := examples.Spec(filepath.Base(arg)); eerr == nil {
				return nil, fmt.Errorf("%w (the built-in example of that name is taken from any directory by its name alone: %s)",
					err, strings.TrimSuffix(filepath.Base(arg), ".yaml"))
			}
		}
		return sp, err
	}
	src, path, err := examples.Spec(arg)
	if err != nil {
		return nil, fmt.Errorf("spec %q: no such file, and no built-in example of that name (built in: %s)", arg, strings.Join(examples.Specs(), ", "))
	}
	return spec.Parse(src, path)
}

// progress draws a one-line status on a terminal, or a plain line every 10 s
// elsewhere; quiet, nothing.
type progress struct {
	w       io.Writer
	total   int
	tty     bool
	quiet   bool
	last    time.Time
	valLoss float64
}

func newProgress(w io.Writer, total int, quiet bool) *progress {
	return &progress{w: w, total: total, tty: isTerminal(w), quiet: quiet, valLoss: math.NaN()}
}

func (p *progress) step(s metrics.Step) {
	if p.quiet {
		return
	}
	if s.ValLoss != nil {
		p.valLoss = *s.ValLoss
	}
	eta := time.Duration(float64(p.total-s.Step) * s.ElapsedS / float64(s.Step) * float64(time.Second)).Round(time.Second)
	line := fmt.Sprintf("step %d/%d", s.Step, p.total)
	if s.Replica != nil { // every replica pipeline reports its own steps
		line += fmt.Sprintf("  replica %d", *s.Replica)
	}
	line += fmt.Sprintf("  loss %.4f", s.Loss)
	if !math.IsNaN(p.valLoss) { // none before the first evaluation
		line += fmt.Sprintf("  val %.4f", p.valLoss)
	}
	line += fmt.Sprintf("  %.0f tok/s  elapsed %s  eta %s",
		s.TokensPerS, time.Duration(s.ElapsedS*float64(time.Second)).Round(time.Second), eta)
	if p.tty {
		fmt.Fprintf(p.w, "\r\033[K%s", line)
		return
	}
	if time.Since(p.last) >= 10*time.Second || s.Step == p.total {
		p.last = time.Now()
		fmt.Fprintln(p.w, line)
	}
}

// note prints a line of its own, keeping the status line below it.
func (p *progress) note(line string) {
	if p.quiet {
		return
	}
	if p.tty {
		fmt.Fprintf(p.w, "\r\033[K%s\n", line)
		return
	}
	fmt.Fprintln(p.w, line)
}

func (p *progress) done() {
	if p.tty && !p.quiet {
		fmt.Fprintln(p.w)
	}
}

func runEval(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("eval", "eval --checkpoint FILE|RUN_DIR [--data PATH] [--batches N] [--json]", `
Print the validation loss (mean next-byte loss in nats over the consecutive
non-overlapping windows of seq_len+1 bytes from the start of the validation split,
the first eval_batches batches of 16 of them, as the run evaluated) of a model
written by train or assembled by launch or export. --checkpoint is the model's
safetensors file or the run directory holding it (model.safetensors). The run spec
is read from the checkpoint; --data replaces its data path.`, stderr)
	ckPath := fs.String("checkpoint", "", "model.safetensors written by train, launch or export, or the run directory holding it (required)")
	dataPath := fs.String("data", "", "text to evaluate on (default: the data path recorded in the checkpoint's spec)")
	batches := fs.Int("batches", -1, "evaluate the first N batches of 16 windows; 0: the whole validation split (default: the spec's eval_batches)")
	asJSON := fs.Bool("json", false, "print one JSON object with a val_loss field")
	gemm := addGEMMFlag(fs)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if err := useGEMM(*gemm, newLogger(stderr, slog.LevelWarn)); err != nil {
		return err
	}
	if *ckPath == "" && len(pos) == 1 {
		*ckPath = pos[0]
	} else if len(pos) > 0 {
		fmt.Fprintf(stderr, "pipeswarm eval: unexpected arguments %q\n", pos)
		return errUsage
	}
	if *ckPath == "" {
		fmt.Fprintln(stderr, "pipeswarm eval: --checkpoint FILE is required")
		fs.Usage()
		return errUsage
	}
	if st, err := os.Stat(*ckPath); err == nil && st.IsDir() {
		model := filepath.Join(*ckPath, train.CheckpointFile)
		if _, err := os.Stat(model); err != nil {
			return fmt.Errorf("--checkpoint %s: a run directory without %s (a launched run's model is assembled by 'pipeswarm export %s --key … --peer …' where its spec says export: allowed)",
				*ckPath, train.CheckpointFile, *ckPath)
		}
		*ckPath = model
	}
	ck, err := shard.LoadCheckpoint(*ckPath)
	if err != nil {
		return err
	}
	src, ok := ck.Metadata[train.MetaSpec]
	if !ok {
		return fmt.Errorf("%s has no %q metadata: not written by pipeswarm train", *ckPath, train.MetaSpec)
	}
	sp, err := spec.Parse([]byte(src), *ckPath+":"+train.MetaSpec)
	if err != nil {
		return err
	}
	if *dataPath != "" {
		sp.Data.Path = *dataPath
	}
	if *batches >= 0 {
		sp.EvalBatches = *batches
	}
	be, err := train.Backend(sp)
	if err != nil {
		return err
	}
	stages, err := shard.NewStages(train.ModelConfig(sp), sp.Pipeline.Stages, shard.WithBackend(be))
	if err != nil {
		return err
	}
	for _, s := range stages {
		if err := s.Load(ck); err != nil {
			if m := ck.Metadata[shard.MetaLayers]; m != "" && m != fmt.Sprintf("0-%d", sp.Model.NLayers) {
				return fmt.Errorf("%s holds layers %s of %d, one stage's checkpoint: evaluate the run's whole model (model.safetensors, assembled by launch or 'pipeswarm export'): %w",
					*ckPath, m, sp.Model.NLayers, err)
			}
			return err
		}
	}
	tk, err := evalTokenizer(sp, *ckPath)
	if err != nil {
		return err
	}
	val, name, err := evalText(sp, tk)
	if err != nil {
		return err
	}
	ev := train.NewEvaluator(stages, val, sp.EvalBatches)
	if ev.Windows() == 0 {
		return fmt.Errorf("validation split of %s (%d bytes) holds no window of %d bytes", name, len(val), sp.Model.SeqLen+1)
	}
	loss := ev.Loss()
	if *asJSON {
		return json.NewEncoder(stdout).Encode(map[string]any{"val_loss": loss, "windows": ev.Windows(),
			"bytes": ev.Windows() * sp.Model.SeqLen, "data": name, "checkpoint": *ckPath, "step": ck.Metadata[train.MetaStep]})
	}
	fmt.Fprintf(stdout, "val_loss %.6f  (%d windows of %d bytes from %s)\n", loss, ev.Windows(), sp.Model.SeqLen+1, name)
	return nil
}

// evalTokenizer is the tokenizer a checkpoint's run used: none for bytes, else the
// tokenizer.json beside the checkpoint, or the file its spec names.
func evalTokenizer(sp *spec.Spec, ckPath string) (*tokenizer.Tokenizer, error) {
	if sp.Data.ByteLevel() {
		return nil, nil
	}
	beside := filepath.Join(filepath.Dir(ckPath), train.TokenizerFile)
	if _, err := os.Stat(beside); err == nil {
		return tokenizer.Load(beside)
	}
	return train.LoadTokenizer(sp)
}
