package data_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/data/tokenizer"
)

// randomDocs makes n documents of words, with newlines, digits and non-ASCII text.
func randomDocs(seed uint64, n int) []string {
	rng := rand.New(rand.NewPCG(seed, 1))
	words := []string{"the", "quick", "brown", "fox", "jumps", "über", "naïve", "日本語", "🙂", "42", "1999", "  ", "\n", "over", "lazy", "dog,", "it's"}
	docs := make([]string, n)
	for i := range docs {
		var b strings.Builder
		for range 5 + rng.IntN(300) {
			b.WriteString(words[rng.IntN(len(words))])
			b.WriteByte(' ')
		}
		docs[i] = b.String()
	}
	return docs
}

func toInt32(ids []int) []int32 {
	out := make([]int32, len(ids))
	for i, id := range ids {
		out[i] = int32(id)
	}
	return out
}

// readAll decodes every shard of a prepared directory, checking each file's sha256,
// size and token count against the manifest.
func readAll(t *testing.T, dir string) (*data.Manifest, []int32) {
	t.Helper()
	m, mdir, err := data.ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	var ids []int32
	var total int64
	for i, s := range m.Shards {
		b, err := os.ReadFile(filepath.Join(mdir, s.File))
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		if hex.EncodeToString(sum[:]) != s.SHA256 || int64(len(b)) != s.Bytes {
			t.Errorf("shard %d: sha256 %x and %d bytes, the manifest says %s and %d", i, sum, len(b), s.SHA256, s.Bytes)
		}
		n := len(ids)
		if ids, err = data.AppendShard(ids, b, m.Vocab); err != nil {
			t.Fatal(err)
		}
		if int64(len(ids)-n) != s.Tokens {
			t.Errorf("shard %d holds %d ids, the manifest says %d", i, len(ids)-n, s.Tokens)
		}
		if i < len(m.Shards)-1 && s.Tokens != m.ShardTokens {
			t.Errorf("shard %d of %d holds %d ids, want %d", i, len(m.Shards), s.Tokens, m.ShardTokens)
		}
		total += s.Tokens
	}
	if total != m.Tokens {
		t.Errorf("manifest tokens %d, shards %d", m.Tokens, total)
	}
	return m, ids
}

// Prepared ids are the tokenizer's encoding of each document, joined by the encoding of
// "\n", cut into fixed-size shards whose hashes and counts the manifest gives; a JSON
// lines field other than "text" is read; uint16 below 65,537 tokens.
func TestPrepareRoundTripWithATokenizer(t *testing.T) {
	docs := randomDocs(1, 400)
	tk, err := tokenizer.Train(context.Background(), docs[:50], 600)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	tkPath := filepath.Join(dir, "tokenizer.json")
	if err := os.WriteFile(tkPath, tk.JSON(), 0o644); err != nil {
		t.Fatal(err)
	}
	// Two .jsonl files (a glob) with the text in "body", and extra fields.
	for f := range 2 {
		var b strings.Builder
		for i, d := range docs[f*200 : (f+1)*200] {
			line, _ := json.Marshal(map[string]any{"id": i, "body": d, "text": 7})
			b.Write(line)
			b.WriteByte('\n')
		}
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("part-%d.jsonl", f)), []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out := filepath.Join(dir, "prepared")
	sum := sha256.Sum256(tk.JSON())
	var progressed int
	m, err := data.Prepare(context.Background(), []string{filepath.Join(dir, "part-*.jsonl")}, data.PrepareOptions{
		Out: out, ShardTokens: 5000, Vocab: tk.VocabSize(), Tokenizer: "tokenizer.json", TokenizerSHA256: hex.EncodeToString(sum[:]),
		Field: "body", Workers: 3, Encode: func(s string) []int32 { return toInt32(tk.Encode(s)) },
		Progress: func(int64, int64) { progressed++ },
	})
	if err != nil {
		t.Fatal(err)
	}
	var want []int32
	sep := toInt32(tk.Encode("\n"))
	for i, d := range docs {
		if i > 0 {
			want = append(want, sep...)
		}
		want = append(want, toInt32(tk.Encode(d))...)
	}
	got, ids := readAll(t, out)
	if !slices.Equal(ids, want) {
		t.Fatalf("prepared %d ids, not the encoding of the documents (%d ids)", len(ids), len(want))
	}
	if got.Dtype != "uint16" || got.Vocab != tk.VocabSize() || got.TokenizerSHA256 != hex.EncodeToString(sum[:]) || got.Documents != 400 ||
		len(got.Shards) != (len(want)+4999)/5000 || m.Tokens != int64(len(want)) || progressed == 0 {
		t.Errorf("manifest %+v (progress called %d times): want uint16, the tokenizer's vocabulary, the tokenizer's sha256, 400 documents, %d shards",
			got, progressed, (len(want)+4999)/5000)
	}
}

// With bytes, a directory's files prepare to exactly the bytes Load joins, even when a
// file is cut into pieces; uint32 for a vocabulary over 65,536.
func TestPrepareBytesEqualsLoad(t *testing.T) {
	dir := t.TempDir()
	big := strings.Repeat(strings.Join(randomDocs(2, 50), "\n")+"\n", 40) // several MiB: cut into pieces
	files := map[string]string{"a.txt": "first file\n", "b/c.txt": big, "b/d.txt": "last", ".hidden": "skipped"}
	for name, text := range files {
		p := filepath.Join(dir, "corpus", name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := data.Load(filepath.Join(dir, "corpus"))
	if err != nil {
		t.Fatal(err)
	}
	for _, vocab := range []int{256, 70000} {
		out := filepath.Join(dir, fmt.Sprint("out", vocab))
		_, err := data.Prepare(context.Background(), []string{filepath.Join(dir, "corpus")}, data.PrepareOptions{
			Out: out, ShardTokens: 1 << 20, Vocab: vocab, Tokenizer: "bytes", Encode: func(s string) []int32 { return data.Widen([]byte(s)) }})
		if err != nil {
			t.Fatal(err)
		}
		m, ids := readAll(t, out)
		if !slices.Equal(ids, data.Widen(want)) {
			t.Errorf("vocab %d: prepared %d ids, not the %d bytes Load reads", vocab, len(ids), len(want))
		}
		if wantType := map[int]string{256: "uint16", 70000: "uint32"}[vocab]; m.Dtype != wantType || m.Documents != 3 {
			t.Errorf("vocab %d: dtype %s and %d documents, want %s and 3", vocab, m.Dtype, m.Documents, wantType)
		}
	}
	// A bad record is named by file and line; a glob that matches nothing is refused.
	os.WriteFile(filepath.Join(dir, "bad.jsonl"), []byte("{\"text\": \"a\"}\n{\"body\": \"b\"}\n"), 0o644)
	_, err = data.Prepare(context.Background(), []string{filepath.Join(dir, "bad.jsonl")}, data.PrepareOptions{
		Out: filepath.Join(dir, "bad"), Vocab: 256, Encode: func(s string) []int32 { return data.Widen([]byte(s)) }})
	if want := "bad.jsonl:2: bad record: no \"text\" field"; err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("a record without the field: %v, want %q", err, want)
	}
	_, err = data.Prepare(context.Background(), []string{filepath.Join(dir, "none-*.txt")}, data.PrepareOptions{
		Out: filepath.Join(dir, "none"), Vocab: 256, Encode: func(s string) []int32 { return data.Widen([]byte(s)) }})
	if !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "matches no file") {
		t.Errorf("a glob matching nothing: %v", err)
	}
}

// Load reads a glob's matches in sorted order and a JSON-lines field by name.
func TestLoadGlobAndTextField(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "b.jsonl"), []byte(`{"content": "two"}`+"\n"+`{"content": "three"}`+"\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "a.jsonl"), []byte(`{"content": "one"}`+"\n"), 0o644)
	got, err := data.LoadField(filepath.Join(dir, "*.jsonl"), "content")
	if err != nil || string(got) != "one\ntwo\nthree" {
		t.Errorf("LoadField of a glob = %q, %v; want \"one\\ntwo\\nthree\"", got, err)
	}
	if _, err := data.Load(filepath.Join(dir, "a.jsonl")); err == nil || !strings.Contains(err.Error(), `a.jsonl:1: bad record: no "text" field (set data.text_field`) {
		t.Errorf("Load of records without \"text\": %v", err)
	}
	if got := data.ReplicaShards(7, 1, 3); !slices.Equal(got, []int{1, 4}) {
		t.Errorf("ReplicaShards(7, 1, 3) = %v, want [1 4]", got)
	}
}

// A sampler reading shard files in place draws exactly what one over their decoded ids
// draws, windows across shard boundaries included, from the same position on.
func TestViewSamplerEqualsSliceSampler(t *testing.T) {
	for _, vocab := range []int{300, 70000} {
		out := filepath.Join(t.TempDir(), "p")
		in := filepath.Join(t.TempDir(), "in.txt")
		os.WriteFile(in, []byte(strings.Join(randomDocs(3, 20), "\n")), 0o644)
		rng := rand.New(rand.NewPCG(4, 4))
		m, err := data.Prepare(context.Background(), []string{in}, data.PrepareOptions{Out: out, ShardTokens: 97, Vocab: vocab,
			Encode: func(s string) []int32 {
				ids := make([]int32, len(s))
				for i := range ids {
					ids[i] = int32(rng.IntN(vocab)) // any ids below vocab
				}
				return ids
			}})
		if err != nil {
			t.Fatal(err)
		}
		idx := []int{0, 2, 3, 5}
		ids, err := m.LoadShards(out, idx)
		if err != nil {
			t.Fatal(err)
		}
		var paths, sums []string
		for _, i := range idx {
			paths = append(paths, filepath.Join(out, m.Shards[i].File))
			sums = append(sums, m.Shards[i].SHA256)
		}
		view, err := data.OpenShardView(paths, sums, vocab)
		if err != nil || view.Len() != len(ids) {
			t.Fatalf("view of %d ids, %v; want %d", view.Len(), err, len(ids))
		}
		a, _ := data.NewSampler(ids, 40, 9, 1)
		b, err := data.NewViewSampler(view, 40, 9, 1)
		if err != nil {
			t.Fatal(err)
		}
		ia, ta, ib, tb := make([]int32, 400), make([]int32, 400), make([]int32, 400), make([]int32, 400)
		for step := range 50 {
			if step == 25 { // a resumed sampler continues the same stream
				st, _ := a.State()
				b, _ = data.NewViewSampler(view, 40, 9, 1)
				b.SetState(st)
			}
			a.Next(ia, ta)
			b.Next(ib, tb)
			if !slices.Equal(ia, ib) || !slices.Equal(ta, tb) {
				t.Fatalf("vocab %d, draw %d: the view sampler's sequences differ", vocab, step)
			}
		}
		if _, err := data.OpenShardView(paths, sums, 10); !errors.Is(err, data.ErrBadShard) {
			t.Errorf("ids over the vocabulary: %v, want ErrBadShard", err)
		}
		sums[1] = m.Shards[0].SHA256
		if _, err := data.OpenShardView(paths, sums, vocab); !errors.Is(err, data.ErrBadShard) || !strings.Contains(err.Error(), "sha256") {
			t.Errorf("a shard that is not the one named: %v, want ErrBadShard naming the sha256", err)
		}
	}
}
