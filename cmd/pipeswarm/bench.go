package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"

	"github.com/pipeswarm/pipeswarm/bench"
	"github.com/pipeswarm/pipeswarm/node/metrics"
)

func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "wan" {
		return runBenchWAN(ctx, args[1:], stdout, stderr)
	}
	if len(args) == 0 || args[0] != "compression" {
		if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
			fmt.Fprintln(stderr, "Usage: pipeswarm bench compression|wan ...\n  pipeswarm bench compression --spec SPEC [--data PATH] [--steps N] [--eval-interval N] [--target LOSS] [--setting S]... --out DIR")
			fmt.Fprintln(stderr, "  pipeswarm bench wan --spec SPEC --profile NAME|FILE [--mode sim|netns|meter] [--data PATH] [--steps N] [--out DIR] ...")
			fmt.Fprintln(stderr, "  pipeswarm bench wan --compare DIR [DIR...]\nEach takes --help.")
			return nil
		}
		fmt.Fprintln(stderr, "pipeswarm bench: want a benchmark name: compression or wan")
		return errUsage
	}
	fs := newFlagSet("bench compression", "bench compression --spec SPEC [--data PATH] [--steps N] [--eval-interval N] [--target LOSS] [--setting S]... --out DIR", `
Measure what compressing the stage boundaries costs: train SPEC once per setting —
none (fp32), bf16, int8, the residual subspace at k = d/8, d/16, d/32, and the
subspace at d/32 with int8 — cut into at least two pipeline stages, with every boundary
tensor passed through a real wire frame. Writes DIR/compression.md and
DIR/compression.json (bytes per token each way per boundary, validation loss at
equal steps, steps to the target validation loss, and each figure's ratio to the
uncompressed run), and each setting's run directory.

`+specHelp(), stderr)
	specPath := fs.String("spec", "", "run spec: a YAML file or a built-in example's name (default: tiny)")
	dataPath := fs.String("data", "", "training text (overrides data.path)")
	steps := fs.Int("steps", 0, "optimiser steps per setting (overrides train.steps)")
	evalEvery := fs.Int("eval-interval", 0, "steps between validation evals (overrides eval_interval; steps to target are counted at this resolution)")
	target := fs.Float64("target", 0, "target validation loss (default: the uncompressed run's at half its steps)")
	out := fs.String("out", "", "output directory (default runs/bench-compression-<spec name>)")
	quiet := fs.Bool("quiet", false, "no progress display")
	logf := addLogFlags(fs, slog.LevelInfo)
	gemm := addGEMMFlag(fs)
	var only multiFlag
	fs.Var(&only, "setting", "run only these settings, repeatable: CODEC or k=RANK[,tail=LAYERS]/CODEC (e.g. fp32, int8/32, k=4/int8/32, k=8,tail=4/int8/32: subspace of rank 8, last 4 layers dense); the first is the baseline")
	pos, err := parse(fs, args[1:])
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		fmt.Fprintf(stderr, "pipeswarm bench compression: unexpected arguments %q\n", pos)
		return errUsage
	}
	var specArgs []string
	if *specPath != "" {
		specArgs = []string{*specPath}
	}
	sp, err := loadSpec(specArgs, *dataPath, *steps, newLogger(stderr, slog.LevelWarn))
	if err != nil {
		return err
	}
	if *evalEvery > 0 {
		sp.EvalInterval = *evalEvery
	}
	if *out == "" {
		*out = filepath.Join("runs", "bench-compression-"+sp.Name)
	}
	var settings []bench.Setting
	for _, v := range only {
		st, err := bench.ParseSetting(v)
		if err != nil {
			return err
		}
		settings = append(settings, st)
	}
	base, err := logf.logger(stderr, stderr, "bench compression")
	if err != nil {
		return err
	}
	log := base.With("sys", "bench")
	if err := useGEMM(*gemm, log); err != nil {
		return err
	}
	var prog *progress
	current := ""
	rows, err := bench.Compression(ctx, bench.CompressionOptions{Spec: sp, Settings: settings, OutDir: *out, Target: *target, Log: log,
		OnStep: func(setting string, s metrics.Step) {
			if setting != current {
				if prog != nil {
					prog.done()
				}
				current, prog = setting, newProgress(stderr, sp.Train.Steps, *quiet)
			}
			prog.step(s)
		}})
	if prog != nil {
		prog.done()
	}
	if len(rows) > 0 && err == nil {
		bench.WriteCompressionTable(stdout, sp.Name, rows)
		fmt.Fprintf(stdout, "\nwrote %s\n", *out)
	}
	return err
}
