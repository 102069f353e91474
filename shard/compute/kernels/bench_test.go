package kernels

import (
	"math/rand/v2"
	"testing"
)

// BenchmarkSgemm times Sgemm on one goroutine on the block's three products per
// projection (d_model 256, gate|up 1376, 2048 tokens), each as compute.Blocks cuts it
// into four, with every kernel this CPU runs.
func BenchmarkSgemm(b *testing.B) {
	shapes := []struct {
		name           string
		transA, transB bool
		m, n, k        int
		beta           float32
	}{
		{"forward-512x1376x256", false, true, 512, 1376, 256, 0}, // y = x·Wᵀ
		{"dW-344x256x2048", true, false, 344, 256, 2048, 1},      // dW += dyᵀ·x
		{"dx-512x256x1376", false, false, 512, 256, 1376, 0},     // dx = dy·W
	}
	for _, kern := range kernels() {
		for _, sh := range shapes {
			b.Run(kern.isa+"/"+sh.name, func(b *testing.B) {
				rng := rand.New(rand.NewPCG(1, 2))
				lda, ldb := sh.k, sh.n
				if sh.transA {
					lda = sh.m
				}
				if sh.transB {
					ldb = sh.k
				}
				x, w, c := randSlice(rng, sh.m*sh.k), randSlice(rng, sh.k*sh.n), make([]float32, sh.m*sh.n)
				for b.Loop() {
					goSgemm(kern, sh.transA, sh.transB, sh.m, sh.n, sh.k, 1, x, lda, w, ldb, sh.beta, c, sh.n)
				}
				b.ReportMetric(2*float64(sh.m*sh.n*sh.k)/(b.Elapsed().Seconds()/float64(b.N))/1e9, "GFLOP/s")
			})
		}
	}
}
