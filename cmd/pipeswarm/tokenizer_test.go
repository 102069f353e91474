package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/data/tokenizer"
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
