package tokenizer

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/text/unicode/norm"
)

// The reference: Hugging Face's Tokenizers.js, the tokenizer of Transformers.js, run by
// node. PIPESWARM_TOKENIZERS_JS names its package directory
// (…/node_modules/@huggingface/tokenizers); without it, npm's global one is used.
const tokenizersJSVersion = "0.2.0"

// tokenizersJS returns the module file of Tokenizers.js, or skips the test saying what is
// missing.
func tokenizersJS(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("node"); err != nil {
		t.Skip("node not in PATH: install Node.js 20 and 'npm install -g @huggingface/tokenizers@" + tokenizersJSVersion + "' to compare with Tokenizers.js")
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
		t.Skipf("@huggingface/tokenizers not found in %s: 'npm install -g @huggingface/tokenizers@%s' or set PIPESWARM_TOKENIZERS_JS", dir, tokenizersJSVersion)
	}
	var pkg struct{ Version string }
	if err := json.Unmarshal(raw, &pkg); err != nil || pkg.Version != tokenizersJSVersion {
		t.Skipf("@huggingface/tokenizers in %s is version %q, want %s", dir, pkg.Version, tokenizersJSVersion)
	}
	return filepath.Join(dir, "dist", "tokenizers.mjs")
}

type jsResult struct {
	IDs     [][]int   `json:"ids"`
	Decoded []string  `json:"decoded"`
	Seconds []float64 `json:"seconds"`
	CPU     []float64 `json:"cpu_seconds"`
}

// runJS encodes and decodes texts with Tokenizers.js, and times reps encodings of bench.
func runJS(t *testing.T, module string, tk *Tokenizer, texts []string, bench string, reps int) jsResult {
	t.Helper()
	dir := t.TempDir()
	tokFile, inFile := filepath.Join(dir, "tokenizer.json"), filepath.Join(dir, "input.json")
	if err := os.WriteFile(tokFile, tk.JSON(), 0o644); err != nil {
		t.Fatal(err)
	}
	in, err := json.Marshal(map[string]any{"texts": texts, "bench": bench, "reps": reps})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(inFile, in, 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("node", "--max-old-space-size=4096", filepath.Join("testdata", "tokenizersjs.mjs"), module, tokFile, inFile)
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("node: %v", err)
	}
	var r jsResult
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("node output: %v", err)
	}
	if len(r.IDs) != len(texts) && len(texts) > 0 {
		t.Fatalf("node encoded %d texts of %d", len(r.IDs), len(texts))
	}
	return r
}

// shakespeare returns tinyshakespeare, or "" when the shared data is absent.
func shakespeare(t *testing.T) string {
	b, err := os.ReadFile(filepath.Join("..", "..", "..", "..", "shared", "data", "tinyshakespeare.txt"))
	if err != nil {
		t.Logf("tinyshakespeare not found beside the repository (../shared/data/tinyshakespeare.txt): comparing on the random corpus only")
		return ""
	}
	return string(b)
}

// styled rewrites a trained tokenizer's rules into the tokenizer.json of another family:
// "gpt2" (string merges, <|endoftext|> in the vocabulary, no template), "llama3" and
// "qwen2" (pair merges, a Split pre-tokenizer with their pattern, ignore_merges, a BOS;
// Qwen2's NFC normalizer).
func styled(t *testing.T, base *Tokenizer, style string) *Tokenizer {
	t.Helper()
	var f map[string]any
	if err := json.Unmarshal(base.JSON(), &f); err != nil {
		t.Fatal(err)
	}
	model := f["model"].(map[string]any)
	merges := model["merges"].([]any)
	vocab := model["vocab"].(map[string]any)
	n := len(vocab)
	switch style {
	case "gpt2":
		strs := make([]string, len(merges))
		for i, m := range merges {
			p := m.([]any)
			strs[i] = p[0].(string) + " " + p[1].(string)
		}
		model["merges"] = strs
		vocab[EndOfText] = n
		f["post_processor"] = map[string]any{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}
	case "llama3", "qwen2":
		var src string
		for s, p := range patternSources {
			if (style == "llama3" && p == patternLlama3) || (style == "qwen2" && p == patternQwen2) {
				src = s
			}
		}
		f["pre_tokenizer"] = map[string]any{"type": "Sequence", "pretokenizers": []any{
			map[string]any{"type": "Split", "pattern": map[string]any{"Regex": src}, "behavior": "Isolated", "invert": false},
			map[string]any{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
		}}
		model["ignore_merges"] = true
		if style == "qwen2" {
			f["normalizer"] = map[string]any{"type": "NFC"}
		}
		bos, eos := "<|begin_of_text|>", "<|end_of_text|>"
		f["added_tokens"] = []any{
			map[string]any{"id": n, "content": bos, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
			map[string]any{"id": n + 1, "content": eos, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
		}
		f["post_processor"] = map[string]any{"type": "Sequence", "processors": []any{
			map[string]any{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
			map[string]any{"type": "TemplateProcessing",
				"single":         []any{map[string]any{"SpecialToken": map[string]any{"id": bos, "type_id": 0}}, map[string]any{"Sequence": map[string]any{"id": "A", "type_id": 0}}},
				"pair":           []any{map[string]any{"SpecialToken": map[string]any{"id": bos, "type_id": 0}}, map[string]any{"Sequence": map[string]any{"id": "A", "type_id": 0}}, map[string]any{"Sequence": map[string]any{"id": "B", "type_id": 1}}},
				"special_tokens": map[string]any{bos: map[string]any{"id": bos, "ids": []int{n}, "tokens": []string{bos}}},
			},
		}}
	}
	b, err := json.Marshal(f)
	if err != nil {
		t.Fatal(err)
	}
	tk, err := Parse(b)
	if err != nil {
		t.Fatalf("%s: %v", style, err)
	}
	return tk
}

// firstDiff describes where two id lists part.
func firstDiff(tk *Tokenizer, text string, got, want []int) string {
	k := 0
	for k < len(got) && k < len(want) && got[k] == want[k] {
		k++
	}
	lo := max(0, k-3)
	ctx := func(ids []int) string { return fmt.Sprintf("%q", tokensOf(tk, ids[lo:min(len(ids), k+4)])) }
	prefix, _ := tk.DecodeBytes(got[:k])
	return fmt.Sprintf("first difference at token %d (byte %d of %d): go %s, tokenizers.js %s", k, len(prefix), len(text), ctx(got), ctx(want))
}

// TestTokenizersJSParity: on tinyshakespeare and on random Unicode text, every tokenizer
// below encodes to the same ids as Tokenizers.js and decodes to the same text.
func TestTokenizersJSParity(t *testing.T) {
	module := tokenizersJS(t)
	random := randomCorpus(11, 400, 300)
	texts := append(slices.Clone(random), strings.Join(randomCorpus(12, 200, 400), ""))
	trainTexts := random
	if s := shakespeare(t); s != "" {
		texts = append(texts, s)
		// With the random text, so that the vocabulary holds merges of digits, where the
		// Llama 3 and Qwen2 patterns part.
		trainTexts = append([]string{s}, random...)
	}
	ctx := context.Background()
	onText, err := Train(ctx, trainTexts, 2000)
	if err != nil {
		t.Fatal(err)
	}
	onRandom, err := Train(ctx, randomCorpus(13, 300, 300), 256+1+400)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		tk   *Tokenizer
	}{
		{"trained", onText},
		{"gpt2", styled(t, onRandom, "gpt2")},
		{"llama3", styled(t, onText, "llama3")},
		{"qwen2", styled(t, onText, "qwen2")},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := runJS(t, module, c.tk, texts, "", 0)
			tokens := 0
			for i, text := range texts {
				got := c.tk.Encode(text)
				tokens += len(got)
				if !slices.Equal(got, r.IDs[i]) {
					t.Fatalf("text %d (%d bytes): %s", i, len(text), firstDiff(c.tk, text, got, r.IDs[i]))
				}
				dec, err := c.tk.Decode(got)
				if err != nil {
					t.Fatal(err)
				}
				if dec != r.Decoded[i] {
					t.Fatalf("text %d: decoded %q, tokenizers.js %q", i, dec, r.Decoded[i])
				}
				want := text
				if c.tk.nfc {
					want = norm.NFC.String(text)
				}
				if dec != want {
					t.Fatalf("text %d: decoded %q, want the text %q", i, dec, want)
				}
			}
			t.Logf("%d texts, %d tokens agree with Tokenizers.js %s", len(texts), tokens, tokenizersJSVersion)
		})
	}
}

// TestThroughputAgainstTokenizersJS logs the encoding speed of this package and of
// Tokenizers.js on the same text (tinyshakespeare when present): the median of three
// encodings each, after the same warm-up (the first of the three fills the word caches).
func TestThroughputAgainstTokenizersJS(t *testing.T) {
	module := tokenizersJS(t)
	text := shakespeare(t)
	if text == "" {
		text = strings.Join(randomCorpus(14, 2000, 400), "")
	}
	tk, err := Train(context.Background(), []string{text}, 2000)
	if err != nil {
		t.Fatal(err)
	}
	const reps = 3
	var goSec, goCPU []float64
	for range reps {
		start, cpu0 := time.Now(), cpuSeconds()
		tk.Encode(text)
		goSec = append(goSec, time.Since(start).Seconds())
		goCPU = append(goCPU, cpuSeconds()-cpu0)
	}
	r := runJS(t, module, tk, nil, text, reps)
	mb := float64(len(text)) / 1e6
	median := func(s []float64) float64 { s = slices.Clone(s); sort.Float64s(s); return s[len(s)/2] }
	// Wall time depends on what else the machine runs; CPU time (of the whole process,
	// garbage collection included) much less.
	t.Logf("encode %.2f MB, vocabulary %d, medians of %d:\n"+
		"  pipeswarm          %6.1f MB/s wall, %6.1f MB/s of CPU time (wall %.3v s, CPU %.3v s)\n"+
		"  Tokenizers.js %s %6.1f MB/s wall, %6.1f MB/s of CPU time (wall %.3v s, CPU %.3v s)",
		mb, tk.VocabSize(), reps,
		mb/median(goSec), mb/median(goCPU), goSec, goCPU,
		tokenizersJSVersion, mb/median(r.Seconds), mb/median(r.CPU), r.Seconds, r.CPU)
}

// cpuSeconds is the user and system time this process has used.
func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}
