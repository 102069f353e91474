package spec

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/data"
)

// withData returns base with the data section replaced by lines, and the line of each
// field written.
func withData(lines ...string) ([]byte, map[string]int) {
	src := strings.Replace(base, "data:\n  path: \"\"\n  val_fraction: 0.1\n", "data:\n  "+strings.Join(lines, "\n  ")+"\n", 1)
	at := map[string]int{}
	first := strings.Count(src[:strings.Index(src, "data:\n")], "\n") + 2
	for i, l := range lines {
		name, _, _ := strings.Cut(l, ":")
		at["data."+name] = first + i
	}
	return []byte(src), at
}

func prepare(t *testing.T, out string, vocab int, tokenizerSHA string) {
	t.Helper()
	in := filepath.Join(t.TempDir(), "in.txt")
	if err := os.WriteFile(in, []byte(strings.Repeat("some text to train on\n", 200)), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := data.Prepare(context.Background(), []string{in}, data.PrepareOptions{Out: out, ShardTokens: 1000, Vocab: vocab,
		TokenizerSHA256: tokenizerSHA, Encode: func(s string) []int32 { return data.Widen([]byte(s)) }})
	if err != nil {
		t.Fatal(err)
	}
}

// data.path globs, data.text_field and data.val_path parse, and each is refused with
// its file and line when it names nothing; a prepared data.path needs a prepared
// data.val_path made with the same tokenizer, and sizes model.vocab.
func TestCheckDataGlobTextFieldValPath(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"a.jsonl", "b.jsonl"} {
		os.WriteFile(filepath.Join(dir, f), []byte(`{"body": "x"}`+"\n"), 0o644)
	}
	check := func(name string, src []byte, want string) *Spec {
		t.Helper()
		s, err := Parse(src, "t.yaml")
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		err = s.CheckData()
		switch {
		case want == "" && err != nil:
			t.Errorf("%s: %v", name, err)
		case want != "" && (err == nil || !strings.HasPrefix(err.Error(), want) || !errors.Is(err, ErrInvalid)):
			t.Errorf("%s: %v, want an ErrInvalid starting %q", name, err, want)
		}
		return s
	}
	glob := strconv.Quote(filepath.Join(dir, "*.jsonl"))
	src, _ := withData("path: "+glob, "text_field: body", "val_path: "+strconv.Quote(filepath.Join(dir, "b.jsonl")))
	s := check("a glob, a field and a val_path", src, "")
	if s.Data.TextField != "body" || s.Data.ValPath != filepath.Join(dir, "b.jsonl") {
		t.Errorf("data parsed as %+v", s.Data)
	}
	if again := mustParse(t, []byte(s.String())); again.Data != s.Data {
		t.Errorf("data does not survive a round trip: %+v, then %+v", s.Data, again.Data)
	}
	if strings.Contains(mustParse(t, []byte(base)).String(), "val_path") {
		t.Error("a spec without data.val_path writes it")
	}
	none := strconv.Quote(filepath.Join(dir, "*.txt"))
	src, at := withData("path: " + none)
	check("a glob matching nothing", src, fmt.Sprintf("t.yaml:%d: data.path: %s: glob", at["data.path"], none))
	src, at = withData("path: "+glob, "val_path: "+strconv.Quote(filepath.Join(dir, "missing.jsonl")))
	check("a missing val_path", src, fmt.Sprintf("t.yaml:%d: data.val_path: %q: no such file or directory", at["data.val_path"], filepath.Join(dir, "missing.jsonl")))

	// Prepared datasets.
	tr, val, val600 := filepath.Join(dir, "train"), filepath.Join(dir, "val"), filepath.Join(dir, "val600")
	prepare(t, tr, 256, "")
	prepare(t, val, 256, "")
	prepare(t, val600, 600, "")
	src, at = withData("path: " + strconv.Quote(tr))
	check("prepared without val_path", src, fmt.Sprintf("t.yaml:%d: data.val_path: missing: data.path %q is a prepared dataset", at["data.path"], tr))
	src, at = withData("path: "+strconv.Quote(tr), "val_path: "+strconv.Quote(filepath.Join(dir, "a.jsonl")))
	check("prepared with text val_path", src, fmt.Sprintf("t.yaml:%d: data.val_path:", at["data.val_path"]))
	src, at = withData("path: "+strconv.Quote(tr), "val_path: "+strconv.Quote(val600))
	check("val_path of another vocabulary", src, fmt.Sprintf("t.yaml:%d: data.val_path:", at["data.val_path"]))
	src, _ = withData("path: "+strconv.Quote(filepath.Join(tr, data.ManifestName)), "val_path: "+strconv.Quote(val))
	check("prepared, named by its manifest", src, "")

	// model.vocab: taken from the dataset when left out, refused when smaller.
	big, bigVal := filepath.Join(dir, "big"), filepath.Join(dir, "bigval")
	prepare(t, big, 600, "")
	prepare(t, bigVal, 600, "")
	src, _ = withData("path: "+strconv.Quote(big), "val_path: "+strconv.Quote(bigVal))
	vocabLine := strings.Count(base[:strings.Index(base, "  vocab:")], "\n") + 1
	check("model.vocab below the dataset's", src, fmt.Sprintf("t.yaml:%d: model.vocab: 256 is smaller than the 600 tokens", vocabLine))
	noVocab := strings.Replace(string(src), "  vocab: 256\n", "", 1)
	if s := check("model.vocab left out", []byte(noVocab), ""); s.Model.Vocab != 600 {
		t.Errorf("model.vocab = %d, want the dataset's 600", s.Model.Vocab)
	}

	// data.tokenizer must be the one the shards were made with.
	tok := filepath.Join(dir, "tok.json")
	os.WriteFile(tok, []byte(`{"not": "the one"}`), 0o644)
	sum := sha256.Sum256([]byte("another"))
	withTok, withTokVal := filepath.Join(dir, "withtok"), filepath.Join(dir, "withtokval")
	prepare(t, withTok, 256, hex.EncodeToString(sum[:]))
	prepare(t, withTokVal, 256, hex.EncodeToString(sum[:]))
	src, at = withData("path: "+strconv.Quote(withTok), "val_path: "+strconv.Quote(withTokVal), "tokenizer: "+strconv.Quote(tok))
	check("another tokenizer", src, fmt.Sprintf("t.yaml:%d: data.tokenizer: %q is not the tokenizer", at["data.tokenizer"], tok))
}
