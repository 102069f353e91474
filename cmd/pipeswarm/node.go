package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/config"
	"github.com/pipeswarm/pipeswarm/node/daemon"
	"github.com/pipeswarm/pipeswarm/node/datadir"
	"github.com/pipeswarm/pipeswarm/node/launcher"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/shard/backend"
	"github.com/pipeswarm/pipeswarm/shard/compute"
)

// multiFlag collects a repeatable string flag.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func runKeygen(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("keygen", "keygen --out FILE | keygen --show FILE", `
Generate an Ed25519 key for a launcher (or a node) and print its public ID, the
libp2p peer ID (12D3KooW...) that nodes list with --trust. The file is written with
mode 0600 and never overwritten. --show FILE prints the ID of an existing key
instead (a launcher's key, or a node's DIR/identity.key).`, stderr)
	out := fs.String("out", "", "where to write the private key")
	show := fs.String("show", "", "print the peer ID of this existing key file and exit")
	if _, err := parse(fs, args); err != nil {
		return err
	}
	switch {
	case *show != "" && *out != "":
		fmt.Fprintln(stderr, "pipeswarm keygen: give --out FILE (a new key) or --show FILE (an existing one), not both")
		return errUsage
	case *show != "":
		k, err := p2p.LoadKey(*show)
		if err != nil {
			return err
		}
		id, err := p2p.PeerID(k)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, id)
		return nil
	case *out == "":
		fmt.Fprintln(stderr, "pipeswarm keygen: --out FILE is required (or --show FILE to print an existing key's ID)")
		return errUsage
	}
	k, err := p2p.GenerateKey()
	if err != nil {
		return err
	}
	if err := p2p.WriteKey(*out, k); errors.Is(err, os.ErrExist) {
		return fmt.Errorf("%w (keygen never overwrites a key; 'pipeswarm keygen --show %s' prints its ID)", err, *out)
	} else if err != nil {
		return err
	}
	id, err := p2p.PeerID(k)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, id)
	return nil
}

func runNode(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "prune" {
		return runNodePrune(ctx, args[1:], stdout, stderr)
	}
	fs := newFlagSet("node", "node --data-dir DIR [--config FILE] [--listen MULTIADDR]... [--bootstrap MULTIADDR]... [--trust ID]... [--open] [--mdns] [--memory-budget SIZE] [--announce MULTIADDR]... [--relay] [--status ADDR] [--keep-runs N]\n       pipeswarm node prune --data-dir DIR [--keep N]", `
Run a pipeswarm node: join the swarm, accept runs signed by trusted launchers, and
train the pipeline stage each run gives this node. The data directory holds the
node's identity key, its stage checkpoints and a lock (one node per directory); the
node writes its full multiaddrs, one per line, to DIR/addrs once it listens.

At start the node prints its peer ID, its addresses, and one line to give the
launcher, "--peer MULTIADDR/p2p/ID", with the address others can most likely dial
(a public one a peer dialled back, then one announced, another public one, one
through a relay, a LAN one, loopback last) and why it chose it; again when that
changes. It says what it computes with.

At start it finds out whether other peers can dial it (AutoNAT v2 with the peers
it knows) and prints one line, "reachability: reachable at ADDR" or
"reachability: not reachable: WHY; fix: WHAT TO DO", and again when that changes.
A node that is not reachable reserves a slot on a relay (relays:, else the
bootstrap peers that serve one) and upgrades relayed connections to direct ones
by hole punching.

Every node serves its status on the unix socket DIR/status.sock, where 'pipeswarm
status --data-dir DIR' reads it. With --status ADDR (host:port; port 0 picks a free
one) it also serves a status page at http://ADDR/ (identity, reachability, the
launchers it trusts, open, memory budget, compute, peers, the runs it serves with
their loss, recent warnings), the same as JSON at /api/status, and Prometheus
metrics at /metrics; it writes the address bound to DIR/status_addr. Off by
default, so that many nodes can share a machine.

Each run leaves a folder in DIR/runs (checkpoints, optimiser state). The node keeps
the newest --keep-runs (keep_runs:, default 5) and removes older ones at start and
when a run ends, never one it holds nor one a kept run resumed from. 'pipeswarm
node prune --data-dir DIR [--keep N]' does the same by hand while the node is
stopped.

Stops cleanly on Ctrl-C or SIGTERM: each run writes its stage checkpoint and tells
its launcher. Flags override the config file (see examples/node.yaml).`, stderr)
	cfgPath := fs.String("config", "", "node config file (YAML)")
	dataDir := fs.String("data-dir", "", "data directory (overrides data_dir)")
	var listen, bootstrap, trust, announce multiFlag
	fs.Var(&listen, "listen", "listen multiaddr, repeatable (default TCP and QUIC on every interface, on ports chosen at the first start and kept in DIR/listen)")
	fs.Var(&bootstrap, "bootstrap", "peer multiaddr with /p2p/ID to dial at start, repeatable")
	fs.Var(&trust, "trust", "launcher peer ID whose runs this node accepts, repeatable")
	open := fs.Bool("open", false, "accept runs from ANY launcher: anyone who reaches this node can make it train their run (overrides open)")
	fs.Var(&announce, "announce", "address others should dial, e.g. a forwarded port /ip4/PUBLIC_IP/tcp/4001 (no /p2p), repeatable (adds to announce)")
	relay := fs.Bool("relay", false, "serve as a circuit relay for nodes that are not reachable (a node with a public address)")
	mdns := fs.Bool("mdns", false, "discover peers on the LAN with mDNS")
	budget := fs.String("memory-budget", "", "memory this node may use for stages, e.g. 4GiB (overrides memory_budget)")
	corpusPath := fs.String("corpus", "", "local copy of run text, used where it hashes the same as the launcher's (overrides corpus)")
	exportConsent := fs.String("export", "", "allow or deny: whether a run's launcher may collect this node's stage weights to assemble the model, where the run's spec says export: allowed (overrides export; default allow)")
	statusAddr := fs.String("status", "", "serve the status page and /metrics on host:port, e.g. 127.0.0.1:9090 or 127.0.0.1:0 (overrides status)")
	verbose := fs.Bool("v", false, "debug logging (same as --log-level debug)")
	logf := addLogFlags(fs, slog.LevelInfo)
	onlyBackend := fs.String("backend", "", "run stages only on this compute backend, cpu32 or bf16 (overrides backends; default: every one this binary and CPU can run)")
	gemm := fs.String("gemm", "", gemmUsage+" (overrides gemm; default auto)")
	threads := fs.Int("threads", 0, "compute threads for the stages held here (default: every core); set it when several nodes share a machine")
	keepRuns := fs.Int("keep-runs", -1, "run folders to keep in DIR/runs, the newest; 0 keeps every one (overrides keep_runs; default 5)")
	faultStall := fs.Int("fault-stall-sync", 0, "fault injection for tests: hang mid all-reduce in the outer step after inner step N")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		fmt.Fprintf(stderr, "pipeswarm node: unexpected arguments %q\n", pos)
		return errUsage
	}
	cfg := &config.Config{}
	if *cfgPath != "" {
		// Decode without validating: the flags below may supply what the file lacks.
		src, err := os.ReadFile(*cfgPath)
		if err != nil {
			return err
		}
		if cfg, err = config.Decode(src, *cfgPath); err != nil {
			return err
		}
	}
	if *dataDir != "" {
		cfg.DataDir = *dataDir
	}
	if len(listen) > 0 {
		cfg.Listen = listen
	}
	cfg.Bootstrap = append(cfg.Bootstrap, bootstrap...)
	cfg.Trust = append(cfg.Trust, trust...)
	cfg.Open = cfg.Open || *open
	if len(trust) > 0 || cfg.Open {
		// --trust names the launcher the example config's placeholder stands for.
		cfg.Trust = slices.DeleteFunc(cfg.Trust, func(s string) bool { return s == config.TrustPlaceholder })
	}
	if *keepRuns >= 0 {
		cfg.KeepRuns = *keepRuns
	}
	cfg.Announce = append(cfg.Announce, announce...)
	cfg.Relay = cfg.Relay || *relay
	cfg.MDNS = cfg.MDNS || *mdns
	if *budget != "" {
		cfg.MemoryBudget = *budget
	}
	if *corpusPath != "" {
		cfg.Corpus = *corpusPath
	}
	if *statusAddr != "" {
		cfg.Status = *statusAddr
	}
	if *exportConsent != "" {
		cfg.Export = *exportConsent // Validate names the flag if it is neither allow nor deny
	}
	if *onlyBackend != "" {
		cfg.Backends = []string{*onlyBackend}
	}
	if *gemm != "" {
		cfg.GEMM = *gemm
	}
	cfg.EnsureDefaults()
	if err := cfg.Validate(); err != nil {
		return err
	}
	if *threads < 0 {
		fmt.Fprintf(stderr, "pipeswarm node: --threads %d: want ≥ 1 (or 0 for every core)\n", *threads)
		return errUsage
	}
	compute.SetWorkers(*threads)
	if *verbose {
		*logf.level = "debug"
	}
	base, err := logf.logger(stderr, stderr, "node")
	if err != nil {
		return err
	}
	log := base.With("sys", "node")
	if err := useGEMM(cfg.GEMM, log); err != nil {
		return err
	}
	d, err := daemon.New(ctx, cfg, log)
	if err != nil {
		return err
	}
	if *faultStall > 0 {
		log.Warn("fault injection: stages will hang in the all-reduce after step", "step", *faultStall)
		d.SetFaultStallSync(*faultStall)
	}
	fmt.Fprintf(stdout, "peer ID %s\n", d.ID())
	for _, a := range d.Addrs() {
		fmt.Fprintf(stdout, "listening on %s\n", a)
	}
	var peerLine string
	tellPeer := func(r p2p.Reachability) {
		addr, why := p2p.Dialable(d.Addrs(), r, cfg.Announce)
		if addr == "" || addr == peerLine {
			return
		}
		peerLine = addr
		fmt.Fprintf(stdout, "to add this node to a run, give the launcher: --peer %s\n  (%s)\n", addr, why)
	}
	tellPeer(p2p.Reachability{})
	if a := d.StatusAddr(); a != "" {
		fmt.Fprintf(stdout, "status page http://%s/\n", a)
	}
	nctx, stopNotices := context.WithCancel(ctx)
	noticesDone := make(chan struct{})
	go func() {
		defer close(noticesDone)
		d.ReachabilityNotices(nctx, func(r p2p.Reachability) {
			fmt.Fprintf(stdout, "reachability: %s\n", r.Line())
			tellPeer(r)
		})
	}()
	defer func() { stopNotices(); <-noticesDone }()
	names := cfg.Backends
	if len(names) == 0 {
		names = backend.Available()
	}
	for _, name := range names {
		if b, err := backend.Open(name); err == nil {
			log.Info("compute backend", "backend", name, "precision", b.Precision(), "gemm", b.GEMM().Describe(), "impl", b.Describe())
		}
	}
	// Every backend of this build computes on the CPU; a GPU owner should know.
	log.Info("CPU only: this build has no GPU backend", "compute_threads", compute.Workers())
	log.Info("node running", "precisions", cfg.Precisions(), "compute_threads", compute.Workers(), "data_dir", cfg.DataDir, "trust", len(cfg.Trust), "open", cfg.Open,
		"memory_budget", cfg.MemoryBudget, "keep_runs", cfg.KeepRuns, "export", cfg.Export)
	err = d.Run(ctx)
	log.Info("node stopped")
	return err
}

func runLaunch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("launch", "launch SPEC --key FILE --peer MULTIADDR... [--out DIR] [--data PATH] [--steps N] [--resume | --force]\n       pipeswarm launch SPEC --plan-only --nodes N --node-memory SIZE", `
Launch a pipelined run of the spec SPEC across nodes: ask each --peer what it can
hold, give every pipeline stage of every replica pipeline a peer (pipeline.replicas
× pipeline.stages of them), sign the plan with --key (the nodes must trust its ID),
start the run, and watch it: step, loss, validation loss, tokens/s, and with replicas
each outer step's sync time, bytes and weight hash. The launcher reads the training
text (--data or data.path, else the built-in corpus) and serves each first stage the
shard it trains on over libp2p; nodes verify it by sha256 and cache it.
Writes metrics.jsonl, spec.yaml and loss.png into DIR; each node keeps its own stage
checkpoint and optimiser state. Where the spec says export: allowed and every node
consents (its export: allow, the default), the launcher then collects the stages'
final weights into DIR/model.safetensors with config.json ('pipeswarm export' does it
later); export: never, the default, keeps the weights on the nodes. Exits 0 when the run has finished, non-zero with the
reason otherwise: a stage that fails, or replicas whose global weights differ. With
replicas, a stage that dies or stalls stops only its replica pipeline. A stage left
with no live node pauses the run, for up to pipeline.pause_timeout seconds (default
600; 0 fails at once): once nodes that hold every stage's checkpoint of a common step
answer again (restarted on their data directories), it resumes from that step.
Every stage keeps its two newest checkpoints (each evaluation step, and when its node
stops); --resume continues an interrupted run from the newest step all of them
hold, on the nodes that hold them, appending to DIR/metrics.jsonl.
A directory that holds a run is never written over: without --out a new run goes to
runs/NAME, or runs/NAME-2, runs/NAME-3, … if that holds one; an --out DIR that holds
a run is refused unless --resume continues it or --force overwrites it. A launch that
fails before its first step leaves no run directory behind.
The spec, its text and the --peer addresses are checked before any node is asked.
With --plan-only, launch staffs the run on --nodes N nodes of --node-memory SIZE each
and prints each stage's memory (weights, gradients, optimiser moments, activations,
workspace, and an async stage's past weight versions) and node, then exits without
training: 0 if every stage fits a node.

`+specHelp(), stderr)
	keyPath := fs.String("key", "", "launcher key written by 'pipeswarm keygen' (required)")
	var peers multiFlag
	fs.Var(&peers, "peer", "a node's full address (a multiaddr ending in /p2p/ID, as the node prints it at start), or the path of its DIR/addrs file (or of DIR), repeatable")
	out := fs.String("out", "", "output directory (default runs/<spec name>, or runs/<spec name>-N if that holds a run)")
	force := fs.Bool("force", false, "overwrite the run in --out DIR")
	dataPath := fs.String("data", "", "training text, read here and served to the nodes over libp2p (overrides data.path)")
	steps := fs.Int("steps", 0, "number of optimiser steps (overrides train.steps)")
	be := fs.String("backend", "", "compute backend the nodes run, cpu32 or bf16 (overrides model.precision: fp32 or bf16)")
	quiet := fs.Bool("quiet", false, "no progress display")
	resume := fs.Bool("resume", false, "continue the interrupted run in --out DIR (same spec and overrides) from the newest step whose checkpoint the nodes still hold for every stage")
	planOnlyF := fs.Bool("plan-only", false, "print the staffing plan with each stage's memory for --nodes N of --node-memory SIZE, and exit without training")
	nodes := fs.Int("nodes", 0, "with --plan-only: how many nodes to plan for")
	nodeMemory := fs.String("node-memory", "", "with --plan-only: each node's memory budget, such as 24GiB")
	logf := addLogFlags(fs, slog.LevelInfo)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if !*planOnlyF && (*nodes != 0 || *nodeMemory != "") {
		fmt.Fprintln(stderr, "pipeswarm launch: --nodes and --node-memory describe nodes to plan for: use them with --plan-only")
		return errUsage
	}
	base, err := logf.logger(stderr, stderr, "launch")
	if err != nil {
		return err
	}
	if len(pos) > 1 {
		fmt.Fprintf(stderr, "pipeswarm launch: one SPEC at most, got %q\n", pos)
		return errUsage
	}
	sp, err := loadSpec(pos, *dataPath, *steps, base.With("sys", "launch"))
	if err != nil {
		return err
	}
	if *be != "" {
		p, err := backend.PrecisionOf(*be)
		if err != nil {
			return fmt.Errorf("--backend: %w", err)
		}
		sp.Model.Precision = p
	}
	if *planOnlyF {
		if len(peers) > 0 {
			fmt.Fprintln(stderr, "pipeswarm launch: --plan-only plans for --nodes N of --node-memory SIZE, not for --peer")
			return errUsage
		}
		return planOnly(stdout, sp, *nodes, *nodeMemory)
	}
	if *keyPath == "" {
		fmt.Fprintln(stderr, "pipeswarm launch: --key FILE is required (make one with 'pipeswarm keygen --out FILE')")
		return errUsage
	}
	key, err := p2p.LoadKey(*keyPath)
	if err != nil {
		return err
	}
	addrs, err := peerAddrs(peers)
	if err != nil {
		return err
	}
	if len(addrs) == 0 {
		fmt.Fprintln(stderr, "pipeswarm launch: at least one --peer is required")
		return errUsage
	}
	dir, note, err := runDir(*out, sp.Name, *resume, *force)
	if err != nil {
		return err
	}
	if note != "" {
		fmt.Fprintln(stderr, note)
	}
	*out = dir
	created := !exists(dir)
	log := base.With("sys", "launch")
	prog := newProgress(stderr, sp.Train.Steps, *quiet)
	res, err := launcher.Launch(ctx, launcher.Options{Spec: sp, Key: key, Peers: addrs, OutDir: *out, Log: log, Resume: *resume,
		OnStep: prog.step, OnPlan: func(as []assign.Assignment) {
			for _, a := range as {
				cell := fmt.Sprintf("stage %d", a.Stage)
				if sp.Pipeline.Replicas > 1 {
					cell = fmt.Sprintf("stage %d × replica %d", a.Stage, a.Replica)
				}
				fmt.Fprintf(stderr, "%s  layers [%d,%d)  peer %s  needs %s\n", cell, a.Range.Lo, a.Range.Hi, a.Peer, assign.FormatBytes(a.Need))
			}
		}, OnOuter: func(rows []metrics.Outer) {
			if *quiet || len(rows) == 0 {
				return
			}
			var bytes int64
			var slowest float64
			for _, r := range rows {
				bytes += r.SyncBytes
				slowest = max(slowest, r.SyncS)
			}
			prog.note(fmt.Sprintf("outer step %d of stage %d after step %d: %d replicas, sync %.2fs, %s sent, weights %s",
				rows[0].OuterStep, rows[0].Stage, rows[0].Step, len(rows), slowest, assign.FormatBytes(bytes), rows[0].WeightsHash))
		}})
	prog.done()
	if err != nil {
		dropUnused(dir, created)
	}
	if res != nil && res.Steps > 0 {
		printLaunchSummary(stdout, sp, res, *out)
	}
	if res != nil && res.Steps > 0 && (errors.Is(err, context.Canceled) || errors.Is(err, launcher.ErrStageDown)) {
		fmt.Fprintf(stderr, "resume with: %s\n", resumeCommand("launch", args, *out))
	}
	return err
}

func runNodePrune(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("node prune", "node prune --data-dir DIR [--keep N]", `
Remove the folders of old runs from a stopped node's data directory (DIR/runs/<run
ID>: stage checkpoints, optimiser state): all but the newest N, sparing every run a
kept one resumed from. A running node does this itself (keep_runs, --keep-runs);
prune refuses a directory a node is running on.`, stderr)
	dataDir := fs.String("data-dir", "", "the node's data directory (required)")
	keep := fs.Int("keep", config.DefaultKeepRuns, "how many of the newest run folders to keep (at least 1)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	switch {
	case len(pos) > 0:
		fmt.Fprintf(stderr, "pipeswarm node prune: unexpected arguments %q\n", pos)
		return errUsage
	case *dataDir == "":
		fmt.Fprintln(stderr, "pipeswarm node prune: --data-dir DIR is required")
		return errUsage
	case *keep < 1:
		fmt.Fprintf(stderr, "pipeswarm node prune: --keep %d: want at least 1 (the newest run may still be resumed)\n", *keep)
		return errUsage
	}
	if _, err := os.Stat(*dataDir); err != nil {
		return fmt.Errorf("node prune: %w", err)
	}
	// Holding the lock proves no node runs there, so no run is in progress.
	dir, err := datadir.Open(*dataDir)
	if err != nil {
		return fmt.Errorf("node prune: %w (a running node prunes by itself: keep_runs, --keep-runs)", err)
	}
	defer dir.Close()
	done, err := daemon.PruneRuns(dir.Path, *keep, nil)
	var freed int64
	for _, f := range done {
		freed += f.Bytes
		fmt.Fprintf(stdout, "removed run %s (%s, last written %s)\n", f.ID, assign.FormatBytes(f.Bytes), f.Written.Format(time.DateTime))
	}
	left, lerr := daemon.RunFolders(dir.Path)
	fmt.Fprintf(stdout, "pruned %d run folder(s), freed %s; %d kept\n", len(done), assign.FormatBytes(freed), len(left))
	return errors.Join(err, lerr)
}

// printLaunchSummary prints what a launched run did: its figures are this launch's
// own (the steps it took, their tokens, time and traffic), whether it ran the
// whole run, went on from an earlier launch, or stopped early.
func printLaunchSummary(w io.Writer, sp *spec.Spec, res *launcher.Result, out string) {
	what := fmt.Sprintf("%d steps", res.StepsRun)
	if res.FromStep > 0 || res.StepsRun != res.Steps {
		var notes []string
		if res.FromStep > 0 {
			notes = append(notes, fmt.Sprintf("resumed from step %d", res.FromStep))
		}
		if again := res.StepsRun - (res.Steps - res.FromStep); again > 0 {
			notes = append(notes, fmt.Sprintf("%d of them taken again after a pause", again))
		}
		notes = append(notes, fmt.Sprintf("now at step %d of %d", res.Steps, sp.Train.Steps))
		what = fmt.Sprintf("%d steps (%s)", res.StepsRun, strings.Join(notes, ", "))
	} else if res.Steps < sp.Train.Steps {
		what = fmt.Sprintf("%d of %d steps", res.StepsRun, sp.Train.Steps)
	}
	figures := fmt.Sprintf("loss %.4f", res.Loss)
	if !math.IsNaN(res.ValLoss) {
		figures += fmt.Sprintf(", val_loss %.4f", res.ValLoss)
	}
	if res.StepsRun > 0 && res.TimeRun > 0 {
		figures += fmt.Sprintf(", %.0f tokens/s", float64(res.TokensRun)/res.TimeRun.Seconds())
	}
	fmt.Fprintf(w, "run %016x: %s in %s: %s\n", res.RunID, what, roundDuration(res.TimeRun), figures)
	perToken := func(b int64, steps int, dir string) string {
		if b == 0 || steps == 0 {
			return dir + " not reported (its stage stopped without saying what it sent)"
		}
		return fmt.Sprintf("%.1f bytes/token %s", float64(b)/float64(steps)/float64(sp.TokensPerStep()), dir)
	}
	for i := range res.BoundaryFwd {
		fmt.Fprintf(w, "boundary %d→%d: %s, %s\n", i, i+1, perToken(res.BoundaryFwd[i], res.BoundaryFwdSteps[i], "forward"),
			perToken(res.BoundaryBwd[i], res.BoundaryBwdSteps[i], "backward"))
	}
	R := sp.Pipeline.Replicas
	if R > 1 {
		var sync int64
		for _, row := range res.SyncBytes {
			for _, b := range row {
				sync += b
			}
		}
		perStep := 0.0
		if res.StepsRun > 0 {
			perStep = float64(sync) / float64(res.StepsRun) / float64(R)
		}
		fmt.Fprintf(w, "outer steps: %d; all-reduce bytes sent, all replicas and stages: %s (%.1f bytes per inner step per replica pipeline)\n",
			res.OuterSteps, assign.FormatBytes(sync), perStep)
		if len(res.Broken) > 0 {
			fmt.Fprintf(w, "replica pipelines stopped early: %v\n", res.Broken)
		}
		if len(res.Rejoined) > 0 {
			fmt.Fprintf(w, "replica pipelines rejoined: %v\n", res.Rejoined)
		}
		if res.Repaired > 0 {
			fmt.Fprintf(w, "cells re-paired (taken by the survivor of another broken pipeline): %d\n", res.Repaired)
		}
	}
	for _, p := range res.Pauses {
		went := fmt.Sprintf("resumed from step %d", p.ResumedAt)
		switch {
		case p.Restarted:
			went = "no step had a checkpoint of every stage: restarted from the start"
		case p.ResumedAt == 0:
			went = "not resumed"
		}
		fmt.Fprintf(w, "paused after step %d for %s (%s); %s\n", p.Recorded,
			time.Duration(p.WaitedS*float64(time.Second)).Round(time.Second), p.Why, went)
	}
	for r, row := range res.Checkpoints {
		for s, c := range row {
			cell := fmt.Sprintf("stage %d", s)
			if R > 1 {
				cell = fmt.Sprintf("stage %d of replica %d", s, r)
			}
			if c == "" {
				c = "not reported (its node stopped without saying; launch --resume finds the newest on the nodes)"
			}
			fmt.Fprintf(w, "%s checkpoint: %s\n", cell, c)
		}
	}
	switch {
	case res.Model != nil:
		fmt.Fprintf(w, "model of step %d: %s and %s (pipeswarm eval --checkpoint %s)\n", res.Model.Step, res.Model.Model, res.Model.Config, out)
	case res.ExportError != "":
		fmt.Fprintf(w, "model not assembled: %s\n", res.ExportError)
	case sp.Export == spec.ExportNever && res.Steps == sp.Train.Steps:
		fmt.Fprintf(w, "model not assembled: the spec says export: never, so its weights stay on the nodes that trained them (export: allowed has launch collect them into %s)\n",
			filepath.Join(out, train.CheckpointFile))
	}
	fmt.Fprintf(w, "wrote %s\n", out)
}

// roundDuration rounds d for people: to 0.1 s below 10 s, to 1 s above.
func roundDuration(d time.Duration) time.Duration {
	if d < 10*time.Second {
		return d.Round(100 * time.Millisecond)
	}
	return d.Round(time.Second)
}

// resumeCommand is the command line that resumes a run started by `pipeswarm cmd
// args...` into out: the same arguments, --out out and --resume (any --force dropped).
func resumeCommand(cmd string, args []string, out string) string {
	words := []string{"pipeswarm", cmd}
	for i := 0; i < len(args); i++ {
		a := args[i]
		name, _, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if strings.HasPrefix(a, "-") && (name == "out" || name == "resume" || name == "force") {
			if name == "out" && !hasValue {
				i++ // its value
			}
			continue
		}
		words = append(words, a)
	}
	words = append(words, "--out", out, "--resume")
	for i, w := range words {
		words[i] = shellQuote(w)
	}
	return strings.Join(words, " ")
}

// shellQuote quotes s for a POSIX shell if it needs it.
func shellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_./=:,+@%", r))
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func runExport(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("export", "export RUN_DIR --key FILE --peer MULTIADDR...", `
Assemble the model of a launched run from its nodes' checkpoints into
RUN_DIR/model.safetensors (Llama tensor names, as train writes it) with config.json,
as launch does at the end of a run whose spec says export: allowed: after an
interrupted run, or once a node that refused has consented. It asks the --peer nodes
which checkpoints of the run (RUN_DIR/run.json) they hold and takes every stage's of
the newest step they all have; with replicas, replica 0's (after the run's last outer
step every replica holds the global weights, and another replica's stands in for it).
A node gives its weights only to the run's launcher, so --key must be the key the
run was launched with; only where the run's spec says export: allowed and the node
consents (its config's export: allow, the default; --export on the node).`, stderr)
	keyPath := fs.String("key", "", "the launcher key the run was launched with (required)")
	var peers multiFlag
	fs.Var(&peers, "peer", "multiaddr (with /p2p/ID) of a node that holds stages of the run, repeatable; or a file of them (a node's DIR/addrs)")
	logf := addLogFlags(fs, slog.LevelWarn)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		fmt.Fprintln(stderr, "pipeswarm export: one RUN_DIR is required")
		fs.Usage()
		return errUsage
	}
	if *keyPath == "" {
		fmt.Fprintln(stderr, "pipeswarm export: --key FILE is required (the launcher key the run was launched with)")
		return errUsage
	}
	log, err := logf.logger(stderr, stderr, "export")
	if err != nil {
		return err
	}
	key, err := p2p.LoadKey(*keyPath)
	if err != nil {
		return err
	}
	addrs, err := peerAddrs(peers)
	if err != nil {
		return err
	}
	res, err := launcher.Export(ctx, launcher.ExportOptions{Key: key, Peers: addrs, RunDir: pos[0], Log: log.With("sys", "export")})
	if err != nil {
		return err
	}
	for _, f := range res.From {
		fmt.Fprintln(stdout, f)
	}
	fmt.Fprintf(stdout, "model of step %d: %s and %s (pipeswarm eval --checkpoint %s)\n", res.Step, res.Model, res.Config, pos[0])
	return nil
}

// peerAddrs expands --peer values: a node's full address, or a node's addrs file
// (or its data directory, which holds one), by a relative or absolute path.
func peerAddrs(vals []string) ([]string, error) {
	var out []string
	for _, v := range vals {
		st, err := os.Stat(v)
		if err != nil {
			_, aerr := launcher.CheckPeerAddr(v)
			switch {
			case aerr == nil:
				out = append(out, v)
			case errors.Is(aerr, launcher.ErrNotMultiaddr):
				return nil, fmt.Errorf("--peer %s: no such file, and %v", v, aerr)
			default:
				return nil, fmt.Errorf("--peer %w", aerr)
			}
			continue
		}
		path := v
		if st.IsDir() {
			path = filepath.Join(v, "addrs")
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("--peer %s: %w", v, err)
		}
		// A node's addrs file lists each of its addresses; one per node is enough.
		var first string
		for _, line := range strings.Split(string(b), "\n") {
			if line = strings.TrimSpace(line); line != "" {
				first = line
				break
			}
		}
		if first == "" {
			return nil, fmt.Errorf("--peer %s: %s holds no address (a node writes its addresses there once it listens)", v, path)
		}
		if _, err := launcher.CheckPeerAddr(first); err != nil {
			return nil, fmt.Errorf("--peer %s: the first line of %s: %w", v, path, err)
		}
		out = append(out, first)
	}
	return out, nil
}
