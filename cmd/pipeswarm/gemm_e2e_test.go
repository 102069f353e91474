package main

import (
	"math"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/shard/backend"
)

// Two nodes of one pipeline on different GEMM providers (oneDNN and pipeswarm's Go
// kernels) train as train does, within the providers' float32 rounding: the per-step
// losses agree to a relative 1e-4.
func TestNodesOnDifferentGEMMProvidersTrainLikeTrain(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	if _, err := backend.OpenGEMM("onednn"); err != nil {
		t.Skipf("needs oneDNN (apt-get install libdnnl2): %v", err)
	}
	dir := t.TempDir()
	spec := strings.Replace(pipeSpec, "stages: 4, micro_batches: 4, in_flight: 4", "stages: 2, micro_batches: 2", 1)
	gemms := []string{"onednn", "go"}
	specPath, keyPath, nodes, peerArgs := startSwarmWith(t, dir, spec, 2, func(i int) []string { return []string{"--gemm", gemms[i]} })
	out := filepath.Join(dir, "launched")
	code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--quiet"}, peerArgs...)...)
	if code != 0 {
		t.Fatalf("launch exited %d:\n%s\n%s", code, stdout, stderr)
	}
	ref := filepath.Join(dir, "trained")
	if code, _, stderr := runCLI(t, "train", specPath, "--out", ref, "--quiet", "--gemm", "go"); code != 0 {
		t.Fatal(stderr)
	}
	launched, _ := metrics.ReadFile(filepath.Join(out, "metrics.jsonl"))
	trained, _ := metrics.ReadFile(filepath.Join(ref, "metrics.jsonl"))
	if len(launched) != 6 || len(trained) != 6 {
		t.Fatalf("%d and %d steps recorded, want 6", len(launched), len(trained))
	}
	for i := range trained {
		d := math.Abs(launched[i].Loss-trained[i].Loss) / trained[i].Loss
		t.Logf("step %d: launched %.6f, train %.6f", i+1, launched[i].Loss, trained[i].Loss)
		if d > 1e-4 {
			t.Errorf("step %d: launched loss %.6f, train's %.6f (relative %.2g, want <= 1e-4)", i+1, launched[i].Loss, trained[i].Loss, d)
		}
	}
	for _, n := range nodes {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
		<-n.exited
	}
	for i, want := range []string{"oneDNN", "pipeswarm Go kernels"} {
		if log := nodes[i].stderr.String(); !strings.Contains(log, "gemm=\""+want) {
			t.Errorf("node %d (--gemm %s) does not log computing with %s:\n%s", i, gemms[i], want, log)
		}
	}
}
