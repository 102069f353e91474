package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/shard"
)

const preparedSpec = `name: e2e-prepared
seed: 5
eval_interval: 4
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 2, micro_batches: 2, replicas: 2, pause_timeout: 0}
train: {batch_size: 4, steps: 12, lr: 0.003, warmup: 2}
diloco: {inner_steps: 4, outer_lr: 0.7, outer_momentum: 0.9, sync: int8/32}
data: {path: prepared, val_path: prepared-val}
`

// prepareCLI runs 'data prepare' and returns the manifest it wrote.
func prepareCLI(t *testing.T, args ...string) *data.Manifest {
	t.Helper()
	code, stdout, stderr := runCLI(t, append([]string{"data", "prepare"}, args...)...)
	if code != 0 || !strings.HasPrefix(stdout, "wrote ") {
		t.Fatalf("data prepare exited %d: %s%s", code, stdout, stderr)
	}
	m, _, err := data.ReadManifest(args[slices.Index(args, "--out")+1])
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// A 2-stage × 2-replica run on a prepared dataset: the launcher serves the shard files,
// replica r's first stage fetches exactly shards r, r+2, … (replica 0's also the
// validation shards), nothing else reaches a node's cache, and the run equals `train` on
// the same prepared directory bit for bit.
func TestLaunchOnPreparedShardsMatchesTrain(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	var text, held strings.Builder
	for i := range 3000 {
		line := []string{"To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer",
			"The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"}[i%4]
		text.WriteString(line + "\n")
		if i < 300 {
			held.WriteString(line + " (held out)\n")
		}
	}
	os.WriteFile(filepath.Join(dir, "train.txt"), []byte(text.String()), 0o644)
	os.WriteFile(filepath.Join(dir, "val.txt"), []byte(held.String()), 0o644)
	m := prepareCLI(t, "--tokenizer", "bytes", "--out", filepath.Join(dir, "prepared"), "--shard-tokens", "30000", filepath.Join(dir, "train.txt"))
	vm := prepareCLI(t, "--tokenizer", "bytes", "--out", filepath.Join(dir, "prepared-val"), "--shard-tokens", "6000", filepath.Join(dir, "val.txt"))
	if len(m.Shards) != 5 || len(vm.Shards) != 3 {
		t.Fatalf("prepared %d training and %d validation shards, want 5 and 3", len(m.Shards), len(vm.Shards))
	}

	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, preparedSpec, 4, "--memory-budget", "1GiB")
	t.Chdir(dir) // the data paths are relative to the launcher's directory, which no node shares
	out := filepath.Join(dir, "launched")
	code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--quiet"}, peerArgs...)...)
	if code != 0 {
		t.Fatalf("launch exited %d:\n%s\n%s", code, stdout, stderr)
	}
	ref := filepath.Join(dir, "trained")
	if code, _, stderr := runCLI(t, "train", specPath, "--out", ref, "--quiet"); code != 0 {
		t.Fatalf("train exited %d: %s", code, stderr)
	}
	launched, lOuter := readRun(t, out)
	trained, tOuter := readRun(t, ref)
	if len(trained) != 24 || len(launched) != len(trained) {
		t.Fatalf("launch recorded %d loss rows, train %d; want 24 (12 steps × 2 replicas)", len(launched), len(trained))
	}
	// eval reads the validation shards as the run did.
	code, evalOut, stderr := runCLI(t, "eval", "--checkpoint", filepath.Join(ref, "model.safetensors"), "--json")
	var ev struct {
		ValLoss float64 `json:"val_loss"`
	}
	if final := trained[[2]int{12, 0}].ValLoss; code != 0 || json.Unmarshal([]byte(evalOut), &ev) != nil || final == nil || ev.ValLoss != *final {
		t.Errorf("eval: exit %d, %q %s; want the run's final validation loss %v", code, evalOut, stderr, final)
	}
	vals := 0
	for k, b := range trained {
		a := launched[k]
		if a.Loss != b.Loss || (a.ValLoss == nil) != (b.ValLoss == nil) || a.ValLoss != nil && *a.ValLoss != *b.ValLoss {
			t.Errorf("step %d replica %d: launched %+v, trained %+v", k[0], k[1], a, b)
		}
		if b.ValLoss != nil {
			vals++
		}
	}
	if vals == 0 || len(lOuter) != len(tOuter) || len(tOuter) != 3*2*2 {
		t.Fatalf("%d validation losses; %d outer rows launched, %d trained, want 12", vals, len(lOuter), len(tOuter))
	}
	type key struct{ step, stage, replica int }
	refOuter := map[key]string{}
	for _, o := range tOuter {
		refOuter[key{o.Step, o.Stage, o.Replica}] = o.WeightsHash
	}
	for _, o := range lOuter {
		if h, ok := refOuter[key{o.Step, o.Stage, o.Replica}]; !ok || h != o.WeightsHash {
			t.Errorf("outer row %+v: train's hash is %q", o, h)
		}
	}

	// Each node's cache holds exactly what its stage reads. Staffing is replica by
	// replica: node i holds stage i%2 of replica i/2.
	want := map[int][]string{}
	for r := range 2 {
		for _, i := range data.ReplicaShards(len(m.Shards), r, 2) {
			want[2*r] = append(want[2*r], m.Shards[i].SHA256)
		}
	}
	for _, s := range vm.Shards {
		want[0] = append(want[0], s.SHA256)
	}
	for i, n := range nodes {
		cached, _ := filepath.Glob(filepath.Join(n.dir, "corpus", "*"))
		var got []string
		for _, c := range cached {
			got = append(got, filepath.Base(c))
		}
		slices.Sort(got)
		slices.Sort(want[i])
		if !slices.Equal(got, want[i]) {
			t.Errorf("node %d (stage %d of replica %d) cached %v, want %v", i, i%2, i/2, got, want[i])
		}
	}
	for _, n := range nodes {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
		<-n.exited
	}
}

// A launched run with a tokenizer on raw text: the launcher tokenises and cuts the text
// as train does and serves each replica its ids, so the nodes need no tokenizer; the run
// equals train bit for bit, and the collected model has the tokenizer.json beside it.
func TestLaunchWithATokenizerMatchesTrain(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	var text strings.Builder
	for i := range 2000 {
		text.WriteString([]string{"To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer",
			"The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"}[i%4] + "\n")
	}
	os.WriteFile(filepath.Join(dir, "train.txt"), []byte(text.String()), 0o644)
	if code, stdout, stderr := runCLI(t, "tokenizer", "train", "--vocab", "300", "--out", filepath.Join(dir, "tok.json"), filepath.Join(dir, "train.txt")); code != 0 {
		t.Fatalf("tokenizer train exited %d: %s%s", code, stdout, stderr)
	}
	spec := strings.Replace(preparedSpec, "data: {path: prepared, val_path: prepared-val}", "data: {path: train.txt, tokenizer: tok.json, val_fraction: 0.1}\nexport: allowed", 1)
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, spec, 4, "--memory-budget", "1GiB")
	t.Chdir(dir)
	out := filepath.Join(dir, "launched")
	code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--quiet"}, peerArgs...)...)
	if code != 0 {
		t.Fatalf("launch exited %d:\n%s\n%s", code, stdout, stderr)
	}
	ref := filepath.Join(dir, "trained")
	if code, _, stderr := runCLI(t, "train", specPath, "--out", ref, "--quiet"); code != 0 {
		t.Fatalf("train exited %d: %s", code, stderr)
	}
	launched, _ := readRun(t, out)
	trained, _ := readRun(t, ref)
	if len(trained) != 24 || len(launched) != len(trained) {
		t.Fatalf("launch recorded %d loss rows, train %d; want 24", len(launched), len(trained))
	}
	for k, b := range trained {
		a := launched[k]
		if a.Loss != b.Loss || (a.ValLoss == nil) != (b.ValLoss == nil) || a.ValLoss != nil && *a.ValLoss != *b.ValLoss {
			t.Errorf("step %d replica %d: launched %+v, trained %+v", k[0], k[1], a, b)
		}
	}
	tok, _ := os.ReadFile(filepath.Join(dir, "tok.json"))
	for _, d := range []string{out, ref} {
		if got, err := os.ReadFile(filepath.Join(d, "tokenizer.json")); err != nil || string(got) != string(tok) {
			t.Errorf("%s/tokenizer.json: %v; want the run's tokenizer", d, err)
		}
	}

	// The plan bound the tokenizer's sha256: run.json, every stage checkpoint and the
	// assembled model record it.
	sum := sha256.Sum256(tok)
	tokSum := hex.EncodeToString(sum[:])
	var rec struct {
		TokenizerSHA256 string `json:"tokenizer_sha256"`
	}
	if raw, err := os.ReadFile(filepath.Join(out, "run.json")); err != nil || json.Unmarshal(raw, &rec) != nil || rec.TokenizerSHA256 != tokSum {
		t.Errorf("run.json: tokenizer_sha256 %q (%v), want %s", rec.TokenizerSHA256, err, tokSum)
	}
	if meta, err := shard.ReadCheckpointMetadata(filepath.Join(out, "model.safetensors")); err != nil || meta["pipeswarm.tokenizer_sha256"] != tokSum {
		t.Errorf("the assembled model's metadata: tokenizer %q (%v), want %s", meta["pipeswarm.tokenizer_sha256"], err, tokSum)
	}
	stageFiles := 0
	for i := range nodes {
		filepath.WalkDir(filepath.Join(dir, fmt.Sprintf("node%d", i)), func(p string, e os.DirEntry, err error) error {
			if err != nil || e.IsDir() || !strings.HasSuffix(p, ".safetensors") {
				return nil
			}
			meta, err := shard.ReadCheckpointMetadata(p)
			if err != nil || meta["stage"] == "" {
				return nil
			}
			stageFiles++
			if meta["pipeswarm.tokenizer_sha256"] != tokSum {
				t.Errorf("%s: tokenizer %q, want %s", p, meta["pipeswarm.tokenizer_sha256"], tokSum)
			}
			return nil
		})
	}
	if stageFiles < 4 {
		t.Errorf("found %d stage checkpoints on the nodes, want one per cell at least", stageFiles)
	}

	// A resumed launch refuses a tokenizer that changed since the run started, naming
	// data.tokenizer and both hashes; the same file again passes that check (and the
	// run, finished, has nothing to resume).
	changed := append(slices.Clone(tok), '\n')
	if err := os.WriteFile(filepath.Join(dir, "tok.json"), changed, 0o644); err != nil {
		t.Fatal(err)
	}
	sum2 := sha256.Sum256(changed)
	code, _, stderr = runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--resume", "--quiet"}, peerArgs...)...)
	if code == 0 || !strings.Contains(stderr, `data.tokenizer "tok.json" has changed`) || !strings.Contains(stderr, tokSum) || !strings.Contains(stderr, hex.EncodeToString(sum2[:])) {
		t.Errorf("launch --resume with a changed tokenizer: exit %d, %q", code, stderr)
	}
	t.Logf("%d stage checkpoints record the tokenizer; a changed one: %s", stageFiles, strings.TrimSpace(stderr))
	os.WriteFile(filepath.Join(dir, "tok.json"), tok, 0o644)
	code, _, stderr = runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--resume", "--quiet"}, peerArgs...)...)
	if code == 0 || !strings.Contains(stderr, "nothing to resume") {
		t.Errorf("launch --resume of the finished run with its tokenizer: exit %d, %q", code, stderr)
	}
	for _, n := range nodes {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
		<-n.exited
	}
}

// data prepare's flags are checked, naming the flag, and a prepared directory is never
// overwritten.
func TestDataPrepareRefusesBadFlags(t *testing.T) {
	dir := t.TempDir()
	in := filepath.Join(dir, "in.txt")
	os.WriteFile(in, []byte("some text\n"), 0o644)
	out := filepath.Join(dir, "out")
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--out", out, in}, "--tokenizer: want the path of a tokenizer.json, or bytes"},
		{[]string{"--tokenizer", "bytes", in}, "--out: want the directory"},
		{[]string{"--tokenizer", "bytes", "--out", out, "--shard-tokens", "0", in}, `--shard-tokens "0": want a positive number`},
		{[]string{"--tokenizer", "bytes", "--out", out}, "want one or more INPUTs"},
		{[]string{"--tokenizer", filepath.Join(dir, "none.json"), "--out", out, in}, "--tokenizer: open"},
		{[]string{"--tokenizer", "bytes", "--out", out, filepath.Join(dir, "*.jsonl")}, "matches no file"},
	} {
		code, _, stderr := runCLI(t, append([]string{"data", "prepare"}, c.args...)...)
		if code == 0 || !strings.Contains(stderr, c.want) {
			t.Errorf("data prepare %v: exit %d, %q; want an error containing %q", c.args, code, stderr, c.want)
		}
	}
	prepareCLI(t, "--tokenizer", "bytes", "--out", out, in)
	if code, _, stderr := runCLI(t, "data", "prepare", "--tokenizer", "bytes", "--out", out, in); code == 0 || !strings.Contains(stderr, "already holds a prepared dataset") {
		t.Errorf("data prepare into a prepared directory: exit %d, %q", code, stderr)
	}
}

// On prepared shards too, a run stopped by SIGTERM and resumed draws the sequences the
// uninterrupted one draws: every loss equal.
func TestTrainOnPreparedShardsResumesExactly(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	text := strings.Repeat("Now is the winter of our discontent made glorious summer by this sun of York.\n", 800)
	os.WriteFile(filepath.Join(dir, "train.txt"), []byte(text), 0o644)
	os.WriteFile(filepath.Join(dir, "val.txt"), []byte(text[:6000]), 0o644)
	prepareCLI(t, "--tokenizer", "bytes", "--out", filepath.Join(dir, "p"), "--shard-tokens", "9000", filepath.Join(dir, "train.txt"))
	prepareCLI(t, "--tokenizer", "bytes", "--out", filepath.Join(dir, "v"), filepath.Join(dir, "val.txt"))
	spec := strings.Replace(strings.Replace(faultSpec, "steps: 12", "steps: 100", 1), "data: {val_fraction: 0.01}",
		"data: {path: "+filepath.Join(dir, "p")+", val_path: "+filepath.Join(dir, "v")+"}", 1)
	specPath := filepath.Join(dir, "run.yaml")
	if err := os.WriteFile(specPath, []byte(spec), 0o644); err != nil {
		t.Fatal(err)
	}
	if rows := trainStoppedAndResumed(t, dir, specPath, 100); rows != 300 {
		t.Fatalf("%d loss rows; want 300 (100 steps of 3 replicas)", rows)
	}
}
