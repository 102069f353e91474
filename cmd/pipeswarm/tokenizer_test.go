package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/data/tokenizer"
	"github.com/pipeswarm/pipeswarm/node/metrics"
)

// TestTokenizerCommands: 'tokenizer train' writes the tokenizer that tokenizer.Train
// learns from the same text (the one the package's tests compare with Tokenizers.js),
// and 'encode' then 'decode' give the text back.
func TestTokenizerCommands(t *testing.T) {
	dir := t.TempDir()
	text := strings.Repeat("First Citizen: we are accounted poor citizens, the patricians good. 123 ", 40) + "naïve 漢字 😀\n"
	corpus := filepath.Join(dir, "corpus.txt")
	if err := os.WriteFile(corpus, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "tokenizer.json")
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"tokenizer", "train", "--vocab", "400", "--out", out, corpus}, &stdout, &stderr); code != 0 {
		t.Fatalf("train: exit %d: %s", code, stderr.String())
	}
	written, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	want, err := tokenizer.Train(context.Background(), []string{text}, 400)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(written, want.JSON()) {
		t.Fatal("the command's tokenizer.json differs from tokenizer.Train's")
	}

	for _, special := range []bool{false, true} {
		args := []string{"--tokenizer", out, "--json"}
		if special {
			args = append(args, "--special")
		}
		var ids bytes.Buffer
		stderr.Reset()
		if err := runTokenizerEncode(args, strings.NewReader(text), &ids, &stderr); err != nil {
			t.Fatalf("encode: %v: %s", err, stderr.String())
		}
		var got bytes.Buffer
		if err := runTokenizerDecode([]string{"--tokenizer", out}, &ids, &got, &stderr); err != nil {
			t.Fatalf("decode: %v: %s", err, stderr.String())
		}
		wantText := text
		if special {
			wantText = tokenizer.EndOfText + text
		}
		if got.String() != wantText {
			t.Errorf("special %v: decode(encode(text)) = %q…, want %q…", special, got.String()[:40], wantText[:40])
		}
	}

	// Bad input is refused with the flag or input named.
	stderr.Reset()
	if code := run(context.Background(), []string{"tokenizer", "train", "--vocab", "100", "--out", out, corpus}, &stdout, &stderr); code != 2 || !strings.Contains(stderr.String(), "--vocab 100") {
		t.Errorf("--vocab 100: exit %d, %q", code, stderr.String())
	}
	if err := runTokenizerDecode([]string{"--tokenizer", out}, strings.NewReader("1 x"), &stdout, &stderr); err == nil || !strings.Contains(err.Error(), "id 2") {
		t.Errorf("decode of a non-integer: %v", err)
	}
	if err := runTokenizerDecode([]string{"--tokenizer", out}, strings.NewReader("99999"), &stdout, &stderr); err == nil || !strings.Contains(err.Error(), "99999") {
		t.Errorf("decode of an id outside the vocabulary: %v", err)
	}
}

// TestTrainWithATokenizer: a spec whose data.tokenizer names a tokenizer.json trains a
// model of the tokenizer's vocabulary on its tokens, writes the tokenizer beside
// config.json, and eval reproduces the final validation loss; a model.vocab smaller than
// the tokenizer's is refused naming the field and line.
func TestTrainWithATokenizer(t *testing.T) {
	dir := t.TempDir()
	text, _ := data.Builtin()
	corpus := filepath.Join(dir, "corpus.txt")
	if err := os.WriteFile(corpus, text, 0o644); err != nil {
		t.Fatal(err)
	}
	tokPath := filepath.Join(dir, "tok.json")
	if code, _, stderr := runCLI(t, "tokenizer", "train", "--vocab", "600", "--out", tokPath, corpus); code != 0 {
		t.Fatalf("tokenizer train: exit %d: %s", code, stderr)
	}
	src := strings.Replace(testSpec, "model: {vocab: 256, ", "model: {", 1)
	src = strings.Replace(src, "data: {val_fraction: 0.01}", "data: {val_fraction: 0.05, path: "+corpus+", tokenizer: "+tokPath+"}", 1)
	specPath := filepath.Join(dir, "run.yaml")
	if err := os.WriteFile(specPath, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	if code, _, stderr := runCLI(t, "train", specPath, "--out", out, "--steps", "4"); code != 0 {
		t.Fatalf("train: exit %d:\n%s", code, stderr)
	}
	written, err := os.ReadFile(filepath.Join(out, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile(tokPath)
	if !bytes.Equal(written, want) {
		t.Error("the run's tokenizer.json differs from data.tokenizer's")
	}
	cfg, _ := os.ReadFile(filepath.Join(out, "config.json"))
	if !strings.Contains(string(cfg), `"vocab_size": 600`) {
		t.Errorf("config.json does not give the tokenizer's 600 tokens:\n%s", cfg)
	}
	steps, err := metrics.ReadFile(filepath.Join(out, "metrics.jsonl"))
	if err != nil || len(steps) != 4 || steps[3].ValLoss == nil {
		t.Fatalf("metrics: %d steps, %v", len(steps), err)
	}
	// The loss starts near ln(600), the uniform guess over the tokenizer's vocabulary.
	if l := steps[0].Loss; l < 5.5 || l > 7.5 {
		t.Errorf("first loss %v, want about ln 600 = 6.4", l)
	}
	code, stdout, stderr := runCLI(t, "eval", "--checkpoint", filepath.Join(out, "model.safetensors"), "--json")
	if code != 0 {
		t.Fatalf("eval: exit %d:\n%s", code, stderr)
	}
	var r struct {
		ValLoss float64 `json:"val_loss"`
	}
	if err := json.Unmarshal([]byte(stdout), &r); err != nil || r.ValLoss != *steps[3].ValLoss {
		t.Fatalf("eval val_loss %v (%v), training's final %v", r.ValLoss, err, *steps[3].ValLoss)
	}

	code, stdout, stderr = runCLI(t, "generate", "--checkpoint", out, "--prompt", "First Citizen", "--max-tokens", "8")
	if code != 0 || !strings.HasPrefix(stdout, "First Citizen") || len(stdout) <= len("First Citizen\n") {
		t.Errorf("generate with the run's tokenizer: exit %d, %q, %s", code, stdout, stderr)
	}

	small := strings.Replace(src, "model: {", "model: {vocab: 256, ", 1)
	if err := os.WriteFile(specPath, []byte(small), 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, stderr = runCLI(t, "train", specPath, "--out", filepath.Join(dir, "out2"), "--steps", "1")
	if code == 0 || !strings.Contains(stderr, "run.yaml:4") || !strings.Contains(stderr, "model.vocab") || !strings.Contains(stderr, "600") {
		t.Errorf("model.vocab 256 with a 600-token tokenizer: exit %d, %q", code, stderr)
	}
	bad := strings.Replace(src, tokPath, filepath.Join(dir, "missing.json"), 1)
	if err := os.WriteFile(specPath, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, stderr = runCLI(t, "train", specPath, "--out", filepath.Join(dir, "out3"), "--steps", "1")
	if code == 0 || !strings.Contains(stderr, "run.yaml:7") || !strings.Contains(stderr, "data.tokenizer") {
		t.Errorf("a missing tokenizer: exit %d, %q", code, stderr)
	}
}
