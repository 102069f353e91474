package main

import (
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// killSpec is a 2 × 2 DiLoCo run whose checkpoints fall on outer steps.
const killSpec = `name: e2e-launcher-kill
seed: 31
eval_interval: 120
checkpoint_interval: 10
checkpoint_seconds: 0
model: {d_model: 64, n_layers: 2, n_heads: 2, d_ff: 128, seq_len: 64}
pipeline: {stages: 2, replicas: 2, micro_batches: 2}
train: {batch_size: 8, steps: 120, lr: 0.003, warmup: 2}
diloco: {inner_steps: 10, outer_lr: 1.0, outer_momentum: 0, sync: int8/32}
data: {val_fraction: 0.005}
`

// The launcher of a 2 × 2 DiLoCo run SIGKILLed mid-run: its nodes stop the run on
// their own, keeping their checkpoints, and `launch --resume` continues it; every
// replica's every step then has the loss of the uninterrupted run (train's), bit for
// bit. Kill points: after 25, 64 and 97 steps recorded, or with
// PIPESWARM_LAUNCHER_KILLS=N, N random ones (a longer check, outside CI).
func TestLauncherKilledMidRunResumesExactly(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	points := []int{25, 64, 97}
	if n, err := strconv.Atoi(os.Getenv("PIPESWARM_LAUNCHER_KILLS")); err == nil && n > 0 {
		points = nil
		for range n {
			points = append(points, 3+rand.IntN(112))
		}
	}
	dir := t.TempDir()
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, killSpec, 4, "--memory-budget", "512MiB")
	ref := filepath.Join(dir, "trained")
	if code, _, stderr := runCLI(t, "train", specPath, "--out", ref, "--quiet"); code != 0 {
		t.Fatalf("train exited %d: %s", code, stderr)
	}
	trained, _ := readRun(t, ref)
	resumed := 0
	for i, at := range points {
		out := filepath.Join(dir, "launched-"+strconv.Itoa(i))
		launcher := exec.Command(os.Args[0], append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--quiet"}, peerArgs...)...)
		launcher.Env = append(os.Environ(), "PIPESWARM_AS_CLI=1")
		if err := launcher.Start(); err != nil {
			t.Fatal(err)
		}
		waitSteps(t, out, 2*at) // both replicas' rows
		_ = launcher.Process.Kill()
		_ = launcher.Wait()
		killedAt := len(readRows(t, out))
		// Each node stops the run when it finds its launcher gone, or finishes it
		// first; before this kill each had ended two parts per earlier kill.
		for _, n := range nodes {
			waitEnded(t, n, 2*i+1, 60*time.Second)
		}
		code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--resume", "--quiet"}, peerArgs...)...)
		if code != 0 {
			t.Errorf("kill %d (%d metrics lines recorded): launch --resume exited %d:\n%s\n%s", i, killedAt, code, stdout, stderr)
			continue
		}
		launched, _ := readRun(t, out)
		bad := 0
		for k, b := range trained {
			if a, ok := launched[k]; !ok || a.Loss != b.Loss || (a.ValLoss == nil) != (b.ValLoss == nil) || (a.ValLoss != nil && *a.ValLoss != *b.ValLoss) {
				bad++
			}
		}
		if bad > 0 || len(launched) != len(trained) {
			t.Errorf("kill %d (%d metrics lines recorded): %d of %d rows differ from train's (%d recorded)", i, killedAt, bad, len(trained), len(launched))
			continue
		}
		resumed++
		went := "resumed from step " + regexpFind(stdout, `resumed from step (\d+)`)
		if strings.Contains(stderr, "the run restarts from its start") {
			went = "no common checkpoint yet: restarted from the start"
		}
		t.Logf("kill %d: launcher SIGKILLed with %d metrics lines recorded; %s; all %d rows equal train's", i, killedAt, went, len(trained))
	}
	t.Logf("launch --resume continued exactly after %d of %d launcher kills", resumed, len(points))
}

// readRows returns a run's metrics.jsonl lines, empty if there is none.
func readRows(t *testing.T, out string) []string {
	t.Helper()
	b, _ := os.ReadFile(filepath.Join(out, "metrics.jsonl"))
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

// waitEnded waits until n has ended count runs (finished, or stopped for want of
// their launcher).
func waitEnded(t *testing.T, n *nodeProc, count int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		log := n.stderr.String()
		if strings.Count(log, "launcher gone; stopping the run")+strings.Count(log, "run finished") >= count {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("node did not end its run in %s:\n%s", within, log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func regexpFind(s, expr string) string {
	if m := regexp.MustCompile(expr).FindStringSubmatch(s); m != nil {
		return m[1]
	}
	return "?"
}
