package codec

import (
	"bytes"
	"math"
	"slices"
	"testing"
)

var lossyCodecs = []Spec{bf16, int8x32, {Kind: Int8, Block: 64, Zstd: true}, {Kind: BF16, Zstd: true},
	int4x32, {Kind: Int4, Block: 64, Zstd: true}, {Kind: Int4, Block: MinBlock}}

// What Encode sends decodes to the input plus the old residual minus the
// new one, exactly: the residual is what the codec lost.
func TestErrorFeedbackKeepsWhatTheCodecLoses(t *testing.T) {
	const n = 1000
	for _, c := range lossyCodecs {
		ef := NewErrorFeedback(c, n)
		for step := range 5 {
			x := gaussian(uint64(20+step), n, 1e-3)
			prev := slices.Clone(ef.Residual())
			payload := ef.Encode(nil, x)
			got := make([]float32, n)
			if err := c.Decode(got, payload); err != nil {
				t.Fatal(err)
			}
			for i := range x {
				y := x[i] + prev[i]
				if want := y - got[i]; ef.Residual()[i] != want {
					t.Fatalf("%v step %d value %d: residual %v, want %v − %v = %v", c, step, i, ef.Residual()[i], y, got[i], want)
				}
			}
		}
	}
}

// Quantize gives the values Encode's payload decodes to, and keeps the same residual.
func TestErrorFeedbackQuantizeMatchesEncode(t *testing.T) {
	const n = 777
	for _, c := range lossyCodecs {
		enc, quant := NewErrorFeedback(c, n), NewErrorFeedback(c, n)
		for step := range 5 {
			x := gaussian(uint64(30+step), n, 1)
			decoded := make([]float32, n)
			if err := c.Decode(decoded, enc.Encode(nil, x)); err != nil {
				t.Fatal(err)
			}
			q := slices.Clone(x)
			quant.Quantize(q, q) // in place
			if !slices.EqualFunc(q, decoded, sameBits) || !slices.EqualFunc(enc.Residual(), quant.Residual(), sameBits) {
				t.Fatalf("%v step %d: Quantize and Encode disagree", c, step)
			}
		}
	}
}

// The point of error feedback: the running sum of what was decoded tracks
// the running sum of the inputs, off by no more than the last residual,
// while plain rounding of inputs that round the same way every time lets
// the error grow with every step.
func TestErrorFeedbackRunningSumTracksTheInputs(t *testing.T) {
	const n, steps = 256, 400
	base := gaussian(50, n, 1)
	for _, c := range lossyCodecs {
		ef := NewErrorFeedback(c, n)
		sumX, sumEF, sumPlain := make([]float64, n), make([]float64, n), make([]float64, n)
		sent, plain := make([]float32, n), make([]float32, n)
		var maxResid float64
		for step := 1; step <= steps; step++ {
			// Nearly the same tensor each step, so plain rounding errs the same way each time.
			x := gaussian(uint64(60+step), n, 1e-4)
			for i := range x {
				x[i] += base[i]
			}
			if err := c.Decode(sent, ef.Encode(nil, x)); err != nil {
				t.Fatal(err)
			}
			c.roundTrip(plain, x)
			for i := range x {
				sumX[i] += float64(x[i])
				sumEF[i] += float64(sent[i])
				sumPlain[i] += float64(plain[i])
				// The gap between the sums is the residual (up to float32 rounding of x + residual).
				gap := sumX[i] - sumEF[i]
				if r := float64(ef.Residual()[i]); math.Abs(gap-r) > 1e-6*float64(step) {
					t.Fatalf("%v step %d value %d: sums differ by %g, residual %g", c, step, i, gap, r)
				}
				maxResid = max(maxResid, math.Abs(float64(ef.Residual()[i])))
			}
		}
		// The residual stays within one rounding step: 2^-8 relative for
		// bf16, max|block|/254 for int8 and max|block|/14 for int4 (|x| < 5
		// here).
		bound := 5.0 / 254
		if c.Kind == Int4 {
			bound = 5.0 / 14
		}
		if maxResid > bound {
			t.Errorf("%v: residual reached %g, want at most %g", c, maxResid, bound)
		}
		meanErr := func(sum []float64) float64 {
			var e float64
			for i := range sum {
				e += math.Abs(sumX[i]-sum[i]) / steps
			}
			return e / n
		}
		withEF, without := meanErr(sumEF), meanErr(sumPlain)
		t.Logf("%v: mean error of the running mean after %d steps: %.3g with feedback, %.3g without", c, steps, withEF, without)
		if withEF > without/50 {
			t.Errorf("%v: mean error %.3g with feedback, %.3g without: want at least 50× smaller", c, withEF, without)
		}
	}
}

func TestErrorFeedbackOfALosslessCodecCarriesNothing(t *testing.T) {
	for _, c := range []Spec{fp32, {Kind: F32, Zstd: true}} {
		ef := NewErrorFeedback(c, 100)
		x := gaussian(70, 100, 1)
		if p := ef.Encode(nil, x); !bytes.Equal(p, c.Encode(nil, x)) {
			t.Errorf("%v: Encode differs from Spec.Encode", c)
		}
		dst := make([]float32, 100)
		ef.Quantize(dst, x)
		if !slices.Equal(dst, x) || ef.Residual() != nil || ef.Spec() != c {
			t.Errorf("%v: lossless feedback changed values or kept a residual", c)
		}
	}
}

// A non-finite input leaves no residual behind, so the stream recovers.
func TestErrorFeedbackRecoversFromANonFiniteInput(t *testing.T) {
	for _, c := range lossyCodecs {
		ef := NewErrorFeedback(c, 64)
		x := gaussian(80, 64, 1)
		ef.Encode(nil, x)
		x[3], x[40] = float32(math.NaN()), float32(math.Inf(1))
		ef.Encode(nil, x)
		for i, r := range ef.Residual() {
			if math.IsNaN(float64(r)) || math.IsInf(float64(r), 0) {
				t.Fatalf("%v: residual %d is %v", c, i, r)
			}
		}
		x = gaussian(81, 64, 1)
		got := make([]float32, 64)
		if err := c.Decode(got, ef.Encode(nil, x)); err != nil {
			t.Fatalf("%v: the next tensor after a bad one: %v", c, err)
		}
		ef.Reset()
		if slices.ContainsFunc(ef.Residual(), func(r float32) bool { return r != 0 }) {
			t.Fatalf("%v: Reset kept a residual", c)
		}
	}
}

func TestErrorFeedbackPanicsOnMisuse(t *testing.T) {
	ef := NewErrorFeedback(int8x32, 10)
	for name, f := range map[string]func(){
		"Encode of the wrong length":     func() { ef.Encode(nil, make([]float32, 11)) },
		"Quantize into the wrong length": func() { ef.Quantize(make([]float32, 9), make([]float32, 10)) },
		"invalid codec":                  func() { NewErrorFeedback(Spec{Kind: BF16, Block: 8}, 10) },
		"negative length":                func() { NewErrorFeedback(bf16, -1) },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s did not panic", name)
				}
			}()
			f()
		}()
	}
}
