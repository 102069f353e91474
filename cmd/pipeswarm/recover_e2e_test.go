package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/spec"
)

// recoverSpec evaluates only at the end: every checkpoint a restarted node finds was
// written by the checkpoint rules or by the stop, none by an evaluation.
const recoverSpec = `name: e2e-recover
seed: 29
eval_interval: 200
checkpoint_interval: 5
checkpoint_seconds: 0
model: {d_model: 64, n_layers: 2, n_heads: 2, d_ff: 128, seq_len: 64}
pipeline: {stages: 2, micro_batches: 2, in_flight: 2, pause_timeout: 120}
train: {batch_size: 4, steps: 40, lr: 0.003, warmup: 2}
data: {val_fraction: 0.005}
`

// restartMidRun launches a run of spec src on two nodes that have already run an
// earlier launch by the same key (its launcher gone, at another port), waits until
// ready says so, stops the stage-1 node with stop, restarts it on its data directory
// (on a new port) and checks that the run finishes with the uninterrupted run's
// losses, bit for bit, and that the summary says how it went on (want).
func restartMidRun(t *testing.T, src string, ready func(out string, node1 *nodeProc), stop func(*nodeProc), want string) {
	dir := t.TempDir()
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, src, 2, "--memory-budget", "512MiB")
	earlier := filepath.Join(dir, "earlier")
	if code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", earlier, "--steps", "3", "--quiet"}, peerArgs...)...); code != 0 {
		t.Fatalf("the earlier launch exited %d:\n%s\n%s", code, stdout, stderr)
	}
	out := filepath.Join(dir, "launched")
	done := startLaunch(t, append([]string{specPath, "--key", keyPath, "--out", out, "--quiet"}, peerArgs...)...)
	ready(out, nodes[1])
	stop(nodes[1])
	time.Sleep(2 * time.Second) // the launcher sees the stage without a node
	nodes[1] = nodes[1].restart(t)
	nodes[1].addrs(t)
	r := waitLaunch(t, done, 180*time.Second, "after the restart")
	if r.code != 0 {
		t.Fatalf("launch exited %d:\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	for _, line := range strings.Split(r.stderr+r.stdout, "\n") {
		if strings.Contains(line, "paused") || strings.Contains(line, "resumed") || strings.Contains(line, "stopping") || strings.Contains(line, "restart") || strings.Contains(line, "checkpoint") {
			t.Log(line)
		}
	}
	if !strings.Contains(r.stdout, want) {
		t.Errorf("the summary does not say %q:\n%s", want, r.stdout)
	}
	sp, err := spec.Parse([]byte(src), "spec")
	if err != nil {
		t.Fatal(err)
	}
	sameAsTrain(t, specPath, out, sp.Train.Steps)
}

func afterSteps(t *testing.T, n int) func(string, *nodeProc) {
	return func(out string, _ *nodeProc) { waitSteps(t, out, n) }
}

func sigterm(t *testing.T) func(*nodeProc) {
	return func(n *nodeProc) {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-n.exited:
		case <-time.After(15 * time.Second):
			t.Fatal("node still running 15 s after SIGTERM")
		}
	}
}

// A node SIGTERMed mid-run, with no evaluation since the start, and restarted on its
// data directory after an earlier run by the same launcher key: it tells the launcher,
// which stops the other stage after the same step; restarted, the node finds the
// launcher again and the run finishes exactly as if uninterrupted.
func TestNodeStoppedAndRestartedAfterAnEarlierLaunchResumesExactly(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	restartMidRun(t, strings.Replace(recoverSpec, "checkpoint_interval: 5\n", "", 1), afterSteps(t, 12), sigterm(t), "resumed from step")
}

// The same with SIGKILL: the run resumes from the last checkpoint every stage took by
// the count rule.
func TestNodeKilledAndRestartedAfterAnEarlierLaunchRejoins(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	restartMidRun(t, recoverSpec, afterSteps(t, 12), (*nodeProc).kill9, "resumed from step 10")
}

// With the time rule only, every stage checkpoints the step the launcher picked; a
// node killed after it resumes from there.
func TestNodeKilledAfterATimedCheckpointResumesFromIt(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	src := strings.NewReplacer("checkpoint_interval: 5\ncheckpoint_seconds: 0\n", "checkpoint_seconds: 1\n", "steps: 40", "steps: 400").Replace(recoverSpec)
	ready := func(out string, n *nodeProc) {
		deadline := time.Now().Add(60 * time.Second)
		for {
			if ck, _ := filepath.Glob(filepath.Join(n.dir, "runs", "*", "stage-1.state.safetensors")); len(ck) == 2 { // the earlier run's and this one's (the state is written last)
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("no checkpoint by time on the stage-1 node in 60 s")
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	restartMidRun(t, src, ready, (*nodeProc).kill9, "resumed from step")
}

// No checkpoint at all before the kill: the run starts again from its beginning, says
// so, and still ends as the uninterrupted run.
func TestNodeKilledBeforeAnyCheckpointRestartsTheRunFromItsStart(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	spec := strings.Replace(recoverSpec, "checkpoint_interval: 5\n", "", 1)
	restartMidRun(t, spec, afterSteps(t, 12), (*nodeProc).kill9, "no step had a checkpoint of every stage: restarted from the start")
}

// A node whose disk is full cannot write its checkpoint: it says so, and the launcher
// stops the run with that reason at once, rather than pause for a node that is there.
// The stage-1 node's data directory is a tmpfs of 1 MiB (it needs root to mount).
func TestACheckpointThatCannotBeWrittenStopsTheRunSayingWhy(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	small := filepath.Join(dir, "node1")
	if err := os.MkdirAll(small, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", small).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a small tmpfs (needs root): %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", small).Run() })
	specPath, keyPath, _, peerArgs := startSwarm(t, dir, strings.Replace(recoverSpec, "pause_timeout: 120", "pause_timeout: 600", 1), 2, "--memory-budget", "512MiB")
	began := time.Now()
	code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", filepath.Join(dir, "launched"), "--quiet"}, peerArgs...)...)
	took := time.Since(began)
	last := strings.TrimSpace(stderr[strings.LastIndex(stderr, "pipeswarm launch:"):])
	t.Logf("launch exited %d after %s: %s", code, took.Round(time.Millisecond), last)
	if code == 0 {
		t.Fatalf("launch exited 0 with a stage that could not checkpoint:\n%s\n%s", stdout, stderr)
	}
	if !strings.Contains(last, "stage 1") || !strings.Contains(last, "could not write its checkpoint") || !strings.Contains(last, "no space left on device") {
		t.Errorf("launch's error does not say stage 1 could not write its checkpoint for want of space:\n%s", last)
	}
	if strings.Contains(stderr, "run paused") {
		t.Errorf("the run was paused, waiting for a node that is there:\n%s", stderr)
	}
}
