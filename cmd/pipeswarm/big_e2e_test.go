package main

import (
	"bytes"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"github.com/pipeswarm/pipeswarm/examples"
	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/shard"
)

// peakRSS is a process's peak resident set, from /proc/PID/status.
func peakRSS(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`VmHWM:\s+(\d+) kB`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no VmHWM for process %d", pid)
	}
	kb, _ := strconv.ParseInt(string(m[1]), 10, 64)
	return kb << 10
}

// The 125m preset (123 M parameters, 4 stages of 4 blocks, recomputing), 2 steps of 4
// micro-batches of one 512-byte sequence, launched on 4 node processes: every step's
// loss, gradient norm and validation loss, and the assembled model, are train's, bit for
// bit; each node's peak resident set is within 15% of what staffing counted for its
// stage. Minutes of compute and 4 × 1.5 GB: run with PIPESWARM_BIG=1.
func TestLaunched125MWithRecomputationIsTrainBitForBit(t *testing.T) {
	if os.Getenv("PIPESWARM_BIG") == "" {
		t.Skip("a 125 M-parameter launch: set PIPESWARM_BIG=1 to run it")
	}
	src, _, err := examples.Spec("125m")
	if err != nil {
		t.Fatal(err)
	}
	for old, new := range map[string]string{
		"name: 125m ": "name: big125m ", "batch_size: 32 ": "batch_size: 4 ", "micro_batches: 8 ": "micro_batches: 4 ",
		"steps: 10000 ": "steps: 2 ", "warmup: 500 ": "warmup: 1 ", "eval_interval: 500 ": "eval_batches: 1\neval_interval: 0 ",
	} {
		if !bytes.Contains(src, []byte(old)) {
			t.Fatalf("examples/125m.yaml has no %q", old)
		}
		src = bytes.Replace(src, []byte(old), []byte(new), 1)
	}
	dir := t.TempDir()
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, string(src), 4, "--memory-budget", "4GiB")
	out := filepath.Join(dir, "launched")
	if code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--quiet"}, peerArgs...)...); code != 0 {
		t.Fatalf("launch exited %d:\n%s\n%s", code, stdout, stderr)
	}
	sp, err := spec.Parse(src, "125m")
	if err != nil {
		t.Fatal(err)
	}
	ranges, _ := shard.SplitLayers(sp.Model.NLayers, 4)
	for i, nd := range nodes {
		// Nodes are taken in the order given, one stage each.
		got := peakRSS(t, nd.cmd.Process.Pid)
		need := assign.Need(train.ModelConfig(sp), ranges[i], train.StaffSchedule(sp), i, 1, true)
		t.Logf("stage %d: peak RSS %s, staffing counted %s (%+.1f%%)", i, assign.FormatBytes(got), assign.FormatBytes(need), 100*float64(got-need)/float64(need))
		if d := float64(got-need) / float64(need); d > 0.15 || d < -0.15 {
			t.Errorf("stage %d: peak RSS %s is %+.1f%% off staffing's %s", i, assign.FormatBytes(got), 100*d, assign.FormatBytes(need))
		}
	}
	ref := filepath.Join(dir, "trained")
	if code, _, stderr := runCLI(t, "train", specPath, "--out", ref, "--quiet"); code != 0 {
		t.Fatalf("train exited %d: %s", code, stderr)
	}
	for _, f := range []string{"model.safetensors"} {
		a, errA := os.ReadFile(filepath.Join(out, f))
		b, errB := os.ReadFile(filepath.Join(ref, f))
		if errA != nil || errB != nil || !bytes.Equal(a, b) {
			t.Errorf("%s: launched and trained differ (%v, %v)", f, errA, errB)
		}
	}
	sameSteps(t, filepath.Join(out, train.MetricsFile), filepath.Join(ref, train.MetricsFile))
}

// sameSteps fails t unless two metrics.jsonl record the same steps with the same loss,
// gradient norm and validation loss, bit for bit.
func sameSteps(t *testing.T, a, b string) {
	t.Helper()
	x, errX := metrics.ReadFile(a)
	y, errY := metrics.ReadFile(b)
	if errX != nil || errY != nil || len(x) != len(y) || len(x) == 0 {
		t.Fatalf("metrics: %d steps (%v), %d steps (%v)", len(x), errX, len(y), errY)
	}
	for i := range x {
		p, q := x[i], y[i]
		if p.Step != q.Step || math.Float64bits(p.Loss) != math.Float64bits(q.Loss) || math.Float64bits(p.GradNorm) != math.Float64bits(q.GradNorm) ||
			(p.ValLoss == nil) != (q.ValLoss == nil) || (p.ValLoss != nil && math.Float64bits(*p.ValLoss) != math.Float64bits(*q.ValLoss)) {
			t.Errorf("step %d: launched %+v, trained %+v", q.Step, p, q)
		}
	}
}
