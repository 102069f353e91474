package compute

import (
	"math"
	"math/rand/v2"
	"testing"
)

func TestExpMatchesMathExpWithinFewUlp(t *testing.T) {
	worst := 0.0
	for i := range 200001 {
		x := -87.0 + float64(i)*(175.5/200000)
		got := float64(Exp(float32(x)))
		want := math.Exp(float64(float32(x)))
		rel := math.Abs(got-want) / want
		worst = math.Max(worst, rel)
	}
	if worst > 3e-7 {
		t.Fatalf("worst relative error %g, want <= 3e-7", worst)
	}
	if Exp(-100) != 0 || !math.IsInf(float64(Exp(100)), 1) {
		t.Fatalf("Exp(-100)=%g Exp(100)=%g, want 0 and +Inf", Exp(-100), Exp(100))
	}
}

func naiveGemm(transA, transB bool, m, n, k int, a []float32, lda int, b []float32, ldb int, c []float32, ldc int, beta float32) {
	for i := range m {
		for j := range n {
			var s float64
			for p := range k {
				ai, bi := i*lda+p, p*ldb+j
				if transA {
					ai = p*lda + i
				}
				if transB {
					bi = j*ldb + p
				}
				av, bv := a[ai], b[bi]
				s += float64(av) * float64(bv)
			}
			c[i*ldc+j] = float32(s) + beta*c[i*ldc+j]
		}
	}
}

func TestGemmMatchesNaiveForEveryTransposeAndSplit(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	// The large shapes exceed minSplitFlops so the row and column splits are exercised.
	for _, sh := range [][3]int{{3, 5, 7}, {130, 70, 90}, {40, 300, 100}} {
		m, n, k := sh[0], sh[1], sh[2]
		for _, ta := range []bool{false, true} {
			for _, tb := range []bool{false, true} {
				a := randn(rng, m*k)
				b := randn(rng, k*n)
				lda, ldb := k, n
				if ta {
					lda = m
				}
				if tb {
					ldb = k
				}
				got := randn(rng, m*n)
				want := append([]float32(nil), got...)
				Gemm(ta, tb, m, n, k, 1, a, lda, b, ldb, 0.5, got, n)
				naiveGemm(ta, tb, m, n, k, a, lda, b, ldb, want, n, 0.5)
				for i := range got {
					if d := math.Abs(float64(got[i] - want[i])); d > 1e-4*(1+math.Abs(float64(want[i]))) {
						t.Fatalf("shape %v transA=%v transB=%v: c[%d]=%g, want %g", sh, ta, tb, i, got[i], want[i])
					}
				}
			}
		}
	}
}

func TestParallelForCoversRangeOnce(t *testing.T) {
	for _, n := range []int{0, 1, 2, 3, 17, 1000} {
		seen := make([]int32, n)
		ParallelFor(n, func(lo, hi int) {
			for i := lo; i < hi; i++ {
				seen[i]++
			}
		})
		for i, s := range seen {
			if s != 1 {
				t.Fatalf("n=%d: index %d visited %d times", n, i, s)
			}
		}
	}
}

func randn(rng *rand.Rand, n int) []float32 {
	x := make([]float32, n)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	return x
}

func BenchmarkExp(b *testing.B) {
	x := make([]float32, 4096)
	for i := range x {
		x[i] = float32(i%200) * -0.05
	}
	b.ResetTimer()
	var s float32
	for b.Loop() {
		for _, v := range x {
			s += Exp(v)
		}
	}
	_ = s
}

func BenchmarkGemm2048x384x128(b *testing.B) {
	rng := rand.New(rand.NewPCG(1, 2))
	a, w, c := randn(rng, 2048*128), randn(rng, 384*128), make([]float32, 2048*384)
	b.SetBytes(0)
	for b.Loop() {
		Gemm(false, true, 2048, 384, 128, 1, a, 128, w, 128, 0, c, 384)
	}
	b.ReportMetric(2*2048*384*128/(b.Elapsed().Seconds()/float64(b.N))/1e9, "GFLOP/s")
}
