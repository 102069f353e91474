package main

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// recoverSpec evaluates only at the end: every checkpoint a restarted node finds was
// written by the checkpoint rules or by the stop, none by an evaluation.
const recoverSpec = `name: e2e-recover
seed: 29
eval_interval: 200

model: {d_model: 64, n_layers: 2, n_heads: 2, d_ff: 128, seq_len: 64}
pipeline: {stages: 2, micro_batches: 2, in_flight: 2, pause_timeout: 120}
train: {batch_size: 4, steps: 40, lr: 0.003, warmup: 2}
data: {val_fraction: 0.005}
`

// restartMidRun launches a 40-step run on two nodes that have already run an earlier
// launch by the same key (its launcher gone, at another port), stops the stage-1 node
// mid-run with stop, restarts it on its data directory (on a new port) and checks
// that the run resumes and finishes with the uninterrupted run's losses, bit for bit.
func restartMidRun(t *testing.T, stop func(*nodeProc)) {
	dir := t.TempDir()
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, recoverSpec, 2, "--memory-budget", "512MiB")
	earlier := filepath.Join(dir, "earlier")
	if code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", earlier, "--steps", "3", "--quiet"}, peerArgs...)...); code != 0 {
		t.Fatalf("the earlier launch exited %d:\n%s\n%s", code, stdout, stderr)
	}
	out := filepath.Join(dir, "launched")
	done := startLaunch(t, append([]string{specPath, "--key", keyPath, "--out", out, "--quiet"}, peerArgs...)...)
	waitSteps(t, out, 12)
	stop(nodes[1])
	time.Sleep(2 * time.Second) // the launcher sees the stage without a node
	if recs, _ := filepath.Glob(filepath.Join(nodes[1].dir, "runs", "*", "launcher.json")); true {
		for _, r := range recs {
			b, _ := os.ReadFile(r)
			t.Logf("DEBUG %s: %s", r, b)
			b, _ = os.ReadFile(filepath.Join(earlier, "run.json"))
			t.Logf("DEBUG earlier %q", b)
		}
	}
	nodes[1] = nodes[1].restart(t)
	nodes[1].addrs(t)
	r := waitLaunch(t, done, 180*time.Second, "after the restart")
	if r.code != 0 {
		t.Fatalf("launch exited %d:\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	for _, line := range strings.Split(r.stderr+r.stdout, "\n") {
		if strings.Contains(line, "paused") || strings.Contains(line, "resumed") || strings.Contains(line, "stopping") || strings.Contains(line, "from its start") {
			t.Log(line)
		}
	}
	if !strings.Contains(r.stdout, "resumed from step") {
		t.Errorf("the summary does not say the run resumed:\n%s", r.stdout)
	}
	t.Logf("node1 log:\n%s", nodes[1].stderr)
	sameAsTrain(t, specPath, out, 40)
}

// A node SIGTERMed mid-run, with no evaluation since the start, and restarted on its
// data directory after an earlier run by the same launcher key: it finds the
// launcher again and the run finishes exactly as if uninterrupted.
func TestNodeStoppedAndRestartedAfterAnEarlierLaunchResumesExactly(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	restartMidRun(t, func(n *nodeProc) {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-n.exited:
		case <-time.After(15 * time.Second):
			t.Fatal("node still running 15 s after SIGTERM")
		}
	})
}
