package tokenizer

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"

	"golang.org/x/text/unicode/norm"
)

// fileJSON is the part of Hugging Face's tokenizer.json this package reads. Raw fields are
// checked one by one so that an error can name the field.
type fileJSON struct {
	AddedTokens   []addedJSON     `json:"added_tokens"`
	Normalizer    json.RawMessage `json:"normalizer"`
	PreTokenizer  json.RawMessage `json:"pre_tokenizer"`
	PostProcessor json.RawMessage `json:"post_processor"`
	Decoder       json.RawMessage `json:"decoder"`
	Model         modelJSON       `json:"model"`
}

type addedJSON struct {
	ID         int    `json:"id"`
	Content    string `json:"content"`
	SingleWord bool   `json:"single_word"`
	LStrip     bool   `json:"lstrip"`
	RStrip     bool   `json:"rstrip"`
	Normalized bool   `json:"normalized"`
	Special    bool   `json:"special"`
}

type modelJSON struct {
	Type                    string            `json:"type"`
	Dropout                 *float64          `json:"dropout"`
	UnkToken                *string           `json:"unk_token"`
	ContinuingSubwordPrefix *string           `json:"continuing_subword_prefix"`
	EndOfWordSuffix         *string           `json:"end_of_word_suffix"`
	FuseUnk                 bool              `json:"fuse_unk"`
	ByteFallback            bool              `json:"byte_fallback"`
	IgnoreMerges            bool              `json:"ignore_merges"`
	Vocab                   map[string]int    `json:"vocab"`
	Merges                  []json.RawMessage `json:"merges"`
}

type preTokJSON struct {
	Type           string `json:"type"`
	AddPrefixSpace bool   `json:"add_prefix_space"`
	TrimOffsets    bool   `json:"trim_offsets"`
	UseRegex       *bool  `json:"use_regex"`
	Pattern        *struct {
		Regex  *string `json:"Regex"`
		String *string `json:"String"`
	} `json:"pattern"`
	Behavior      string            `json:"behavior"`
	Invert        bool              `json:"invert"`
	PreTokenizers []json.RawMessage `json:"pretokenizers"`
}

type postJSON struct {
	Type       string            `json:"type"`
	Single     []templateItem    `json:"single"`
	Processors []json.RawMessage `json:"processors"`
}

type templateItem struct {
	SpecialToken *struct {
		ID string `json:"id"`
	} `json:"SpecialToken"`
	Sequence *struct {
		ID string `json:"id"`
	} `json:"Sequence"`
}

func unsupported(field, format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s", ErrUnsupported, field, fmt.Sprintf(format, args...))
}

func invalid(field, format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s", ErrInvalid, field, fmt.Sprintf(format, args...))
}

func isNull(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) == 0 || string(raw) == "null"
}

// Parse reads a tokenizer.json.
func Parse(data []byte) (*Tokenizer, error) {
	var f fileJSON
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("%w: not a tokenizer.json: %w", ErrInvalid, err)
	}
	t := &Tokenizer{unk: -1, sourceJSON: bytes.Clone(data), addedByID: map[int32]*AddedToken{}}
	if err := t.parseModel(&f.Model); err != nil {
		return nil, err
	}
	if !isNull(f.Normalizer) {
		var n struct {
			Type string `json:"type"`
		}
		_ = json.Unmarshal(f.Normalizer, &n)
		if n.Type != "NFC" {
			return nil, unsupported("normalizer.type", "%q: only NFC (as Qwen2 has) or none is supported", n.Type)
		}
		t.nfc = true
	}
	if err := t.parsePreTokenizer(f.PreTokenizer); err != nil {
		return nil, err
	}
	if err := t.parseAdded(f.AddedTokens); err != nil {
		return nil, err
	}
	if err := t.parsePost(f.PostProcessor, "post_processor"); err != nil {
		return nil, err
	}
	if !isNull(f.Decoder) {
		var d struct {
			Type string `json:"type"`
		}
		if err := json.Unmarshal(f.Decoder, &d); err != nil || d.Type != "ByteLevel" {
			return nil, unsupported("decoder.type", "%q: only ByteLevel is supported", d.Type)
		}
	}
	return t, nil
}

func (t *Tokenizer) parseModel(m *modelJSON) error {
	switch {
	case m.Type != "" && m.Type != "BPE":
		return unsupported("model.type", "%q: only BPE is supported", m.Type)
	case m.Vocab == nil:
		return invalid("model.vocab", "missing")
	case m.Dropout != nil && *m.Dropout != 0:
		return unsupported("model.dropout", "%v: BPE dropout is not deterministic", *m.Dropout)
	case m.ContinuingSubwordPrefix != nil && *m.ContinuingSubwordPrefix != "":
		return unsupported("model.continuing_subword_prefix", "%q: byte-level BPE has none", *m.ContinuingSubwordPrefix)
	case m.EndOfWordSuffix != nil && *m.EndOfWordSuffix != "":
		return unsupported("model.end_of_word_suffix", "%q: byte-level BPE has none", *m.EndOfWordSuffix)
	case m.ByteFallback:
		return unsupported("model.byte_fallback", "true: byte-level BPE needs no byte fallback")
	}
	t.ignoreMerges = m.IgnoreMerges
	t.vocab = make(map[string]int32, len(m.Vocab))
	size := 0
	for tok, id := range m.Vocab {
		if id < 0 || id >= 1<<31-1 {
			return invalid("model.vocab", "token %q has id %d", tok, id)
		}
		t.vocab[tok] = int32(id)
		size = max(size, id+1)
	}
	t.tokens = make([]string, size)
	for tok, id := range t.vocab {
		if t.tokens[id] != "" {
			return invalid("model.vocab", "id %d is given to both %q and %q", id, t.tokens[id], tok)
		}
		t.tokens[id] = tok
	}
	for b := range 256 {
		id, ok := t.vocab[byteStr[b]]
		if !ok {
			id = -1
		}
		t.byteID[b] = id
	}
	if m.UnkToken != nil {
		id, ok := t.vocab[*m.UnkToken]
		if !ok {
			return invalid("model.unk_token", "%q is not in model.vocab", *m.UnkToken)
		}
		t.unk = id
	}
	t.merges = make(map[uint64]merge, len(m.Merges))
	for i, raw := range m.Merges {
		var a, b string
		var s string
		var pair []string
		switch {
		case json.Unmarshal(raw, &s) == nil:
			var ok bool
			if a, b, ok = strings.Cut(s, " "); !ok || strings.Contains(b, " ") {
				return invalid(fmt.Sprintf("model.merges[%d]", i), "%q is not two tokens separated by one space", s)
			}
		case json.Unmarshal(raw, &pair) == nil && len(pair) == 2:
			a, b = pair[0], pair[1]
		default:
			return invalid(fmt.Sprintf("model.merges[%d]", i), "%s is neither \"a b\" nor [a, b]", raw)
		}
		ia, oka := t.vocab[a]
		ib, okb := t.vocab[b]
		im, okm := t.vocab[a+b]
		if !oka || !okb || !okm {
			return invalid(fmt.Sprintf("model.merges[%d]", i), "%q + %q: a token of the merge or its result is not in model.vocab", a, b)
		}
		// A pair listed twice takes its last rank, as in Hugging Face's tokenizers.
		t.merges[pairKey(ia, ib)] = merge{rank: int32(i), id: im}
	}
	return nil
}

func (t *Tokenizer) parsePreTokenizer(raw json.RawMessage) error {
	const field = "pre_tokenizer"
	if isNull(raw) {
		return unsupported(field, "null: a byte-level BPE needs a ByteLevel pre-tokenizer")
	}
	var p preTokJSON
	if err := json.Unmarshal(raw, &p); err != nil {
		return invalid(field, "%v", err)
	}
	switch p.Type {
	case "ByteLevel":
		if p.UseRegex != nil && !*p.UseRegex {
			return unsupported(field+".use_regex", "false without a Split before it")
		}
		t.pattern, t.usePattern, t.prefixSpace = patternGPT2, true, p.AddPrefixSpace
		return nil
	case "Sequence":
		if len(p.PreTokenizers) != 2 {
			return unsupported(field+".pretokenizers", "%d pre-tokenizers: only [Split, ByteLevel] is supported", len(p.PreTokenizers))
		}
		var split, bl preTokJSON
		if err := json.Unmarshal(p.PreTokenizers[0], &split); err != nil {
			return invalid(field+".pretokenizers[0]", "%v", err)
		}
		if err := json.Unmarshal(p.PreTokenizers[1], &bl); err != nil {
			return invalid(field+".pretokenizers[1]", "%v", err)
		}
		f0 := field + ".pretokenizers[0]"
		switch {
		case split.Type != "Split":
			return unsupported(f0+".type", "%q: only Split then ByteLevel is supported", split.Type)
		case split.Pattern == nil || split.Pattern.Regex == nil:
			return unsupported(f0+".pattern", "only a Regex pattern is supported")
		case split.Behavior != "Isolated":
			return unsupported(f0+".behavior", "%q: only Isolated is supported", split.Behavior)
		case split.Invert:
			return unsupported(f0+".invert", "true: only false is supported")
		}
		pat, ok := patternSources[*split.Pattern.Regex]
		if !ok {
			return unsupported(f0+".pattern.Regex", "%q is not a pattern this tokenizer knows (GPT-2's, Llama 3's or Qwen2's)", *split.Pattern.Regex)
		}
		f1 := field + ".pretokenizers[1]"
		switch {
		case bl.Type != "ByteLevel":
			return unsupported(f1+".type", "%q: only Split then ByteLevel is supported", bl.Type)
		case bl.UseRegex == nil || *bl.UseRegex:
			return unsupported(f1+".use_regex", "true after a Split: only false is supported")
		}
		t.pattern, t.usePattern, t.prefixSpace = pat, true, bl.AddPrefixSpace
		return nil
	}
	return unsupported(field+".type", "%q: only ByteLevel, or a Sequence of Split and ByteLevel, is supported", p.Type)
}

func (t *Tokenizer) parseAdded(list []addedJSON) error {
	for i, a := range list {
		f := fmt.Sprintf("added_tokens[%d]", i)
		switch {
		case a.Content == "":
			return invalid(f+".content", "empty")
		case a.ID < 0:
			return invalid(f+".id", "%d is negative", a.ID)
		case a.SingleWord:
			return unsupported(f+".single_word", "true is not supported")
		case t.nfc && a.Normalized && norm.NFC.String(a.Content) != a.Content:
			return unsupported(f+".normalized", "true for content NFC changes: only tokens found in the text as written are supported")
		}
		if a.ID >= len(t.tokens) {
			t.tokens = append(t.tokens, make([]string, a.ID+1-len(t.tokens))...)
		}
		if old := t.tokens[a.ID]; old != "" && old != a.Content {
			return invalid(f+".id", "%d is %q in model.vocab, not %q", a.ID, old, a.Content)
		}
		t.tokens[a.ID] = a.Content
		t.vocab[a.Content] = int32(a.ID)
		t.added = append(t.added, AddedToken{ID: a.ID, Content: a.Content, Special: a.Special, LStrip: a.LStrip, RStrip: a.RStrip})
	}
	sortAdded(t.added)
	if len(t.added) > 0 {
		t.addedTrie = &trieNode{}
	}
	for i := range t.added {
		a := &t.added[i]
		t.addedByID[int32(a.ID)] = a
		t.addedTrie.insert(a.Content, a)
		t.addedFirst[a.Content[0]] = true
	}
	return nil
}

// parsePost reads the special tokens a post-processor puts around one sequence.
func (t *Tokenizer) parsePost(raw json.RawMessage, field string) error {
	if isNull(raw) {
		return nil
	}
	var p postJSON
	if err := json.Unmarshal(raw, &p); err != nil {
		return invalid(field, "%v", err)
	}
	switch p.Type {
	case "ByteLevel":
		return nil // offsets only
	case "Sequence":
		for i, r := range p.Processors {
			if err := t.parsePost(r, fmt.Sprintf("%s.processors[%d]", field, i)); err != nil {
				return err
			}
		}
		return nil
	case "TemplateProcessing":
		seen := false
		for i, it := range p.Single {
			switch {
			case it.Sequence != nil:
				seen = true
			case it.SpecialToken != nil:
				id, ok := t.vocab[it.SpecialToken.ID]
				if !ok {
					return invalid(fmt.Sprintf("%s.single[%d].SpecialToken.id", field, i), "%q is not a token", it.SpecialToken.ID)
				}
				if seen {
					t.eos = append(t.eos, id)
				} else {
					t.bos = append(t.bos, id)
				}
			}
		}
		return nil
	}
	return unsupported(field+".type", "%q: only ByteLevel, TemplateProcessing or a Sequence of them is supported", p.Type)
}
