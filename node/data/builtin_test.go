package data

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"math"
	"strings"
	"testing"
)

// builtinSHA256 pins the built-in corpus. If a change to the generator alters it, bump the
// version in BuiltinName and update this hash.
const builtinSHA256 = "8f4d95d2ea3818199eb72f4f2e6791b77cacd04e8717ff2b980ca10f8c181f71"

func TestBuiltinIsTheSameEveryTime(t *testing.T) {
	a, name := Builtin()
	if name != BuiltinName {
		t.Errorf("name = %q, want %q", name, BuiltinName)
	}
	if b := generate(); !bytes.Equal(a, b) {
		t.Errorf("two generations differ")
	}
	a[0] = 'X'
	if b, _ := Builtin(); b[0] == 'X' {
		t.Errorf("Builtin handed out its cached copy")
	}
	sum := sha256.Sum256(generate())
	if got := hex.EncodeToString(sum[:]); got != builtinSHA256 {
		t.Errorf("built-in corpus changed: sha256 %s, want %s; bump BuiltinName's version and update the hash", got, builtinSHA256)
	}
}

func TestBuiltinIsAboutTwoMegabytesOfWrappedText(t *testing.T) {
	text, _ := Builtin()
	if n := len(text); n < 2<<20 || n > 2<<20+200<<10 {
		t.Errorf("size = %d bytes, want about 2 MiB", n)
	}
	for i, c := range text {
		if c != '\n' && (c < ' ' || c > '~') {
			t.Fatalf("byte %d is %q, want printable ASCII or newline", i, c)
		}
	}
	for _, want := range []string{"Chapter 1: The ", ". ", ", ", "?\" asked ", "\n\n", "She ", " he "} {
		if !bytes.Contains(text, []byte(want)) {
			t.Errorf("no %q in the corpus", want)
		}
	}
	for i, line := range strings.Split(string(text), "\n") {
		if len(line) > 72 {
			t.Fatalf("line %d is %d bytes, want wrapped at 72: %q", i+1, len(line), line)
		}
	}
}

// A byte-level model sees the previous bytes; if even one previous byte predicts the next
// well, there is plenty to learn. Uniform bytes would be 8 bits; English text has a
// conditional entropy given one byte of about 3.3 bits.
func TestBuiltinNextByteIsPredictable(t *testing.T) {
	text, _ := Builtin()
	var pair [256][256]float64
	var first [256]float64
	for i := 1; i < len(text); i++ {
		pair[text[i-1]][text[i]]++
		first[text[i-1]]++
	}
	h := 0.0
	n := float64(len(text) - 1)
	for a := range pair {
		for b := range pair[a] {
			if c := pair[a][b]; c > 0 {
				h -= c / n * math.Log2(c/first[a])
			}
		}
	}
	if h > 3.5 {
		t.Errorf("H(next byte | byte) = %.2f bits, want under 3.5", h)
	}
	t.Logf("H(next byte | byte) = %.2f bits", h)
}

func BenchmarkBuiltinGenerate(b *testing.B) {
	for b.Loop() {
		generate()
	}
}
