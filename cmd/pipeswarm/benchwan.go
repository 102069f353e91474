package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/pipeswarm/pipeswarm/bench/wan"
	"github.com/pipeswarm/pipeswarm/node/metrics"
)

func runBenchWAN(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("bench wan", "bench wan --spec SPEC --profile NAME|FILE [--mode sim|netns|meter] [--data PATH] [--steps N] [--out DIR]\n       pipeswarm bench wan --compare DIR [DIR...]", `
Put a whole swarm on this machine behind emulated internet links, train SPEC on it,
train the same spec centrally as the baseline (once: it is cached and reused for the
same spec, steps and text), and write a report to --out: report.md, report.json,
loss.png (loss against tokens and wall time, swarm and baseline) and timeline.png
(what each stage does over a few steps).

Profiles (--profile NAME, or a YAML file of your own): `+strings.Join(wan.Profiles(), ", ")+`;
their files are in examples/wan/. --bandwidth, --latency and --loss override the
profile for every node; --link gives one cell its own link (e.g. one slow peer).

Modes:
  sim    every node in this process, each a real node whose libp2p host runs QUIC
         over an in-process simulated network (no root needed)
  netns  every node a 'pipeswarm node' process in its own network namespace, links
         shaped by tbf and a delay line (root; cleaned up on exit, Ctrl-C or crash)
  meter  the centralised run's real compute and frames scheduled on virtual time,
         each stage as if on a machine of its own (what sim and netns cannot show
         when every node shares this machine's cores); --compute-scale F divides
         compute times by F to stand in for faster hardware. The stages' own
         schedulers decide what runs when, sync or async (pipeline.schedule)

Before a sim or netns run the links are measured (RTT and throughput both ways) and
printed beside the profile's figures.

`+specHelp(), stderr)
	specPath := fs.String("spec", "", "run spec: a YAML file or a built-in example's name (default: tiny4-k4)")
	profile := fs.String("profile", "home", "link profile: a name ("+strings.Join(wan.Profiles(), ", ")+") or a file")
	mode := fs.String("mode", wan.ModeSim, "how links are emulated: sim, netns or meter")
	dataPath := fs.String("data", "", "training text (overrides data.path)")
	steps := fs.Int("steps", 0, "optimiser steps (overrides train.steps)")
	evalEvery := fs.Int("eval-interval", 0, "steps between validation evals (overrides eval_interval; time to target is counted at this resolution)")
	out := fs.String("out", "", "report directory (default runs/bench-wan-<spec>-<profile>-<mode>)")
	target := fs.Float64("target", 0, "target validation loss (default: the baseline's at half its steps)")
	scale := fs.Float64("compute-scale", 1, "meter mode: divide measured compute times by this (stand-in for faster hardware)")
	threads := fs.Int("threads", 1, "sim mode: compute threads per in-process node")
	bw := fs.Float64("bandwidth", -1, "override the profile's bandwidth, Mbit/s each way (-1: the profile's)")
	lat := fs.Float64("latency", -1, "override the profile's one-way latency, ms (-1: the profile's)")
	loss := fs.Float64("loss", -1, "override the profile's packet loss, a fraction: 0.001 = 0.1% (-1: the profile's)")
	cache := fs.String("cache", "", "where centralised baselines are kept for reuse (default: the user cache dir's pipeswarm/bench-wan)")
	quiet := fs.Bool("quiet", false, "no progress display")
	gemm := addGEMMFlag(fs)
	churnFlag := fs.String("churn", "", "sim and netns modes: kill and restart nodes at given steps, e.g. s1r1:kill@20,s1r1:restart@40 (a run without replicas pauses until the node is back, then resumes from its checkpoints)")
	churnEvery := fs.Int("churn-every", 0, "sim and netns modes, a soak: kill one node every N steps, each cell in turn (s0r0, s0r1, ..., s1r0, ...), and restart it --churn-down later")
	churnDown := fs.Duration("churn-down", 30*time.Second, "with --churn-every: how long a killed node stays down")
	checkMeter := fs.Bool("check-meter", false, "sim mode: also predict the step time with the meter (from a centralised run on --threads threads) and report both")
	var links, compare multiFlag
	fs.Var(&links, "link", "give one cell its own link, repeatable: CELL=MBPS/LATENCY_MS[/LOSS], CELL sSrR (stage S, replica R) or launcher")
	fs.Var(&compare, "compare", "print one table of these report directories (each holds a report.json) instead of running; the first is the reference")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(compare) > 0 {
		dirs := append([]string(compare), pos...)
		return compareReports(dirs, *out, stdout)
	}
	if len(pos) > 0 {
		fmt.Fprintf(stderr, "pipeswarm bench wan: unexpected arguments %q\n", pos)
		return errUsage
	}
	var specArgs []string
	if *specPath != "" {
		specArgs = []string{*specPath}
	}
	log := newLogger(stderr, slog.LevelWarn)
	if *quiet {
		log = newLogger(io.Discard, slog.LevelWarn)
	}
	if err := useGEMM(*gemm, log); err != nil {
		return err
	}
	sp, err := loadSpecOr("tiny4-k4.yaml", specArgs, *dataPath, *steps, log)
	if err != nil {
		return err
	}
	if *evalEvery > 0 {
		sp.EvalInterval = *evalEvery
		if err := sp.Validate(); err != nil {
			return err
		}
	}
	prof, err := wan.LoadProfile(*profile)
	if err != nil {
		return err
	}
	if err := prof.Adjust(*bw, *lat, *loss); err != nil {
		return err
	}
	for _, l := range links {
		if err := prof.Override(l); err != nil {
			return err
		}
		prof.Links = append(prof.Links, l)
	}
	churn, err := wan.ParseChurn(*churnFlag)
	if err != nil {
		return err
	}
	if *churnEvery > 0 {
		if len(churn) > 0 {
			fmt.Fprintln(stderr, "pipeswarm bench wan: --churn and --churn-every are exclusive")
			return errUsage
		}
		// Replica by replica within a stage, so that kills in a row break different
		// replica pipelines.
		var cells []string
		for s := range sp.Pipeline.Stages {
			for r := range sp.Pipeline.Replicas {
				cells = append(cells, wan.Cell(s, r))
			}
		}
		if churn, err = wan.Rotate(cells, *churnEvery, sp.Train.Steps, *churnDown); err != nil {
			return err
		}
	}
	if *out == "" {
		*out = filepath.Join("runs", fmt.Sprintf("bench-wan-%s-%s-%s", sp.Name, prof.Name, *mode))
	}
	var prog *progress
	phase := ""
	rep, err := wan.Run(ctx, wan.Options{Spec: sp, Profile: prof, Mode: *mode, OutDir: *out, Target: *target,
		ComputeScale: *scale, Threads: *threads, CacheDir: *cache, GEMM: *gemm, Log: log, CheckMeter: *checkMeter, Churn: churn,
		OnStep: func(ph string, s metrics.Step) {
			if ph != phase {
				if prog != nil {
					prog.done()
				}
				phase = ph
				fmt.Fprintf(stderr, "%s run:\n", ph)
				prog = newProgress(stderr, sp.Train.Steps, *quiet)
			}
			prog.step(s)
		},
		OnNote: func(line string) {
			if prog != nil {
				prog.note(line)
			} else if !*quiet {
				fmt.Fprintln(stderr, line)
			}
		}})
	if prog != nil {
		prog.done()
	}
	if err != nil {
		return err
	}
	rep.Markdown(stdout)
	fmt.Fprintf(stdout, "\nwrote %s\n", *out)
	return nil
}

func compareReports(dirs []string, out string, stdout io.Writer) error {
	var reps []*wan.Report
	var errs []error
	for _, d := range dirs {
		r, err := wan.ReadReport(d)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		reps = append(reps, r)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	var b strings.Builder
	wan.Compare(&b, dirs, reps)
	fmt.Fprint(stdout, b.String())
	if out != "" {
		if err := os.MkdirAll(out, 0o755); err != nil {
			return err
		}
		path := filepath.Join(out, "compare.md")
		if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "\nwrote %s\n", path)
	}
	return nil
}
