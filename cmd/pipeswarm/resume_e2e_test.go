package main

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/metrics"
)

// resumeSpec is a 3-stage run of 60 steps.
const resumeSpec = `name: resume
seed: 5
eval_interval: 10
model: {d_model: 32, n_layers: 3, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 3, micro_batches: 4, in_flight: 4, pause_timeout: 0}
train: {batch_size: 4, steps: 60, lr: 0.003, warmup: 2}
data: {val_fraction: 0.005}
`

const pauseSpec = `name: e2e-pause
seed: 23
eval_interval: 10
checkpoint_interval: 10
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 2, micro_batches: 2, in_flight: 2, pause_timeout: 120}
train: {batch_size: 4, steps: 80, lr: 0.003, warmup: 2}
data: {val_fraction: 0.005}
`

// The only node of a stage killed (kill -9) mid-run: the run pauses rather than fails,
// saying which stage, and when the node is back on its data directory (listening
// elsewhere now) it resumes from the newest step both stages checkpointed. Every
// step's loss is then the uninterrupted run's (train's), bit for bit.
func TestRunPausesWhileAStageHasNoNodeAndResumesExactlyWhenItIsBack(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, pauseSpec, 2, "--memory-budget", "512MiB")
	out := filepath.Join(dir, "launched")
	done := startLaunch(t, append([]string{specPath, "--key", keyPath, "--out", out, "--quiet"}, peerArgs...)...)
	waitSteps(t, out, 25)
	victim := nodes[1]
	victim.kill9()
	killed := time.Now()
	time.Sleep(3 * time.Second) // paused for a while, with nobody to hold stage 1
	nodes[1] = victim.restart(t)
	nodes[1].addrs(t)
	r := waitLaunch(t, done, 300*time.Second, "after the kill")
	if r.code != 0 {
		t.Fatalf("launch exited %d:\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	t.Logf("finished %s after the kill:\n%s", time.Since(killed).Round(time.Second), r.stdout)
	var paused string
	for _, line := range strings.Split(r.stderr, "\n") {
		if strings.Contains(line, "run paused") || strings.Contains(line, "run resumed") {
			t.Log(line)
			paused += line
		}
	}
	if !strings.Contains(paused, "run paused") || !strings.Contains(paused, "stage 1") || !strings.Contains(paused, "run resumed") {
		t.Errorf("launch did not say it paused for stage 1 and resumed:\n%s", r.stderr)
	}
	if !strings.Contains(r.stdout, "paused after step") {
		t.Errorf("the summary does not list the pause:\n%s", r.stdout)
	}

	sameAsTrain(t, specPath, out, 80)
	for _, n := range nodes {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
	}
}

// kill9 kills the node without warning (SIGKILL) and waits until it has exited.
func (p *nodeProc) kill9() {
	_ = p.cmd.Process.Kill()
	<-p.exited
}

// restart starts a stopped node again on its data directory with the arguments it
// was given, on a new port.
func (p *nodeProc) restart(t *testing.T) *nodeProc {
	t.Helper()
	_ = os.Remove(filepath.Join(p.dir, "addrs")) // the old process's; the new one writes its own
	return startNode(t, p.dir, p.cmd.Args[6:]...)
}

// waitSteps waits, at most 90 s, until the run launched into out has recorded at
// least n step rows, and returns how many it has.
func waitSteps(t *testing.T, out string, n int) int {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		steps, _ := metrics.ReadFile(filepath.Join(out, "metrics.jsonl"))
		if len(steps) >= n {
			return len(steps)
		}
		if time.Now().After(deadline) {
			t.Fatalf("the run made %d steps in 90 s", len(steps))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// launchRun is a `launch` run in the background, as it ended.
type launchRun struct {
	code           int
	stdout, stderr string
	ended          time.Time
}

// startLaunch runs `pipeswarm launch args...` in the background.
func startLaunch(t *testing.T, args ...string) <-chan launchRun {
	done := make(chan launchRun, 1)
	go func() {
		code, stdout, stderr := runCLI(t, append([]string{"launch"}, args...)...)
		done <- launchRun{code, stdout, stderr, time.Now()}
	}()
	return done
}

// waitLaunch waits at most within for a background launch to end.
func waitLaunch(t *testing.T, ch <-chan launchRun, within time.Duration, when string) launchRun {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(within):
		t.Fatalf("launch still running %s %s", within, when)
		return launchRun{}
	}
}

// sameAsTrain checks that the run launched into out recorded its steps (steps of
// them) with the losses, validation losses and tokens `train` of specPath records,
// bit for bit: whatever happened to the run, the pipeline computed what train does.
func sameAsTrain(t *testing.T, specPath, out string, steps int) {
	t.Helper()
	launched, err := metrics.ReadFile(filepath.Join(out, "metrics.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	ref := t.TempDir()
	if code, _, stderr := runCLI(t, "train", specPath, "--out", ref, "--quiet"); code != 0 {
		t.Fatalf("train exited %d: %s", code, stderr)
	}
	trained, err := metrics.ReadFile(filepath.Join(ref, "metrics.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	if len(launched) != len(trained) || len(trained) != steps {
		t.Fatalf("the launched run's metrics.jsonl holds %d steps, train's %d; want %d each", len(launched), len(trained), steps)
	}
	for i := range trained {
		a, b := launched[i], trained[i]
		if a.Step != b.Step {
			t.Fatalf("row %d is step %d, want %d", i, a.Step, b.Step)
		}
		if a.Loss != b.Loss {
			t.Errorf("step %d: launched run's loss %.8f, train's %.8f", b.Step, a.Loss, b.Loss)
		}
		if (a.ValLoss == nil) != (b.ValLoss == nil) || (a.ValLoss != nil && *a.ValLoss != *b.ValLoss) {
			t.Errorf("step %d: validation loss differs: %v, %v", b.Step, a.ValLoss, b.ValLoss)
		}
		if a.Tokens != b.Tokens {
			t.Errorf("step %d: %d tokens recorded, train %d", b.Step, a.Tokens, b.Tokens)
		}
	}
}
