package compute

import (
	"math"
	"math/rand/v2"
	"testing"
)

// Each element of a GoSgemm product sums its k products in an order fixed by k alone,
// so the blocks Gemm cuts a product into, and the goroutines that share them, leave
// every bit of the result as one unsplit call gives it.
func TestGemmWithGoKernelsIsBitIdenticalForAnyWorkerCount(t *testing.T) {
	defer SetWorkers(0)
	rng := rand.New(rand.NewPCG(21, 22))
	for _, sh := range []struct {
		transA, transB bool
		m, n, k        int
	}{
		{false, true, 2048, 1376, 256}, // forward y = x·Wᵀ (cut by rows)
		{true, false, 1376, 256, 2048}, // dW = dyᵀ·x (cut by rows)
		{false, false, 2048, 256, 688}, // dx = dy·W
		{false, true, 100, 700, 64},    // cut by columns
	} {
		lda, ldb := sh.k, sh.n
		if sh.transA {
			lda = sh.m
		}
		if sh.transB {
			ldb = sh.k
		}
		a, b := randn(rng, sh.m*sh.k), randn(rng, sh.k*sh.n)
		whole := make([]float32, sh.m*sh.n)
		GoSgemm(sh.transA, sh.transB, sh.m, sh.n, sh.k, 1, a, lda, b, ldb, 0, whole, sh.n)
		for _, w := range []int{1, 2, 3, 8} {
			SetWorkers(w)
			got := make([]float32, sh.m*sh.n)
			GemmWith(GoSgemm, sh.transA, sh.transB, sh.m, sh.n, sh.k, 1, a, lda, b, ldb, 0, got, sh.n)
			for i := range got {
				if math.Float32bits(got[i]) != math.Float32bits(whole[i]) {
					t.Fatalf("%+v, %d workers: c[%d] = %g, one unsplit call gives %g", sh, w, i, got[i], whole[i])
				}
			}
		}
	}
}
