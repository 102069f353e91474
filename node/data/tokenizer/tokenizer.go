// Package tokenizer encodes text into the token ids of a byte-level BPE tokenizer (the
// kind of GPT-2, Llama 3 and Qwen) read from a Hugging Face tokenizer.json, decodes ids
// back into text, and learns such a tokenizer from text.
//
// Encoding agrees with Hugging Face's tokenizers token for token: added tokens are split
// out first, the rest is cut into pre-tokens by the tokenizer's pattern (written by hand,
// as Go's regexp has no look-ahead), each pre-token's bytes are spelt in the byte-level
// alphabet and merged by the BPE rules, lowest rank first. A tokenizer.json this package
// cannot follow exactly (another model kind, a normalizer other than NFC, an unknown
// pattern) is refused
// with the field named. Text that is not valid UTF-8 has each maximal ill-formed
// subsequence replaced by U+FFFD before encoding, as Hugging Face's tokenizers do when
// given bytes decoded with errors="replace" (and as TextDecoder does in JavaScript).
package tokenizer

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"unicode"
	"unicode/utf8"

	"golang.org/x/text/unicode/norm"
)

// ErrUnsupported means a tokenizer.json asks for something this package does not do.
var ErrUnsupported = errors.New("unsupported tokenizer")

// ErrInvalid means a tokenizer.json is malformed or inconsistent.
var ErrInvalid = errors.New("invalid tokenizer")

// An AddedToken is a token matched in the text before pre-tokenisation, such as a special
// token.
type AddedToken struct {
	ID      int
	Content string
	Special bool
	LStrip  bool
	RStrip  bool
}

// Tokenizer is a loaded byte-level BPE tokenizer. It is safe for concurrent use.
type Tokenizer struct {
	vocab        map[string]int32 // byte-level spelling → id, added tokens included
	tokens       []string         // id → byte-level spelling ("" for a gap)
	merges       map[uint64]merge
	byteID       [256]int32 // the id of each single byte's token, -1 when absent
	pattern      pattern
	usePattern   bool
	prefixSpace  bool
	ignoreMerges bool
	nfc          bool  // the text between added tokens is put in Unicode NFC first
	unk          int32 // -1 without an unknown token

	added      []AddedToken
	addedByID  map[int32]*AddedToken
	addedTrie  *trieNode
	addedFirst [256]bool // the first bytes of added tokens, to skip text quickly
	bos, eos   []int32   // added around a sequence when asked for special tokens
	cachePool  sync.Pool
	sourceJSON []byte // the file as loaded, to write it out unchanged
}

// Load reads the tokenizer.json at path.
func Load(path string) (*Tokenizer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("tokenizer: %w", err)
	}
	t, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return t, nil
}

// VocabSize is one more than the largest token id: the size of a model's embedding.
func (t *Tokenizer) VocabSize() int { return len(t.tokens) }

// AddedTokens returns the tokens matched before pre-tokenisation, in id order.
func (t *Tokenizer) AddedTokens() []AddedToken { return append([]AddedToken(nil), t.added...) }

// JSON returns the tokenizer.json the tokenizer was parsed from.
func (t *Tokenizer) JSON() []byte { return append([]byte(nil), t.sourceJSON...) }

// Token returns the byte-level spelling of id (the vocabulary's key), or "" when id is
// not a token.
func (t *Tokenizer) Token(id int) string {
	if id < 0 || id >= len(t.tokens) {
		return ""
	}
	return t.tokens[id]
}

// Encode returns the ids of text, without the special tokens a post-processor would add.
func (t *Tokenizer) Encode(text string) []int {
	return t.AppendEncode(nil, text, false)
}

// AppendEncode appends the ids of text to dst; with special, the special tokens of the
// tokenizer's post-processor (a BOS, say) go around them.
func (t *Tokenizer) AppendEncode(dst []int, text string, special bool) []int {
	text = validUTF8(text)
	if special {
		dst = appendIDs(dst, t.bos)
	}
	c, _ := t.cachePool.Get().(*wordCache)
	if c == nil {
		c = newWordCache()
	}
	for _, sec := range t.sections(text) {
		if sec.added != nil {
			dst = append(dst, sec.added.ID)
			continue
		}
		if t.nfc {
			sec.text = norm.NFC.String(sec.text)
		}
		dst = t.encodeSection(dst, sec.text, c)
	}
	t.cachePool.Put(c)
	if special {
		dst = appendIDs(dst, t.eos)
	}
	return dst
}

func appendIDs(dst []int, ids []int32) []int {
	for _, id := range ids {
		dst = append(dst, int(id))
	}
	return dst
}

// A section is a run of text between added tokens, or one added token.
type section struct {
	text  string
	added *AddedToken
}

// sections splits text at its added tokens, leftmost longest first, and applies their
// lstrip and rstrip to the neighbouring text.
func (t *Tokenizer) sections(text string) []section {
	if t.addedTrie == nil {
		return []section{{text: text}}
	}
	var out []section
	start := 0
	for i := 0; i < len(text); {
		if !t.addedFirst[text[i]] {
			i++
			continue
		}
		n, tok := t.addedTrie.longest(text[i:])
		if tok == nil {
			i++
			continue
		}
		if i > start {
			out = append(out, section{text: text[start:i]})
		}
		out = append(out, section{added: tok})
		i += n
		start = i
	}
	if start < len(text) {
		out = append(out, section{text: text[start:]})
	}
	for k, s := range out {
		if s.added == nil {
			continue
		}
		if s.added.LStrip && k > 0 && out[k-1].added == nil {
			out[k-1].text = strings.TrimRightFunc(out[k-1].text, unicode.IsSpace)
		}
		if s.added.RStrip && k+1 < len(out) && out[k+1].added == nil {
			out[k+1].text = strings.TrimLeftFunc(out[k+1].text, unicode.IsSpace)
		}
	}
	return out
}

func (t *Tokenizer) encodeSection(dst []int, text string, c *wordCache) []int {
	if text == "" {
		return dst
	}
	if t.prefixSpace && text[0] != ' ' {
		text = " " + text
	}
	if !t.usePattern {
		return t.encodeWord(dst, text, c)
	}
	for i := 0; i < len(text); {
		n := t.pattern.match(text, i)
		dst = t.encodeWord(dst, text[i:i+n], c)
		i += n
	}
	return dst
}

// maxCachedWord bounds the pre-tokens kept in the cache (long runs of white space are
// rarely repeated).
const maxCachedWord = 256

func (t *Tokenizer) encodeWord(dst []int, w string, c *wordCache) []int {
	if ids, ok := c.words[w]; ok {
		return appendIDs(dst, ids)
	}
	var ids []int32
	if t.ignoreMerges {
		if id, ok := t.vocab[toByteLevel(w)]; ok {
			ids = []int32{id}
		}
	}
	if ids == nil {
		word := make([]int32, 0, len(w))
		for i := 0; i < len(w); i++ {
			id := t.byteID[w[i]]
			if id < 0 {
				id = t.unk
			}
			if id >= 0 {
				word = append(word, id)
			}
		}
		ids = t.bpe(word)
	}
	if len(w) <= maxCachedWord {
		c.put(w, ids)
	}
	return appendIDs(dst, ids)
}

// wordCache remembers the ids of pre-tokens already merged. Each goroutine encoding
// takes one from the tokenizer's pool.
type wordCache struct {
	words map[string][]int32
}

const maxCacheWords = 1 << 17

func newWordCache() *wordCache { return &wordCache{words: make(map[string][]int32, 1024)} }

func (c *wordCache) put(w string, ids []int32) {
	if len(c.words) >= maxCacheWords {
		clear(c.words)
	}
	c.words[strings.Clone(w)] = ids
}

// Decode returns the text of ids. Bytes that do not form valid UTF-8 (ids that cut a
// character) become U+FFFD as in Hugging Face's decode; DecodeBytes keeps them.
func (t *Tokenizer) Decode(ids []int) (string, error) {
	b, err := t.DecodeBytes(ids)
	return validUTF8(string(b)), err
}

// DecodeBytes returns the bytes that ids stand for; added tokens stand for their content.
func (t *Tokenizer) DecodeBytes(ids []int) ([]byte, error) {
	var out []byte
	for k, id := range ids {
		if id < 0 || id >= len(t.tokens) || t.tokens[id] == "" {
			return out, fmt.Errorf("%w: id %d (position %d) is not in the vocabulary of %d", ErrInvalid, id, k, len(t.tokens))
		}
		if a, ok := t.addedByID[int32(id)]; ok {
			out = append(out, a.Content...)
			continue
		}
		var ok bool
		if out, ok = fromByteLevel(out, t.tokens[id]); !ok {
			return out, fmt.Errorf("%w: token %d %q is not spelt in the byte-level alphabet", ErrInvalid, id, t.tokens[id])
		}
	}
	return out, nil
}

// trieNode finds added tokens in text, byte by byte.
type trieNode struct {
	next map[byte]*trieNode
	tok  *AddedToken
}

func (n *trieNode) insert(s string, tok *AddedToken) {
	for i := 0; i < len(s); i++ {
		if n.next == nil {
			n.next = map[byte]*trieNode{}
		}
		c := n.next[s[i]]
		if c == nil {
			c = &trieNode{}
			n.next[s[i]] = c
		}
		n = c
	}
	n.tok = tok
}

// longest returns the length and token of the longest added token that s starts with.
func (n *trieNode) longest(s string) (int, *AddedToken) {
	best, bestN := (*AddedToken)(nil), 0
	for i := 0; i < len(s) && n != nil; i++ {
		n = n.next[s[i]]
		if n != nil && n.tok != nil {
			best, bestN = n.tok, i+1
		}
	}
	// A match must end on a character boundary of the text.
	if best != nil && bestN < len(s) && !utf8.RuneStart(s[bestN]) {
		return 0, nil
	}
	return bestN, best
}

func sortAdded(a []AddedToken) {
	sort.Slice(a, func(i, j int) bool { return a[i].ID < a[j].ID })
}
