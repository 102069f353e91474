package compute

import (
	"math"
	"math/rand/v2"
	"testing"
)

// TestGemmBF16WorkersAlike: GemmBF16 gives GoSgemmBF16's bits whatever the number of
// workers.
func TestGemmBF16WorkersAlike(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 3))
	mk := func(n int) []float32 {
		s := make([]float32, n)
		for i := range s {
			s[i] = float32(rng.NormFloat64())
		}
		return s
	}
	const m, n, k = 300, 260, 700
	a, b, c0 := mk(k*m), mk(n*k), mk(m*n)
	want := append([]float32(nil), c0...)
	GoSgemmBF16(true, true, m, n, k, 1, a, m, b, k, 1, want, n)
	defer SetWorkers(0)
	for _, w := range []int{1, 2, 3, 8} {
		SetWorkers(w)
		got := append([]float32(nil), c0...)
		GemmBF16(true, true, m, n, k, 1, a, m, b, k, 1, got, n)
		for i := range got {
			if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
				t.Fatalf("%d workers: c[%d] = %g, on one goroutine %g", w, i, got[i], want[i])
			}
		}
	}
}
