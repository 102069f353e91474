package main

import (
	"bytes"
	"context"
	"encoding/json"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/data/tokenizer"
)

// tokenizersJSModule returns the module file of Tokenizers.js 0.2.0 (npm's global one, or
// the package directory PIPESWARM_TOKENIZERS_JS names), or skips the test saying what is
// missing.
func tokenizersJSModule(t *testing.T) string {
	t.Helper()
	const version = "0.2.0"
	if _, err := exec.LookPath("node"); err != nil {
		t.Skip("node not in PATH: install Node.js 20 and 'npm install -g @huggingface/tokenizers@" + version + "' to load the checkpoint's tokenizer.json in Tokenizers.js")
	}
	dir := os.Getenv("PIPESWARM_TOKENIZERS_JS")
	if dir == "" {
		out, err := exec.Command("npm", "root", "-g").Output()
		if err != nil {
			t.Skipf("npm root -g: %v: set PIPESWARM_TOKENIZERS_JS to the @huggingface/tokenizers package directory", err)
		}
		dir = filepath.Join(strings.TrimSpace(string(out)), "@huggingface", "tokenizers")
	}
	raw, err := os.ReadFile(filepath.Join(dir, "package.json"))
	if err != nil {
		t.Skipf("@huggingface/tokenizers not found in %s: 'npm install -g @huggingface/tokenizers@%s' or set PIPESWARM_TOKENIZERS_JS", dir, version)
	}
	var pkg struct{ Version string }
	if err := json.Unmarshal(raw, &pkg); err != nil || pkg.Version != version {
		t.Skipf("@huggingface/tokenizers in %s is version %q, want %s", dir, pkg.Version, version)
	}
	return filepath.Join(dir, "dist", "tokenizers.mjs")
}

// A run trained with a BPE tokenizer learnt by `pipeswarm tokenizer train` reads as a
// Hugging Face model: Tokenizers.js loads the run directory's tokenizer.json and, on the
// validation text, gives the ids pipeswarm gives; the independent PyTorch Llama
// (bench/hf_llama_loss.py) fed those ids gives `pipeswarm eval`'s validation loss within
// 2e-3. Both evaluate the same windows: validation is data.val_path's text encoded whole,
// cut into consecutive windows of seq_len+1 ids from its start, and eval_batches caps eval
// at the first eval_batches × 16 of them, which is the count the script is given.
func TestBPECheckpointLoadsInTokenizersJSAndPyTorchGivesItsValLoss(t *testing.T) {
	if testing.Short() {
		t.Skip("runs node and python3; skipped in -short mode")
	}
	module := tokenizersJSModule(t)
	if out, err := exec.Command("/usr/bin/python3", "-c", "import torch").CombinedOutput(); err != nil {
		t.Skipf("/usr/bin/python3 has no torch (apt install python3-torch): %v %s", err, bytes.TrimSpace(out))
	}
	dir := t.TempDir()
	text, _ := data.Builtin()
	train, val := data.Split(text, 0.1)
	trainPath, valPath := filepath.Join(dir, "train.txt"), filepath.Join(dir, "val.txt")
	if err := os.WriteFile(trainPath, train, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(valPath, val, 0o644); err != nil {
		t.Fatal(err)
	}
	tokPath := filepath.Join(dir, "tok.json")
	if code, _, stderr := runCLI(t, "tokenizer", "train", "--vocab", "500", "--out", tokPath, trainPath); code != 0 {
		t.Fatalf("tokenizer train: exit %d: %s", code, stderr)
	}
	const evalBatches, seqLen = 4, 32
	src := `name: bpe-pytorch
seed: 5
eval_interval: 0
eval_batches: ` + strconv.Itoa(evalBatches) + `
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: ` + strconv.Itoa(seqLen) + `}
pipeline: {stages: 2, micro_batches: 2}
train: {batch_size: 8, steps: 30, lr: 0.01, warmup: 3}
data: {path: ` + trainPath + `, val_path: ` + valPath + `, tokenizer: ` + tokPath + `}
`
	specPath := filepath.Join(dir, "run.yaml")
	if err := os.WriteFile(specPath, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	if code, _, stderr := runCLI(t, "train", specPath, "--out", out); code != 0 {
		t.Fatalf("train: exit %d:\n%s", code, stderr)
	}
	code, evalOut, stderr := runCLI(t, "eval", "--checkpoint", out, "--json")
	if code != 0 {
		t.Fatalf("eval: exit %d:\n%s", code, stderr)
	}
	var ev struct {
		ValLoss float64 `json:"val_loss"`
		Windows int     `json:"windows"`
	}
	if err := json.Unmarshal([]byte(evalOut), &ev); err != nil {
		t.Fatalf("eval printed %q: %v", evalOut, err)
	}

	// Tokenizers.js loads the run directory's tokenizer.json and encodes the validation text.
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	node := exec.CommandContext(ctx, "node", filepath.Join("testdata", "encode_tokenizersjs.mjs"), module, filepath.Join(out, "tokenizer.json"), valPath)
	var errb bytes.Buffer
	node.Stderr = &errb
	js, err := node.Output()
	if err != nil {
		t.Fatalf("node: %v\n%s", err, errb.Bytes())
	}
	var enc struct {
		Vocab int   `json:"vocab"`
		IDs   []int `json:"ids"`
	}
	if err := json.Unmarshal(js, &enc); err != nil {
		t.Fatalf("node printed %d bytes: %v", len(js), err)
	}
	tk, err := tokenizer.Load(filepath.Join(out, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	if mine := tk.Encode(string(val)); !slices.Equal(mine, enc.IDs) {
		t.Fatalf("Tokenizers.js encoded the validation text to %d ids, pipeswarm to %d: not the same ids", len(enc.IDs), len(mine))
	}
	cfg, err := os.ReadFile(filepath.Join(out, "config.json"))
	if err != nil || !strings.Contains(string(cfg), `"vocab_size": `+strconv.Itoa(enc.Vocab)) {
		t.Fatalf("config.json (%v) does not give the tokenizer's %d tokens:\n%s", err, enc.Vocab, cfg)
	}
	avail := len(enc.IDs) / (seqLen + 1)
	if want := evalBatches * 16; ev.Windows != want || avail <= want {
		t.Fatalf("eval covered %d windows of %d; want eval_batches × 16 = %d, fewer than all", ev.Windows, avail, want)
	}
	idsPath := filepath.Join(dir, "ids.json")
	if err := os.WriteFile(idsPath, js, 0o644); err != nil {
		t.Fatal(err)
	}

	py := exec.CommandContext(ctx, "/usr/bin/python3", "../../bench/hf_llama_loss.py", "--checkpoint", filepath.Join(out, "model.safetensors"),
		"--token-json", idsPath, "--seq-len", strconv.Itoa(seqLen), "--windows", strconv.Itoa(ev.Windows))
	errb.Reset()
	py.Stderr = &errb
	pyOut, err := py.Output()
	if err != nil {
		t.Fatalf("hf_llama_loss.py: %v\n%s", err, errb.Bytes())
	}
	var pr struct {
		Loss float64 `json:"loss"`
	}
	if err := json.Unmarshal(pyOut, &pr); err != nil {
		t.Fatalf("hf_llama_loss.py printed %q: %v", pyOut, err)
	}
	t.Logf("%d-token BPE, %d validation ids, %d windows of %d: pipeswarm eval %.7f, PyTorch Llama %.7f", enc.Vocab, len(enc.IDs), ev.Windows, seqLen+1, ev.ValLoss, pr.Loss)
	if math.Abs(pr.Loss-ev.ValLoss) > 2e-3 {
		t.Errorf("PyTorch loss %.7f, pipeswarm eval %.7f: more than 2e-3 apart", pr.Loss, ev.ValLoss)
	}
	if ev.ValLoss > 0.9*math.Log(float64(enc.Vocab)) {
		t.Errorf("val loss %.4f after 30 steps, no better than 0.9 × ln %d: the model did not learn", ev.ValLoss, enc.Vocab)
	}
}
