package tokenizer

import (
	"unicode"
	"unicode/utf8"
)

// A pattern is one of the pre-tokenizer regular expressions of the byte-level BPE
// tokenizers in use, written out by hand: Go's regexp has no look-ahead, which all of
// them need ("\s+(?!\S)"). Each splits text into pieces that cover it exactly.
type pattern int

const (
	// patternGPT2 is GPT-2's: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
	patternGPT2 pattern = iota
	// patternLlama3 is Llama 3's: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
	patternLlama3
	// patternQwen2 is Llama 3's with one digit per piece (\p{N} for \p{N}{1,3}), as in Qwen2.
	patternQwen2
)

// The regular expressions as they appear in tokenizer.json, by pattern.
var patternSources = map[string]pattern{
	`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`:                                          patternGPT2,
	`(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`: patternLlama3,
	`(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`:      patternQwen2,
}

// gpt2Source is the pattern of the ByteLevel pre-tokenizer with use_regex.
const gpt2Source = `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`

// Character classes as Oniguruma (and so Hugging Face's tokenizers) defines them: \s is
// the Unicode White_Space property, \p{L} and \p{N} the general categories.
func isSpace(r rune) bool {
	if r < utf8.RuneSelf {
		return r == ' ' || (r >= '\t' && r <= '\r')
	}
	return unicode.Is(unicode.White_Space, r)
}

func isLetter(r rune) bool {
	if r < utf8.RuneSelf {
		return (r|0x20) >= 'a' && (r|0x20) <= 'z'
	}
	return unicode.IsLetter(r)
}

func isNumber(r rune) bool {
	if r < utf8.RuneSelf {
		return r >= '0' && r <= '9'
	}
	return unicode.IsNumber(r)
}

func isOther(r rune) bool { return !isSpace(r) && !isLetter(r) && !isNumber(r) }

func isCRLF(r rune) bool { return r == '\r' || r == '\n' }

// split appends to dst the pieces of s (valid UTF-8) under p, in order; they cover s.
func (p pattern) split(dst []string, s string) []string {
	for i := 0; i < len(s); {
		n := p.match(s, i)
		dst = append(dst, s[i:i+n])
		i += n
	}
	return dst
}

// at decodes the rune at byte offset i; at the end of s it returns -1.
func at(s string, i int) (rune, int) {
	if i >= len(s) {
		return -1, 0
	}
	if c := s[i]; c < utf8.RuneSelf {
		return rune(c), 1
	}
	return utf8.DecodeRuneInString(s[i:])
}

// run returns the end of the longest run from i of runes satisfying f.
func run(s string, i int, f func(rune) bool) int {
	for i < len(s) {
		r, w := at(s, i)
		if !f(r) {
			break
		}
		i += w
	}
	return i
}

// contraction returns the length of 's 't 're 've 'm 'll 'd at i (ASCII case folded when
// fold), or 0.
func contraction(s string, i int, fold bool) int {
	if i+1 >= len(s) || s[i] != '\'' {
		return 0
	}
	lower := func(c byte) byte {
		if fold && c >= 'A' && c <= 'Z' {
			return c + 0x20
		}
		return c
	}
	switch lower(s[i+1]) {
	case 's', 't', 'm', 'd':
		return 2
	}
	if i+2 < len(s) {
		switch string([]byte{lower(s[i+1]), lower(s[i+2])}) {
		case "re", "ve", "ll":
			return 3
		}
	}
	return 0
}

// whitespace matches \s+(?!\S)|\s+ at i, where s[i] is white space: the run, less its
// last rune when a non-space follows and the run is longer than one rune.
func whitespace(s string, i int) int {
	end := run(s, i, isSpace)
	if end == len(s) {
		return end - i
	}
	_, lastW := utf8.DecodeLastRuneInString(s[i:end])
	if end-lastW > i {
		return end - lastW - i
	}
	return end - i
}

// match returns the byte length of the piece that starts at i (i < len(s)).
func (p pattern) match(s string, i int) int {
	if p == patternGPT2 {
		return matchGPT2(s, i)
	}
	return matchLlama3(s, i, p == patternQwen2)
}

func matchGPT2(s string, i int) int {
	if n := contraction(s, i, false); n > 0 {
		return n
	}
	r, w := at(s, i)
	j := i
	if r == ' ' {
		// " ?" then a class: the space joins a following letter, digit or other run.
		if r2, w2 := at(s, i+w); r2 >= 0 {
			switch {
			case isLetter(r2):
				return run(s, i+w+w2, isLetter) - i
			case isNumber(r2):
				return run(s, i+w+w2, isNumber) - i
			case isOther(r2):
				return run(s, i+w+w2, isOther) - i
			}
		}
	}
	switch {
	case isLetter(r):
		return run(s, j+w, isLetter) - i
	case isNumber(r):
		return run(s, j+w, isNumber) - i
	case isOther(r):
		return run(s, j+w, isOther) - i
	}
	return whitespace(s, i)
}

func matchLlama3(s string, i int, oneDigit bool) int {
	if n := contraction(s, i, true); n > 0 {
		return n
	}
	r, w := at(s, i)
	// [^\r\n\p{L}\p{N}]?\p{L}+
	if isLetter(r) {
		return run(s, i+w, isLetter) - i
	}
	if !isCRLF(r) && !isNumber(r) {
		if r2, w2 := at(s, i+w); r2 >= 0 && isLetter(r2) {
			return run(s, i+w+w2, isLetter) - i
		}
	}
	// \p{N}{1,3}
	if isNumber(r) {
		j := i + w
		for k := 1; k < 3 && !oneDigit; k++ {
			r2, w2 := at(s, j)
			if r2 < 0 || !isNumber(r2) {
				break
			}
			j += w2
		}
		return j - i
	}
	// " ?[^\s\p{L}\p{N}]+[\r\n]*"
	j := i
	if r == ' ' {
		if r2, _ := at(s, i+w); r2 >= 0 && isOther(r2) {
			j = i + w
		}
	}
	if r2, _ := at(s, j); r2 >= 0 && isOther(r2) {
		end := run(s, j, isOther)
		return run(s, end, isCRLF) - i
	}
	// \s*[\r\n]+: the white space up to and including its last CR or LF.
	end := run(s, i, isSpace)
	last := -1
	for k := i; k < end; k++ {
		if s[k] == '\r' || s[k] == '\n' {
			last = k
		}
	}
	if last >= 0 {
		return last + 1 - i
	}
	return whitespace(s, i)
}
