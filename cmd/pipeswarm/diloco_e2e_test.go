package main

import (
	"crypto/sha256"
	"encoding/hex"
	"math"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/metrics"
)

// readRun reads a run's metrics: loss rows keyed by (step, replica), and outer rows.
func readRun(t *testing.T, dir string) (map[[2]int]metrics.Step, []metrics.Outer) {
	t.Helper()
	f, err := os.Open(filepath.Join(dir, "metrics.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	steps, outers, err := metrics.ReadRun(f)
	if err != nil {
		t.Fatal(err)
	}
	out := map[[2]int]metrics.Step{}
	for _, s := range steps {
		r := 0
		if s.Replica != nil {
			r = *s.Replica
		}
		out[[2]int{s.Step, r}] = s
	}
	return out, outers
}

func relDiff(a, b float64) float64 { return math.Abs(a-b) / math.Max(math.Abs(b), 1e-30) }

// The swarm computes DiLoCo exactly as `train` simulates it: 2 stages × 2 replicas on
// four node processes, int8 pseudo-gradients, against `train` on the same spec. Each
// node has its own data directory and never sees the launcher's corpus path: the text
// arrives over libp2p, verified by hash.
func TestDiLoCoOnFourNodesMatchesTrain(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	example, err := os.ReadFile("../../examples/tiny-diloco.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	// The corpus lives only in the launcher's directory, named by a relative path the
	// nodes (whose working directory is elsewhere) cannot resolve.
	corpusText := strings.Repeat("To be, or not to be, that is the question. ", 2000)
	if err := os.WriteFile(filepath.Join(dir, "corpus.txt"), []byte(corpusText), 0o644); err != nil {
		t.Fatal(err)
	}
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, string(example), 4, "--memory-budget", "1GiB")
	t.Chdir(dir)       // the nodes' working directory stays the package's
	const steps = "60" // outer steps after steps 30 and 60, validation after 60
	out := filepath.Join(dir, "launched")
	code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--quiet",
		"--data", "corpus.txt", "--steps", steps}, peerArgs...)...)
	if code != 0 {
		for i, n := range nodes {
			t.Logf("node %d:\n%s", i, n.stderr)
		}
		t.Fatalf("launch exited %d:\n%s\n%s", code, stdout, stderr)
	}
	ref := filepath.Join(dir, "trained")
	if code, _, stderr := runCLI(t, "train", specPath, "--out", ref, "--quiet", "--data", "corpus.txt", "--steps", steps); code != 0 {
		t.Fatalf("train exited %d: %s", code, stderr)
	}
	launched, lOuter := readRun(t, out)
	trained, tOuter := readRun(t, ref)
	if len(trained) != 120 || len(launched) != len(trained) {
		t.Fatalf("launch recorded %d loss rows, train %d; want 120 (60 steps × 2 replicas)", len(launched), len(trained))
	}
	for k, b := range trained {
		a, ok := launched[k]
		switch {
		case !ok:
			t.Errorf("step %d replica %d: no row from launch", k[0], k[1])
		case relDiff(a.Loss, b.Loss) > 1e-6:
			t.Errorf("step %d replica %d: loss %.9f launched, %.9f trained", k[0], k[1], a.Loss, b.Loss)
		case (a.ValLoss == nil) != (b.ValLoss == nil):
			t.Errorf("step %d replica %d: val_loss present %v launched, %v trained", k[0], k[1], a.ValLoss != nil, b.ValLoss != nil)
		case a.ValLoss != nil && relDiff(*a.ValLoss, *b.ValLoss) > 1e-6:
			t.Errorf("step %d: val_loss %.9f launched, %.9f trained", k[0], *a.ValLoss, *b.ValLoss)
		}
	}
	// Equal weight hashes on both replicas of each stage after every outer step, and
	// equal to the reference's; bytes counted alike.
	type key struct{ step, stage, replica int }
	ref2 := map[key]metrics.Outer{}
	for _, o := range tOuter {
		ref2[key{o.Step, o.Stage, o.Replica}] = o
	}
	if len(lOuter) != len(tOuter) || len(tOuter) != 2*2*2 {
		t.Fatalf("%d outer rows launched, %d trained; want 8 (2 outer steps × 2 stages × 2 replicas)", len(lOuter), len(tOuter))
	}
	for _, o := range lOuter {
		want, ok := ref2[key{o.Step, o.Stage, o.Replica}]
		if !ok || o.WeightsHash != want.WeightsHash || o.SyncBytes != want.SyncBytes || o.Contributors != 2 {
			t.Errorf("outer row %+v, train's %+v: want the same hash and bytes, 2 contributors", o, want)
		}
	}
	// The first stages fetched their shard (and replica 0 the validation split) and
	// cached them by hash.
	for i, n := range nodes {
		cached, _ := filepath.Glob(filepath.Join(n.dir, "corpus", "*"))
		for _, c := range cached {
			b, err := os.ReadFile(c)
			if err != nil {
				t.Fatal(err)
			}
			sum := sha256.Sum256(b)
			if hex.EncodeToString(sum[:]) != filepath.Base(c) {
				t.Errorf("node %d cached %s, whose sha256 is %x", i, c, sum)
			}
		}
		if strings.Contains(n.stderr.String(), "data fetched and verified") != (len(cached) > 0) {
			t.Errorf("node %d: cached %v; its log says:\n%s", i, cached, n.stderr)
		}
	}
	for _, n := range nodes {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
		<-n.exited
	}
	if !strings.Contains(stdout, "outer steps: 2") {
		t.Errorf("launch summary lacks the outer steps:\n%s", stdout)
	}
}
