package tokenizer

import (
	"bytes"
	"container/heap"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sort"
)

// EndOfText is the special token a trained tokenizer adds: the separator of documents,
// put before a sequence when special tokens are asked for.
const EndOfText = "<|endoftext|>"

// MinTrainVocab is the smallest vocabulary Train makes: the 256 bytes and EndOfText.
const MinTrainVocab = 257

// Train learns a byte-level BPE tokenizer with GPT-2's pre-tokenizer from texts, with
// vocab tokens in all: the 256 bytes, vocab−257 merges and EndOfText. Merging stops
// early when no pair of tokens occurs any more. At each step the most frequent pair is
// merged; among equally frequent pairs the one whose token ids are smallest.
func Train(ctx context.Context, texts []string, vocab int) (*Tokenizer, error) {
	if vocab < MinTrainVocab {
		return nil, fmt.Errorf("%w: a vocabulary of %d is smaller than %d (the 256 bytes and %s)", ErrInvalid, vocab, MinTrainVocab, EndOfText)
	}
	// Byte tokens in the order of their byte-level runes, as GPT-2 numbers them.
	order := make([]int, 256)
	for b := range order {
		order[b] = b
	}
	sort.Slice(order, func(i, j int) bool { return byteRune[order[i]] < byteRune[order[j]] })
	var byteTok [256]int32
	tokens := make([]string, 0, vocab)
	for id, b := range order {
		byteTok[b] = int32(id)
		tokens = append(tokens, byteStr[b])
	}

	counts := map[string]int64{}
	var pieces []string
	for _, text := range texts {
		text = validUTF8(text)
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		pieces = patternGPT2.split(pieces[:0], text)
		for _, p := range pieces {
			counts[p]++
		}
	}
	keys := make([]string, 0, len(counts))
	for w := range counts {
		keys = append(keys, w)
	}
	slices.Sort(keys) // a deterministic word order
	words := make([][]int32, len(keys))
	freq := make([]int64, len(keys))
	pairs := map[uint64]int64{}
	where := map[uint64]map[int32]struct{}{}
	for i, w := range keys {
		ids := make([]int32, len(w))
		for k := 0; k < len(w); k++ {
			ids[k] = byteTok[w[k]]
		}
		words[i], freq[i] = ids, counts[w]
		addPairs(pairs, where, ids, freq[i], int32(i))
	}
	q := &pairQueue{}
	for k, c := range pairs {
		q.items = append(q.items, pairCount{k, c})
	}
	heap.Init(q)

	var merges [][2]string
	for len(tokens) < vocab-1 && q.Len() > 0 {
		if len(merges)%64 == 0 {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
		}
		top := heap.Pop(q).(pairCount)
		if c := pairs[top.pair]; c != top.count || c <= 0 {
			continue // stale
		}
		a, b := int32(top.pair>>32), int32(uint32(top.pair))
		id := int32(len(tokens))
		tokens = append(tokens, tokens[a]+tokens[b])
		merges = append(merges, [2]string{tokens[a], tokens[b]})
		changed := map[uint64]struct{}{}
		affected := make([]int32, 0, len(where[top.pair]))
		for wi := range where[top.pair] {
			affected = append(affected, wi)
		}
		slices.Sort(affected)
		for _, wi := range affected {
			w := words[wi]
			removePairs(pairs, where, w, freq[wi], wi, changed)
			out := w[:0]
			for k := 0; k < len(w); k++ {
				if k+1 < len(w) && w[k] == a && w[k+1] == b {
					out = append(out, id)
					k++
				} else {
					out = append(out, w[k])
				}
			}
			words[wi] = out
			addPairsChanged(pairs, where, out, freq[wi], wi, changed)
		}
		for k := range changed {
			if c := pairs[k]; c > 0 {
				heap.Push(q, pairCount{k, c})
			}
		}
	}

	var buf bytes.Buffer
	writeJSON(&buf, tokens, merges)
	return Parse(buf.Bytes())
}

func addPairs(pairs map[uint64]int64, where map[uint64]map[int32]struct{}, w []int32, f int64, wi int32) {
	addPairsChanged(pairs, where, w, f, wi, nil)
}

func addPairsChanged(pairs map[uint64]int64, where map[uint64]map[int32]struct{}, w []int32, f int64, wi int32, changed map[uint64]struct{}) {
	for k := 0; k+1 < len(w); k++ {
		p := pairKey(w[k], w[k+1])
		pairs[p] += f
		s := where[p]
		if s == nil {
			s = map[int32]struct{}{}
			where[p] = s
		}
		s[wi] = struct{}{}
		if changed != nil {
			changed[p] = struct{}{}
		}
	}
}

func removePairs(pairs map[uint64]int64, where map[uint64]map[int32]struct{}, w []int32, f int64, wi int32, changed map[uint64]struct{}) {
	for k := 0; k+1 < len(w); k++ {
		p := pairKey(w[k], w[k+1])
		pairs[p] -= f
		if pairs[p] <= 0 {
			delete(pairs, p)
		}
		delete(where[p], wi)
		changed[p] = struct{}{}
	}
}

type pairCount struct {
	pair  uint64
	count int64
}

// pairQueue is a max-heap by count, then by smaller pair ids.
type pairQueue struct{ items []pairCount }

func (q *pairQueue) Len() int { return len(q.items) }
func (q *pairQueue) Less(i, j int) bool {
	a, b := q.items[i], q.items[j]
	return a.count > b.count || a.count == b.count && a.pair < b.pair
}
func (q *pairQueue) Swap(i, j int) { q.items[i], q.items[j] = q.items[j], q.items[i] }
func (q *pairQueue) Push(x any)    { q.items = append(q.items, x.(pairCount)) }
func (q *pairQueue) Pop() any {
	x := q.items[len(q.items)-1]
	q.items = q.items[:len(q.items)-1]
	return x
}

// writeJSON writes a tokenizer.json in Hugging Face's format: the vocabulary in id order,
// the merges as [a, b] pairs, EndOfText as a special added token after them, GPT-2's
// ByteLevel pre-tokenizer and decoder, and a template that puts EndOfText before a
// sequence when special tokens are asked for.
func writeJSON(buf *bytes.Buffer, tokens []string, merges [][2]string) {
	str := func(s string) string {
		var b bytes.Buffer
		enc := json.NewEncoder(&b)
		enc.SetEscapeHTML(false)
		_ = enc.Encode(s)
		return string(bytes.TrimRight(b.Bytes(), "\n"))
	}
	eot := len(tokens)
	e := str(EndOfText)
	fmt.Fprintf(buf, `{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [
    {"id": %d, "content": %s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": null,
  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
  "post_processor": {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": %s, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": %s, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": %s, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {%s: {"id": %s, "ids": [%d], "tokens": [%s]}}
  },
  "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
  "model": {
    "type": "BPE",
    "dropout": null,
    "unk_token": null,
    "continuing_subword_prefix": null,
    "end_of_word_suffix": null,
    "fuse_unk": false,
    "byte_fallback": false,
    "ignore_merges": false,
    "vocab": {`, eot, e, e, e, e, e, e, eot, e)
	for id, tok := range tokens {
		sep := ","
		if id == len(tokens)-1 {
			sep = ""
		}
		fmt.Fprintf(buf, "\n      %s: %d%s", str(tok), id, sep)
	}
	buf.WriteString("\n    },\n    \"merges\": [")
	for i, m := range merges {
		sep := ","
		if i == len(merges)-1 {
			sep = ""
		}
		fmt.Fprintf(buf, "\n      [%s, %s]%s", str(m[0]), str(m[1]), sep)
	}
	buf.WriteString("\n    ]\n  }\n}\n")
}
