package launcher

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/spec"
)

// The plan's tokenizer hash is the data.tokenizer file's sha256, or else a prepared
// data.path's manifest's, or none for bytes; a resumed run refuses another one, naming
// the field and both hashes.
func TestTokenizerHashOfTheRunAndItsResumeCheck(t *testing.T) {
	dir := t.TempDir()
	parse := func(dataLine string) *spec.Spec {
		t.Helper()
		sp, err := spec.Parse([]byte("name: h\nmodel: {d_model: 32, n_layers: 1, n_heads: 2, d_ff: 64, seq_len: 16}\n"+
			"train: {batch_size: 2, steps: 2, lr: 0.001}\ndata: "+dataLine+"\n"), "h.yaml")
		if err != nil {
			t.Fatal(err)
		}
		return sp
	}
	tok := filepath.Join(dir, "tok.json")
	if err := os.WriteFile(tok, []byte(`{"any": "bytes will do for a hash"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(tok)
	sum := sha256.Sum256(raw)
	fileSum := hex.EncodeToString(sum[:])

	if got, err := tokenizerSHA256(parse("{tokenizer: " + tok + "}")); err != nil || got != fileSum {
		t.Errorf("data.tokenizer: hash %q, %v; want the file's %s", got, err, fileSum)
	}
	if got, err := tokenizerSHA256(parse("{val_fraction: 0.1}")); err != nil || got != "" {
		t.Errorf("bytes: hash %q, %v; want none", got, err)
	}
	if _, err := tokenizerSHA256(parse("{tokenizer: " + filepath.Join(dir, "gone.json") + "}")); err == nil || !strings.Contains(err.Error(), "data.tokenizer") {
		t.Errorf("a missing tokenizer: %v; want an error naming data.tokenizer", err)
	}

	// A prepared dataset: the manifest's tokenizer hash, with no data.tokenizer named.
	text := filepath.Join(dir, "text.txt")
	if err := os.WriteFile(text, []byte(strings.Repeat("some prepared text\n", 50)), 0o644); err != nil {
		t.Fatal(err)
	}
	const manifestSum = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
	prepared := filepath.Join(dir, "prepared")
	if _, err := data.Prepare(context.Background(), []string{text}, data.PrepareOptions{Out: prepared, Vocab: 256,
		Encode: func(s string) []int32 {
			ids := make([]int32, len(s))
			for i := range len(s) {
				ids[i] = int32(s[i])
			}
			return ids
		}, Tokenizer: "tok.json", TokenizerSHA256: manifestSum}); err != nil {
		t.Fatal(err)
	}
	preparedSpec := parse("{path: " + prepared + ", val_path: " + prepared + "}")
	if got, err := tokenizerSHA256(preparedSpec); err != nil || got != manifestSum {
		t.Errorf("prepared: hash %q, %v; want the manifest's %s", got, err, manifestSum)
	}

	rec := &runRecord{Run: "00000000000000ab", TokenizerSHA256: fileSum}
	withTok := parse("{tokenizer: " + tok + "}")
	if err := checkSameTokenizer(rec, withTok, fileSum); err != nil {
		t.Errorf("the same tokenizer: %v", err)
	}
	if err := checkSameTokenizer(&runRecord{Run: rec.Run}, withTok, fileSum); err != nil {
		t.Errorf("a run.json without a hash: %v", err)
	}
	err := checkSameTokenizer(rec, withTok, manifestSum)
	if err == nil || !strings.Contains(err.Error(), `data.tokenizer "`+tok+`" has changed`) ||
		!strings.Contains(err.Error(), fileSum) || !strings.Contains(err.Error(), manifestSum) {
		t.Errorf("a changed data.tokenizer: %v; want it named with both hashes", err)
	}
	err = checkSameTokenizer(rec, preparedSpec, manifestSum)
	if err == nil || !strings.Contains(err.Error(), "the tokenizer of data.path") || !strings.Contains(err.Error(), "tokenizer_sha256") {
		t.Errorf("a prepared dataset of another tokenizer: %v; want data.path and its manifest named", err)
	}
}
