package optim

import (
	"math"
	"testing"
)

func TestSumSquaresAddsSquaresInFloat64(t *testing.T) {
	big := make([]float32, 10_000_001) // odd length exercises the tail loop
	for i := range big {
		big[i] = 0.1
	}
	for _, tc := range []struct {
		name string
		g    []float32
		want float64
		tol  float64
	}{
		{"empty", nil, 0, 0},
		{"3-4", []float32{3, 4}, 25, 0},
		{"tail", []float32{1, -2, 3, -4, 5, -6, 7}, 140, 0},
		// A float32 accumulator would drift far from this after 1e7 terms.
		{"ten million", big, 10_000_001 * float64(float32(0.1)) * float64(float32(0.1)), 1e-9},
	} {
		if got := SumSquares(tc.g); !closeRel(got, tc.want, tc.tol) {
			t.Errorf("%s: SumSquares = %.15g, want %.15g", tc.name, got, tc.want)
		}
	}
}

func TestClipFactorMatchesClipGradNorm(t *testing.T) {
	for _, tc := range []struct {
		norm, maxNorm float64
		want          float32
	}{
		{norm: 0.5, maxNorm: 1, want: 1},
		{norm: 1, maxNorm: 1, want: 1},
		{norm: 2, maxNorm: 1, want: float32(1 / (2 + 1e-6))},
		{norm: 10, maxNorm: 1, want: 0.099999990},
		{norm: 5, maxNorm: 0, want: 1},  // clipping off
		{norm: 5, maxNorm: -1, want: 1}, // clipping off
		{norm: 0, maxNorm: 1, want: 1},
	} {
		if got := ClipFactor(tc.norm, tc.maxNorm); math.Abs(float64(got-tc.want)) > 1e-7 {
			t.Errorf("ClipFactor(%v, %v) = %.9g, want %.9g", tc.norm, tc.maxNorm, got, tc.want)
		}
	}
	if got := ClipFactor(math.NaN(), 1); !math.IsNaN(float64(got)) {
		t.Errorf("ClipFactor(NaN, 1) = %v, want NaN", got)
	}
}

func TestClippingTwoBuffersBringsGlobalNormToMax(t *testing.T) {
	a, b := []float32{3, 0}, []float32{0, 4} // global norm 5 across two buffers
	f := ClipFactor(math.Sqrt(SumSquares(a)+SumSquares(b)), 1)
	Scale(a, f)
	Scale(b, f)
	if got := math.Sqrt(SumSquares(a) + SumSquares(b)); math.Abs(got-1) > 1e-6 {
		t.Errorf("norm after clipping = %v, want 1", got)
	}
	if a[0] != 3*f || b[1] != 4*f || a[1] != 0 {
		t.Errorf("Scale gave %v %v, want [%v 0] [0 %v]", a, b, 3*f, 4*f)
	}
}

func BenchmarkSumSquares(b *testing.B) {
	g := make([]float32, 1<<20)
	b.SetBytes(4 << 20)
	for b.Loop() {
		SumSquares(g)
	}
}
