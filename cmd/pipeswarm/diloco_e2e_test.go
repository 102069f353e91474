package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/shard"
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

// The swarm computes DiLoCo exactly as `train` simulates it, bit for bit: 2 stages × 2 replicas on
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
	// The summary names every replica's checkpoints, each on its node.
	for r := range 2 {
		for s := range 2 {
			m := regexp.MustCompile(fmt.Sprintf(`(?m)^stage %d of replica %d checkpoint: (.*)$`, s, r)).FindStringSubmatch(stdout)
			if m == nil {
				t.Errorf("the summary does not list stage %d of replica %d's checkpoint:\n%s", s, r, stdout)
			} else if _, err := os.Stat(m[1]); err != nil {
				t.Errorf("stage %d of replica %d's checkpoint: %v", s, r, err)
			}
		}
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
	var maxDiff float64
	for k, b := range trained {
		a, ok := launched[k]
		if ok {
			maxDiff = max(maxDiff, relDiff(a.Loss, b.Loss))
			if a.ValLoss != nil && b.ValLoss != nil {
				maxDiff = max(maxDiff, relDiff(*a.ValLoss, *b.ValLoss))
			}
		}
		switch {
		case !ok:
			t.Errorf("step %d replica %d: no row from launch", k[0], k[1])
		case a.Loss != b.Loss:
			t.Errorf("step %d replica %d: loss %.9f launched, %.9f trained", k[0], k[1], a.Loss, b.Loss)
		case (a.ValLoss == nil) != (b.ValLoss == nil):
			t.Errorf("step %d replica %d: val_loss present %v launched, %v trained", k[0], k[1], a.ValLoss != nil, b.ValLoss != nil)
		case a.ValLoss != nil && *a.ValLoss != *b.ValLoss:
			t.Errorf("step %d: val_loss %.9f launched, %.9f trained", k[0], *a.ValLoss, *b.ValLoss)
		}
	}
	t.Logf("largest relative difference of a loss or validation loss, launched against trained: %g", maxDiff)
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
	// Beside each stage checkpoint, the optimiser state: AdamW, the global weights,
	// outer momentum and pseudo-gradient residual; the first stages also their data
	// position. (Staffing is replica by replica: node i holds stage i%2 of replica i/2.)
	for i, n := range nodes {
		st, _ := filepath.Glob(filepath.Join(n.dir, "runs", "*", fmt.Sprintf("stage-%d-replica-%d.state.safetensors", i%2, i/2)))
		if len(st) != 1 {
			t.Errorf("node %d holds %d state files for stage %d of replica %d, want 1", i, len(st), i%2, i/2)
			continue
		}
		ck, err := shard.LoadCheckpoint(st[0])
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range []string{"adam_m", "adam_v", "global", "outer_momentum", "ef_residual"} {
			if _, ok := ck.Tensors[name]; !ok {
				t.Errorf("node %d's state file lacks %s", i, name)
			}
		}
		if _, ok := ck.Metadata["sampler"]; ok != (i%2 == 0) {
			t.Errorf("node %d's state file: sampler position present %v, want it on first stages only", i, ok)
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

const faultSpec = `name: e2e-faults
seed: 13
eval_interval: 4
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 2, micro_batches: 2, replicas: 3}
train: {batch_size: 4, steps: 12, lr: 0.003, warmup: 2}
diloco: {inner_steps: 2, outer_lr: 1.0, outer_momentum: 0, sync: int8/32}
data: {val_fraction: 0.01}
`

// Streaming DiLoCo (fragments synced at staggered steps), synchronous warmup steps and
// int4 pseudo-gradients with zstd take the same steps on the swarm as in `train`.
func TestFragmentsWarmupAndInt4OnNodesMatchTrain(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	spec := `name: e2e-fragments
seed: 17
eval_interval: 4
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 2, micro_batches: 2, replicas: 2}
train: {batch_size: 4, steps: 10, lr: 0.003, warmup: 2}
diloco: {inner_steps: 4, outer_lr: 0.8, outer_momentum: 0.5, sync: int4/32+zstd, fragments: 2, warmup_steps: 1}
data: {val_fraction: 0.01}
`
	dir := t.TempDir()
	// Node 0 (stage 0 of replica 0) has its own copy of the text and reads it from disk;
	// node 2 (stage 0 of replica 1) fetches its shard from the launcher.
	text := filepath.Join(dir, "corpus.txt")
	if err := os.WriteFile(text, []byte(strings.Repeat("All the world's a stage, and all the men and women merely players. ", 800)), 0o644); err != nil {
		t.Fatal(err)
	}
	specPath, keyPath, nodes, peerArgs := startSwarmWith(t, dir, spec, 4, func(i int) []string {
		if i == 0 {
			return []string{"--corpus", text}
		}
		return nil
	})
	out := filepath.Join(dir, "launched")
	if code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--quiet", "--data", text}, peerArgs...)...); code != 0 {
		t.Fatalf("launch exited %d:\n%s\n%s", code, stdout, stderr)
	}
	if log := nodes[0].stderr.String(); !strings.Contains(log, "data from the local corpus") || strings.Contains(log, "data fetched") {
		t.Errorf("node 0 should have read its shard and the validation split from --corpus:\n%s", log)
	}
	if !strings.Contains(nodes[2].stderr.String(), "data fetched and verified") {
		t.Errorf("node 2 should have fetched its shard:\n%s", nodes[2].stderr)
	}
	ref := filepath.Join(dir, "trained")
	if code, _, stderr := runCLI(t, "train", specPath, "--out", ref, "--quiet", "--data", text); code != 0 {
		t.Fatalf("train exited %d: %s", code, stderr)
	}
	launched, lOuter := readRun(t, out)
	trained, tOuter := readRun(t, ref)
	if len(trained) != 20 || len(launched) != 20 {
		t.Fatalf("%d and %d loss rows, want 20", len(launched), len(trained))
	}
	for k, b := range trained {
		a := launched[k]
		if a.Loss != b.Loss || (a.ValLoss == nil) != (b.ValLoss == nil) || (a.ValLoss != nil && *a.ValLoss != *b.ValLoss) {
			t.Errorf("step %d replica %d: launched %.9f (val %v), trained %.9f (val %v)", k[0], k[1], a.Loss, a.ValLoss, b.Loss, b.ValLoss)
		}
	}
	// Outer steps begin after step 1 (warmup: every fragment), 2, 6 (fragment 0, at H/2)
	// and 4, 8 (fragment 1, at H); overlapping the next inner step, they are applied
	// after steps 2, 3, 5, 7 and 9. The last step's, after 10, blocks: 6 rows per stage
	// and replica.
	if len(tOuter) != 6*2*2 || len(lOuter) != len(tOuter) {
		t.Fatalf("%d outer rows launched, %d trained; want 24", len(lOuter), len(tOuter))
	}
	var applied []int
	for _, o := range lOuter {
		if o.Stage == 0 && o.Replica == 0 {
			applied = append(applied, o.Step)
		}
	}
	t.Logf("stage 0 of replica 0 applied outer steps after steps %v", applied)
	for _, o := range lOuter {
		if !slices.Contains([]int{2, 3, 5, 7, 9, 10}, o.Step) {
			t.Errorf("outer step applied after step %d; want 2, 3, 5, 7, 9 and 10", o.Step)
		}
	}
	hash := map[[3]int]string{}
	for _, o := range tOuter {
		hash[[3]int{o.Step, o.Stage, o.Replica}] = o.WeightsHash
	}
	for _, o := range lOuter {
		if want := hash[[3]int{o.Step, o.Stage, o.Replica}]; o.WeightsHash != want {
			t.Errorf("stage %d replica %d after step %d: hash %s, train's %s", o.Stage, o.Replica, o.Step, o.WeightsHash, want)
		}
	}
	for _, n := range nodes {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
		<-n.exited
	}
}

// `train` stopped by SIGTERM and run again with --resume takes exactly the steps the
// uninterrupted run takes (compared row by row, timings aside).
func TestTrainSIGTERMedAndResumedMatchesTheUninterruptedRun(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	specPath := filepath.Join(dir, "run.yaml")
	spec := strings.Replace(faultSpec, "steps: 12", "steps: 100", 1)
	if err := os.WriteFile(specPath, []byte(spec), 0o644); err != nil {
		t.Fatal(err)
	}
	trainStoppedAndResumed(t, dir, specPath, 100)
}

// trainStoppedAndResumed runs `train` on specPath (a run of steps steps) to the end,
// and again in dir stopped by SIGTERM once 30 steps are recorded, then resumed with
// --resume: every row of the two (loss and validation loss, per step and replica)
// must be equal. It returns how many rows each holds.
func trainStoppedAndResumed(t *testing.T, dir, specPath string, steps int) int {
	t.Helper()
	full := filepath.Join(dir, "full")
	if code, _, stderr := runCLI(t, "train", specPath, "--out", full, "--quiet"); code != 0 {
		t.Fatalf("train exited %d: %s", code, stderr)
	}
	part := filepath.Join(dir, "part")
	cmd := exec.Command(os.Args[0], "train", specPath, "--out", part, "--quiet")
	cmd.Env = append(os.Environ(), "PIPESWARM_AS_CLI=1")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waitSteps(t, part, 30)
	_ = cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err == nil {
		t.Fatal("train exited 0 after SIGTERM; want the interruption reported")
	}
	stopped, _ := metrics.ReadFile(filepath.Join(part, "metrics.jsonl"))
	if last := stopped[len(stopped)-1].Step; last >= steps {
		t.Fatalf("SIGTERM came after the last step (%d)", last)
	}
	if code, _, stderr := runCLI(t, "train", specPath, "--out", part, "--quiet", "--resume"); code != 0 {
		t.Fatalf("train --resume exited %d: %s", code, stderr)
	}
	a, _ := readRun(t, part)
	b, _ := readRun(t, full)
	if len(a) != len(b) {
		t.Fatalf("%d loss rows after resuming, %d uninterrupted", len(a), len(b))
	}
	for k, want := range b {
		got := a[k]
		if got.Loss != want.Loss || (got.ValLoss == nil) != (want.ValLoss == nil) || (got.ValLoss != nil && *got.ValLoss != *want.ValLoss) {
			t.Fatalf("step %d replica %d: resumed loss %v (val %v), uninterrupted %v (val %v)", k[0], k[1], got.Loss, got.ValLoss, want.Loss, want.ValLoss)
		}
	}
	t.Logf("stopped after step %d of %d, resumed; all %d rows equal", stopped[len(stopped)-1].Step, steps, len(b))
	return len(b)
}

// stepRowsSoFar reads the loss rows a running launch has written to dir's
// metrics.jsonl so far (up to its last whole line): (step, replica) of each.
func stepRowsSoFar(dir string) map[[2]int]bool {
	b, _ := os.ReadFile(filepath.Join(dir, "metrics.jsonl"))
	b = b[:bytes.LastIndexByte(b, '\n')+1]
	steps, _, err := metrics.ReadRun(bytes.NewReader(b))
	out := map[[2]int]bool{}
	if err != nil {
		return out
	}
	for _, s := range steps {
		r := 0
		if s.Replica != nil {
			r = *s.Replica
		}
		out[[2]int{s.Step, r}] = true
	}
	return out
}
