package tokenizer

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"
)

// byteVocab returns the 256 byte tokens in GPT-2's order, as a vocab map.
func byteVocab() map[string]int {
	v := map[string]int{}
	runes := make([]rune, 0, 256)
	for b := range 256 {
		runes = append(runes, byteRune[b])
	}
	slices.Sort(runes)
	for i, r := range runes {
		v[string(r)] = i
	}
	return v
}

// handTokenizer builds a GPT-2-style tokenizer.json from merges given as "a b".
func handTokenizer(t *testing.T, merges []string, mutate func(m map[string]any)) []byte {
	t.Helper()
	vocab := byteVocab()
	for _, m := range merges {
		a, b, _ := strings.Cut(m, " ")
		if _, ok := vocab[a+b]; !ok {
			vocab[a+b] = len(vocab)
		}
	}
	doc := map[string]any{
		"version":        "1.0",
		"added_tokens":   []any{map[string]any{"id": len(vocab), "content": EndOfText, "special": true}},
		"normalizer":     nil,
		"pre_tokenizer":  map[string]any{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
		"post_processor": map[string]any{"type": "ByteLevel", "trim_offsets": true},
		"decoder":        map[string]any{"type": "ByteLevel"},
		"model":          map[string]any{"type": "BPE", "vocab": vocab, "merges": merges},
	}
	if mutate != nil {
		mutate(doc)
	}
	b, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func tokensOf(t *Tokenizer, ids []int) []string {
	out := make([]string, len(ids))
	for i, id := range ids {
		out[i] = t.Token(id)
	}
	return out
}

func TestEncodeHandChecked(t *testing.T) {
	tk, err := Parse(handTokenizer(t, []string{"h e", "Ġ t", "Ġt he", "a t", "t he", "Ġ h", "Ġh at", "i n", "a a"}, nil))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		text string
		want []string
	}{
		// "the": h+e (rank 0) first, then t+he (rank 4).
		{"the cat in the hat", []string{"the", "Ġ", "c", "at", "Ġ", "in", "Ġthe", "Ġhat"}},
		// Equal ranks merge leftmost first.
		{"aaa", []string{"aa", "a"}},
		{"aaaa", []string{"aa", "aa"}},
		// An added token is split out before pre-tokenisation, wherever it is.
		{"the<|endoftext|>the", []string{"the", EndOfText, "the"}},
		// Bytes of a multi-byte character in the byte-level alphabet: é is C3 A9.
		{"é", []string{"Ã", "©"}},
		{"", []string{}},
	} {
		got := tokensOf(tk, tk.Encode(c.text))
		if !slices.Equal(got, c.want) {
			t.Errorf("Encode(%q) = %q, want %q", c.text, got, c.want)
		}
		if s, err := tk.Decode(tk.Encode(c.text)); err != nil || s != c.text {
			t.Errorf("Decode(Encode(%q)) = %q, %v", c.text, s, err)
		}
	}
	// A long word takes the heap path: it must merge as the scan does.
	long := strings.Repeat("the hat ", 40)
	word := tk.Encode(strings.Repeat("a", 101))
	if got := tokensOf(tk, word); len(got) != 51 || got[50] != "a" || got[0] != "aa" {
		t.Errorf("101 a's = %d tokens %q…, want 50 aa and one a", len(got), got[:3])
	}
	if s, _ := tk.Decode(tk.Encode(long)); s != long {
		t.Errorf("round trip of %q failed", long)
	}
}

func TestPatternsHandChecked(t *testing.T) {
	for _, c := range []struct {
		p    pattern
		text string
		want []string
	}{
		{patternGPT2, "Hello world's 123 foo!!  bar\n\n  x", []string{"Hello", " world", "'s", " 123", " foo", "!!", " ", " bar", "\n\n ", " x"}},
		{patternGPT2, "I'M we'll", []string{"I", "'", "M", " we", "'ll"}},
		{patternGPT2, "end   ", []string{"end", "   "}},
		{patternGPT2, "a \u3000b", []string{"a", " ", "\u3000", "b"}},
		// \s is Unicode's White_Space, as in Oniguruma: U+0085 is white space, U+FEFF is not.
		{patternGPT2, "a\u0085\u0085b", []string{"a", "\u0085", "\u0085", "b"}},
		{patternGPT2, "a \ufeffb", []string{"a", " \ufeff", "b"}},
		{patternLlama3, "I'M we'LL", []string{"I", "'M", " we", "'LL"}},
		{patternLlama3, "abc12345 def", []string{"abc", "123", "45", " def"}},
		{patternLlama3, "hello\n\n  world", []string{"hello", "\n\n", " ", " world"}},
		{patternLlama3, "x...\n\ny", []string{"x", "...\n\n", "y"}},
		// The optional prefix of a letter run is not a space before punctuation.
		{patternLlama3, "$hello «word", []string{"$hello", " «", "word"}},
		{patternQwen2, "abc123", []string{"abc", "1", "2", "3"}},
	} {
		got := c.p.split(nil, c.text)
		if !slices.Equal(got, c.want) {
			t.Errorf("pattern %d split(%q) = %q, want %q", c.p, c.text, got, c.want)
		}
	}
}

func TestInvalidUTF8IsReplaced(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"a\xffb", "a\uFFFDb"},
		{"\xe2\x82a", "\uFFFDa"},               // a truncated three-byte sequence is one U+FFFD
		{"\xed\xa0\x80", "\uFFFD\uFFFD\uFFFD"}, // a surrogate: ED A0 is not a valid prefix
		{"\xf0\x9f\x98", "\uFFFD"},
		{"ok", "ok"},
	} {
		if got := validUTF8(c.in); got != c.want {
			t.Errorf("validUTF8(%q) = %q, want %q", c.in, got, c.want)
		}
	}
	tk := trained(t)
	if a, b := tk.Encode("x\xe2\x82y"), tk.Encode("x\uFFFDy"); !slices.Equal(a, b) {
		t.Errorf("invalid UTF-8 encodes as %v, U+FFFD as %v", a, b)
	}
}

func TestRefusesWhatItCannotFollow(t *testing.T) {
	for _, c := range []struct {
		field  string
		mutate func(m map[string]any)
	}{
		{"model.type", func(m map[string]any) { m["model"].(map[string]any)["type"] = "WordPiece" }},
		{"normalizer.type", func(m map[string]any) { m["normalizer"] = map[string]any{"type": "NFKC"} }},
		{"pre_tokenizer.type", func(m map[string]any) { m["pre_tokenizer"] = map[string]any{"type": "Metaspace"} }},
		{"pre_tokenizer.pretokenizers[0].pattern.Regex", func(m map[string]any) {
			m["pre_tokenizer"] = map[string]any{"type": "Sequence", "pretokenizers": []any{
				map[string]any{"type": "Split", "pattern": map[string]any{"Regex": `\w+`}, "behavior": "Isolated", "invert": false},
				map[string]any{"type": "ByteLevel", "use_regex": false},
			}}
		}},
		{"model.dropout", func(m map[string]any) { m["model"].(map[string]any)["dropout"] = 0.1 }},
		{"model.merges[0]", func(m map[string]any) { m["model"].(map[string]any)["merges"] = []any{"Ġ q z"} }},
		{"decoder.type", func(m map[string]any) { m["decoder"] = map[string]any{"type": "Metaspace"} }},
		{"post_processor.type", func(m map[string]any) { m["post_processor"] = map[string]any{"type": "BertProcessing"} }},
		{"added_tokens[0].single_word", func(m map[string]any) {
			m["added_tokens"].([]any)[0].(map[string]any)["single_word"] = true
		}},
	} {
		_, err := Parse(handTokenizer(t, []string{"h e"}, c.mutate))
		if err == nil || !strings.Contains(err.Error(), c.field) {
			t.Errorf("%s: got error %v, want one naming the field", c.field, err)
		}
		if err != nil && !errors.Is(err, ErrUnsupported) && !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: error %v is neither ErrUnsupported nor ErrInvalid", c.field, err)
		}
	}
}

func TestMergesInBothForms(t *testing.T) {
	merges := []string{"h e", "Ġ t", "Ġt he"}
	a, err := Parse(handTokenizer(t, merges, nil))
	if err != nil {
		t.Fatal(err)
	}
	b, err := Parse(handTokenizer(t, merges, func(m map[string]any) {
		var pairs [][2]string
		for _, s := range merges {
			x, y, _ := strings.Cut(s, " ")
			pairs = append(pairs, [2]string{x, y})
		}
		m["model"].(map[string]any)["merges"] = pairs
	}))
	if err != nil {
		t.Fatal(err)
	}
	if x, y := a.Encode(" the"), b.Encode(" the"); !slices.Equal(x, y) || len(x) != 1 {
		t.Errorf("string merges give %v, pair merges %v, want one and the same token", x, y)
	}
}

func TestIgnoreMergesAndBOS(t *testing.T) {
	// "ab" is in the vocabulary but no merge makes it from a, b: only ignore_merges finds it.
	raw := handTokenizer(t, []string{"b c"}, func(m map[string]any) {
		model := m["model"].(map[string]any)
		v := model["vocab"].(map[string]int)
		v["ab"] = len(v) + 1
		model["ignore_merges"] = true
		m["post_processor"] = map[string]any{"type": "TemplateProcessing",
			"single": []any{map[string]any{"SpecialToken": map[string]any{"id": EndOfText}}, map[string]any{"Sequence": map[string]any{"id": "A"}}}}
	})
	tk, err := Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	if got := tokensOf(tk, tk.Encode("ab abc")); !slices.Equal(got, []string{"ab", "Ġ", "a", "bc"}) {
		t.Errorf("ignore_merges: %q", got)
	}
	ids := tk.AppendEncode(nil, "ab", true)
	if got := tokensOf(tk, ids); !slices.Equal(got, []string{EndOfText, "ab"}) {
		t.Errorf("with special tokens: %q", got)
	}
}

var (
	trainOnce sync.Once
	trainedTk *Tokenizer
	trainErr  error
)

// trained is a tokenizer learnt from English and the random corpus.
func trained(t testing.TB) *Tokenizer {
	trainOnce.Do(func() {
		texts := append(randomCorpus(1, 300, 200), strings.Repeat("the quick brown fox jumps over the lazy dog. ", 50))
		trainedTk, trainErr = Train(context.Background(), texts, 700)
	})
	if trainErr != nil {
		t.Fatal(trainErr)
	}
	return trainedTk
}

func TestTrain(t *testing.T) {
	tk := trained(t)
	if tk.VocabSize() != 700 {
		t.Errorf("vocabulary %d, want 700", tk.VocabSize())
	}
	// The trained file reads back to the same tokenizer.
	again, err := Parse(tk.JSON())
	if err != nil {
		t.Fatal(err)
	}
	text := "the quick brown fox"
	if a, b := tk.Encode(text), again.Encode(text); !slices.Equal(a, b) || len(a) >= len(text)/2 {
		t.Errorf("trained %v, reloaded %v: want equal and merged well below the %d bytes", a, b, len(text))
	}
	for _, s := range randomCorpus(2, 50, 100) {
		got, err := tk.Decode(tk.Encode(s))
		if err != nil || got != s {
			t.Fatalf("round trip of %q = %q, %v", s, got, err)
		}
	}
	if _, err := Train(context.Background(), []string{"x"}, 100); err == nil {
		t.Error("a vocabulary of 100 was accepted")
	}
}

// roundTrip checks Encode and Decode on s for tk.
func roundTrip(t *testing.T, tk *Tokenizer, s string) {
	ids := tk.Encode(s)
	b, err := tk.DecodeBytes(ids)
	if err != nil {
		t.Fatal(err)
	}
	if want := validUTF8(s); string(b) != want {
		t.Fatalf("DecodeBytes(Encode(%q)) = %q, want %q", s, b, want)
	}
	// The pieces of each pattern cover the text; the heap merges as the scan does.
	v := validUTF8(s)
	for _, p := range []pattern{patternGPT2, patternLlama3, patternQwen2} {
		pieces := p.split(nil, v)
		if strings.Join(pieces, "") != v {
			t.Fatalf("pattern %d pieces %q do not join to %q", p, pieces, v)
		}
		for _, w := range pieces {
			if w == "" || !utf8.ValidString(w) {
				t.Fatalf("pattern %d piece %q of %q", p, w, v)
			}
			word := make([]int32, len(w))
			for k := range len(w) {
				word[k] = tk.byteID[w[k]]
			}
			a := tk.bpeHeap(slices.Clone(word))
			if len(word) <= 48 {
				if b := tk.bpe(slices.Clone(word)); !slices.Equal(a, b) {
					t.Fatalf("heap merges %q to %v, scan to %v", w, a, b)
				}
			}
		}
	}
}

func FuzzRoundTrip(f *testing.F) {
	for _, s := range randomCorpus(3, 40, 60) {
		f.Add(s)
	}
	for _, s := range []string{"", " ", "\xff\xfe", "a\xe2\x82", strings.Repeat(" ", 300), strings.Repeat("ab", 200), "<|endoftext|><|endoftext|>", "'s's'S"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		roundTrip(t, trained(t), s)
	})
}

func BenchmarkEncode(b *testing.B) {
	tk := trained(b)
	text := strings.Join(randomCorpus(4, 200, 400), "")
	b.SetBytes(int64(len(text)))
	for b.Loop() {
		tk.Encode(text)
	}
}
