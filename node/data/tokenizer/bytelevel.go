package tokenizer

import "unicode/utf8"

// GPT-2's byte-level alphabet: every byte is shown as a printable rune, the printable
// Latin-1 bytes as themselves and the rest as U+0100 onwards, so that a vocabulary of
// byte strings is a vocabulary of printable strings.
var (
	byteRune [256]rune
	runeByte = map[rune]byte{}
	// byteStr[b] is byteRune[b] encoded in UTF-8.
	byteStr [256]string
)

func init() {
	n := 0
	for b := 0; b < 256; b++ {
		if (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF) {
			byteRune[b] = rune(b)
		} else {
			byteRune[b] = rune(256 + n)
			n++
		}
		runeByte[byteRune[b]] = byte(b)
		byteStr[b] = string(byteRune[b])
	}
}

// toByteLevel spells the bytes of s in the byte-level alphabet.
func toByteLevel(s string) string {
	buf := make([]byte, 0, 2*len(s))
	for i := 0; i < len(s); i++ {
		buf = utf8.AppendRune(buf, byteRune[s[i]])
	}
	return string(buf)
}

// fromByteLevel turns a byte-level spelling back into bytes; ok is false when a rune is
// not in the alphabet.
func fromByteLevel(dst []byte, s string) ([]byte, bool) {
	for _, r := range s {
		b, ok := runeByte[r]
		if !ok {
			return dst, false
		}
		dst = append(dst, b)
	}
	return dst, true
}

// validUTF8 replaces each maximal ill-formed subsequence of s with U+FFFD, as the
// Unicode standard recommends and as WHATWG's TextDecoder, Python's "replace" and Rust's
// String::from_utf8_lossy do; valid text is returned as it is.
func validUTF8(s string) string {
	if utf8.ValidString(s) {
		return s
	}
	out := make([]byte, 0, len(s)+8)
	for i := 0; i < len(s); {
		r, w := utf8.DecodeRuneInString(s[i:])
		if r != utf8.RuneError || w > 1 {
			out = append(out, s[i:i+w]...)
			i += w
			continue
		}
		i += maximalSubpart(s[i:])
		out = append(out, "\uFFFD"...)
	}
	return string(out)
}

// maximalSubpart returns the length of the ill-formed prefix of s that becomes one
// U+FFFD: a lead byte and the continuation bytes that could still have completed it.
func maximalSubpart(s string) int {
	b := s[0]
	var need int
	lo, hi := byte(0x80), byte(0xBF) // allowed range of the second byte
	switch {
	case b >= 0xC2 && b <= 0xDF:
		need = 1
	case b == 0xE0:
		need, lo = 2, 0xA0
	case b >= 0xE1 && b <= 0xEC, b == 0xEE, b == 0xEF:
		need = 2
	case b == 0xED:
		need, hi = 2, 0x9F
	case b == 0xF0:
		need, lo = 3, 0x90
	case b >= 0xF1 && b <= 0xF3:
		need = 3
	case b == 0xF4:
		need, hi = 3, 0x8F
	default:
		return 1
	}
	n := 1
	for k := 0; k < need && n < len(s); k++ {
		c := s[n]
		if k == 0 && (c < lo || c > hi) || k > 0 && (c < 0x80 || c > 0xBF) {
			break
		}
		n++
	}
	return n
}
