package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// asyncSpec is an async run of 2 stages × 2 replicas with Streaming DiLoCo (two
// fragments, overlapped outer steps), a residual subspace and lossy codecs on both
// directions of the boundary, stashed weights and the delay-corrected update.
const asyncSpec = `name: e2e-async
seed: 23
eval_interval: 4
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 2, micro_batches: 2, replicas: 2, schedule: async}
train: {batch_size: 4, steps: 10, lr: 0.003, warmup: 2, delay: nesterov}
diloco: {inner_steps: 4, outer_lr: 0.8, outer_momentum: 0.5, sync: int8/32, fragments: 2}
compression: {subspace: 4, activations: int8/32, gradients: int8/32}
data: {val_fraction: 0.01}
`

// A launched async run takes exactly the updates `train` simulates: every loss and
// validation loss of both replicas equal, and the weights after every outer step.
func TestAsyncOnFourNodesMatchesTrain(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	text := filepath.Join(dir, "corpus.txt")
	if err := os.WriteFile(text, []byte(strings.Repeat("Now is the winter of our discontent made glorious summer by this sun of York. ", 800)), 0o644); err != nil {
		t.Fatal(err)
	}
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, asyncSpec, 4)
	out := filepath.Join(dir, "launched")
	if code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--quiet", "--data", text}, peerArgs...)...); code != 0 {
		for i, n := range nodes {
			t.Logf("node %d:\n%s", i, n.stderr)
		}
		t.Fatalf("launch exited %d:\n%s\n%s", code, stdout, stderr)
	}
	ref := filepath.Join(dir, "trained")
	if code, _, stderr := runCLI(t, "train", specPath, "--out", ref, "--quiet", "--data", text); code != 0 {
		t.Fatalf("train exited %d: %s", code, stderr)
	}
	launched, lOuter := readRun(t, out)
	trained, tOuter := readRun(t, ref)
	if len(trained) != 20 || len(launched) != 20 {
		t.Fatalf("%d and %d loss rows, want 20 (10 updates × 2 replicas)", len(launched), len(trained))
	}
	vals := 0
	for k, b := range trained {
		a := launched[k]
		if a.Loss != b.Loss || (a.ValLoss == nil) != (b.ValLoss == nil) || (a.ValLoss != nil && *a.ValLoss != *b.ValLoss) {
			t.Errorf("update %d replica %d: launched %.9f (val %v), trained %.9f (val %v)", k[0], k[1], a.Loss, a.ValLoss, b.Loss, b.ValLoss)
		}
		if a.ValLoss != nil {
			vals++
		}
	}
	if vals != 3 {
		t.Errorf("%d validation losses, want 3 (after updates 4, 8 and 10)", vals)
	}
	if len(tOuter) == 0 || len(lOuter) != len(tOuter) {
		t.Fatalf("%d outer rows launched, %d trained", len(lOuter), len(tOuter))
	}
	hash := map[[3]int]string{}
	for _, o := range tOuter {
		hash[[3]int{o.Step, o.Stage, o.Replica}] = o.WeightsHash
	}
	for _, o := range lOuter {
		if want := hash[[3]int{o.Step, o.Stage, o.Replica}]; o.WeightsHash != want {
			t.Errorf("stage %d replica %d after update %d: hash %s, train's %s", o.Stage, o.Replica, o.Step, o.WeightsHash, want)
		}
	}
	for _, n := range nodes {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
		<-n.exited
	}
}

// An async run whose nodes are all stopped mid-run resumes from the checkpoint its
// stages hold in common and takes exactly the uninterrupted run's updates.
func TestAsyncLaunchResumeAfterEveryNodeStoppedContinuesExactly(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	spec := strings.Replace(resumeSpec, "in_flight: 4, pause_timeout: 0}", "in_flight: 4, pause_timeout: 0, schedule: async}\ncheckpoint_interval: 5", 1)
	spec = strings.Replace(spec, "name: resume", "name: resume-async", 1)
	dir := t.TempDir()
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, spec, 3, "--memory-budget", "512MiB")
	out := filepath.Join(dir, "launched")
	first := startLaunch(t, append([]string{specPath, "--key", keyPath, "--out", out, "--quiet"}, peerArgs...)...)
	recorded := waitSteps(t, out, 17)
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
	if r := waitLaunch(t, first, 30*time.Second, "after its nodes stopped"); r.code == 0 {
		t.Fatal("the interrupted launch exited 0")
	}
	var again []string
	for i, n := range nodes {
		nodes[i] = n.restart(t)
		again = append(again, "--peer", nodes[i].addrs(t))
	}
	code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--resume", "--quiet"}, again...)...)
	if code != 0 {
		for i, n := range nodes {
			t.Logf("node %d:\n%s", i, n.stderr)
		}
		t.Fatalf("launch --resume exited %d:\n%s\n%s", code, stdout, stderr)
	}
	var rec struct {
		Resume struct{ Step int } `json:"resumed_from"`
	}
	b, err := os.ReadFile(filepath.Join(out, "run.json"))
	if err == nil {
		err = json.Unmarshal(b, &rec)
	}
	if err != nil {
		t.Fatal(err)
	}
	// Stage 0 has forwards of the next update in flight at any cut: the resumed run
	// runs them again on the past version its checkpoint keeps.
	t.Logf("stopped with %d updates recorded; resumed after update %d", recorded, rec.Resume.Step)
	if rec.Resume.Step < 5 {
		t.Errorf("resumed after update %d; the stages held checkpoints of update 5 at least", rec.Resume.Step)
	}
	sameAsTrain(t, specPath, out, 60)
}
