package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// Streaming DiLoCo stopped and resumed: a run stopped after a step whose overlapped
// all-reduce was under way begins it again on resume, as train does, and takes
// train's steps exactly (every replica's loss, bit for bit).
func TestFragmentsStoppedAndResumedMatchTrain(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	spec := `name: e2e-fragments-resume
seed: 17
eval_interval: 8
checkpoint_interval: 4
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 2, micro_batches: 2, replicas: 2, pause_timeout: 0}
train: {batch_size: 4, steps: 40, lr: 0.003, warmup: 2}
diloco: {inner_steps: 4, outer_lr: 0.8, outer_momentum: 0.5, sync: int8/32, fragments: 2}
data: {val_fraction: 0.01}
`
	dir := t.TempDir()
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, spec, 4)
	out := filepath.Join(dir, "launched")
	first := startLaunch(t, append([]string{specPath, "--key", keyPath, "--out", out, "--quiet"}, peerArgs...)...)
	for deadline := time.Now().Add(90 * time.Second); !stepRowsSoFar(out)[[2]int{13, 1}]; time.Sleep(20 * time.Millisecond) {
		select {
		case r := <-first:
			t.Fatalf("launch ended before step 13: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("replica 1 did not reach step 13 within 90 s")
		}
	}
	for _, n := range nodes {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
	}
	for i, n := range nodes {
		select {
		case <-n.exited:
		case <-time.After(15 * time.Second):
			t.Fatalf("node %d still running 15 s after SIGTERM", i)
		}
	}
	waitLaunch(t, first, 30*time.Second, "after its nodes stopped")
	var again []string
	for i, n := range nodes {
		nodes[i] = n.restart(t)
		again = append(again, "--peer", nodes[i].addrs(t))
	}
	if code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--resume", "--quiet"}, again...)...); code != 0 {
		t.Fatalf("launch --resume exited %d:\n%s\n%s", code, stdout, stderr)
	}
	var rec struct {
		Resume struct{ Step int } `json:"resumed_from"`
	}
	if b, err := os.ReadFile(filepath.Join(out, "run.json")); err != nil || json.Unmarshal(b, &rec) != nil {
		t.Fatalf("run.json: %v", err)
	}
	// Checkpoints every 4 steps, where fragment 1's all-reduce begins: the run resumes
	// after one of them (or a later common step) with an all-reduce to begin again.
	if rec.Resume.Step == 0 {
		t.Fatal("resumed from the start: no checkpoint every stage holds")
	}
	t.Logf("resumed after step %d", rec.Resume.Step)
	ref := filepath.Join(dir, "trained")
	if code, _, stderr := runCLI(t, "train", specPath, "--out", ref, "--quiet"); code != 0 {
		t.Fatalf("train exited %d: %s", code, stderr)
	}
	launched, _ := readRun(t, out)
	trained, _ := readRun(t, ref)
	if len(trained) != 80 || len(launched) != 80 {
		t.Fatalf("%d and %d loss rows, want 80", len(launched), len(trained))
	}
	for k, b := range trained {
		if a := launched[k]; a.Loss != b.Loss {
			t.Errorf("step %d replica %d: launched %.9f, trained %.9f", k[0], k[1], a.Loss, b.Loss)
		}
	}
	for _, n := range nodes {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
		<-n.exited
	}
}
