package kernels

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// refGemm is c = alpha·op(a)·op(b) + beta·c in float64, with the sum of the products'
// magnitudes per element, which bounds a float32 sum's rounding error.
func refGemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) (want, bound []float64) {
	want, bound = make([]float64, m*n), make([]float64, m*n)
	for i := range m {
		for j := range n {
			var s, abs float64
			for p := range k {
				ai, bi := i*lda+p, p*ldb+j
				if transA {
					ai = p*lda + i
				}
				if transB {
					bi = j*ldb + p
				}
				prod := float64(a[ai]) * float64(b[bi])
				s += prod
				abs += math.Abs(prod)
			}
			v := float64(alpha) * s
			if beta != 0 {
				v += float64(beta) * float64(c[i*ldc+j])
				abs += math.Abs(float64(beta) * float64(c[i*ldc+j]))
			}
			want[i*n+j] = v
			bound[i*n+j] = abs * math.Abs(float64(alpha))
		}
	}
	return want, bound
}

func randSlice(rng *rand.Rand, n int) []float32 {
	x := make([]float32, n)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	return x
}

type gemmCase struct {
	transA, transB bool
	m, n, k        int
	alpha, beta    float32
	pad            int // extra columns of stride beyond each matrix's width
}

func (g gemmCase) String() string {
	return fmt.Sprintf("tA=%v tB=%v m=%d n=%d k=%d alpha=%g beta=%g pad=%d", g.transA, g.transB, g.m, g.n, g.k, g.alpha, g.beta, g.pad)
}

// check runs one case on kern against the float64 reference; beta 0 puts NaN in c,
// which must not reach the result. It returns c for repeatability checks.
func (g gemmCase) check(t *testing.T, kern microKernel, rng *rand.Rand) {
	t.Helper()
	ar, ac := g.m, g.k
	if g.transA {
		ar, ac = g.k, g.m
	}
	br, bc := g.k, g.n
	if g.transB {
		br, bc = g.n, g.k
	}
	lda, ldb, ldc := max(ac+g.pad, 1), max(bc+g.pad, 1), g.n+g.pad
	a, b := randSlice(rng, max(ar*lda, 1)), randSlice(rng, max(br*ldb, 1))
	c := randSlice(rng, g.m*ldc)
	if g.beta == 0 {
		for i := range c {
			c[i] = float32(math.NaN())
		}
	}
	want, bound := refGemm(g.transA, g.transB, g.m, g.n, g.k, g.alpha, a, lda, b, ldb, g.beta, c, ldc)
	orig := append([]float32(nil), c...)
	goSgemm(kern, g.transA, g.transB, g.m, g.n, g.k, g.alpha, a, lda, b, ldb, g.beta, c, ldc)
	const eps = 1.0 / (1 << 23)
	for i := range g.m {
		for j := range ldc {
			got := c[i*ldc+j]
			if j >= g.n {
				if math.Float32bits(got) != math.Float32bits(orig[i*ldc+j]) {
					t.Fatalf("%s %v: c[%d][%d] beyond n changed: %g, was %g", kern.isa, g, i, j, got, orig[i*ldc+j])
				}
				continue
			}
			w, tol := want[i*g.n+j], 2*float64(g.k+2)*eps*bound[i*g.n+j]+1e-30
			if d := math.Abs(float64(got) - w); !(d <= tol) {
				t.Fatalf("%s %v: c[%d][%d]=%g, want %g (±%g)", kern.isa, g, i, j, got, w, tol)
			}
		}
	}
	again := append([]float32(nil), orig...)
	goSgemm(kern, g.transA, g.transB, g.m, g.n, g.k, g.alpha, a, lda, b, ldb, g.beta, again, ldc)
	for i := range c {
		if math.Float32bits(again[i]) != math.Float32bits(c[i]) {
			t.Fatalf("%s %v: a second call gave c[%d]=%g, the first %g", kern.isa, g, i, again[i], c[i])
		}
	}
}

func TestSgemmMatchesFloat64ReferenceOnEveryKernel(t *testing.T) {
	var shapes [][3]int
	for _, d := range []int{1, 2, 3, 5, 7, 11, 12, 13, 16, 17, 31, 32, 33, 47, 64, 70} {
		shapes = append(shapes, [3]int{d, 70 - d + 1, d%9 + 1}, [3]int{70 - d + 1, d, 2 * d})
	}
	shapes = append(shapes, [3]int{1, 1, 1}, [3]int{13, 33, 1}, [3]int{25, 40, 700}, [3]int{9, 5, 2100}, [3]int{150, 67, 300})
	for _, kern := range kernels() {
		t.Run(kern.isa, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(3, 4))
			for si, sh := range shapes {
				for tr := range 4 {
					g := gemmCase{transA: tr&1 != 0, transB: tr&2 != 0, m: sh[0], n: sh[1], k: sh[2], alpha: 1, beta: 0}
					switch (si + tr) % 4 {
					case 1:
						g.beta = 1
					case 2:
						g.alpha, g.beta, g.pad = -0.75, 0.5, 3
					case 3:
						g.alpha, g.pad = 2, 17
					}
					g.check(t, kern, rng)
				}
			}
		})
	}
}

func TestSgemmOnTheBlockShapes(t *testing.T) {
	if testing.Short() {
		t.Skip("large products")
	}
	// The block's three products per projection with its n and k (fewer rows than
	// compute.Blocks gives each, to keep the float64 reference quick).
	cases := []gemmCase{
		{m: 150, n: 1376, k: 256, transB: true, alpha: 1},         // forward y = x·Wᵀ
		{m: 40, n: 256, k: 2048, transA: true, alpha: 1, beta: 1}, // dW += dyᵀ·x
		{m: 50, n: 256, k: 688, alpha: 1},                         // dx = dy·W
		{m: 128, n: 128, k: 64, transB: true, alpha: 0.125, pad: 192},
	}
	for _, kern := range kernels() {
		rng := rand.New(rand.NewPCG(5, 6))
		for _, g := range cases {
			g.check(t, kern, rng)
		}
	}
}

func TestSgemmZeroKOrAlphaOnlyScalesC(t *testing.T) {
	for _, kern := range kernels() {
		for _, g := range []gemmCase{{m: 5, n: 7, k: 0, alpha: 1, beta: 0.5}, {m: 5, n: 7, k: 3, alpha: 0, beta: 2}, {m: 5, n: 7, k: 0, alpha: 1, beta: 0}} {
			g.check(t, kern, rand.New(rand.NewPCG(1, 1)))
		}
	}
}

func TestSgemmRandomShapes(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	for _, kern := range kernels() {
		for range 60 {
			g := gemmCase{
				transA: rng.IntN(2) == 1, transB: rng.IntN(2) == 1,
				m: 1 + rng.IntN(90), n: 1 + rng.IntN(90), k: 1 + rng.IntN(600),
				alpha: []float32{1, -1, 0.3}[rng.IntN(3)], beta: []float32{0, 1, -2}[rng.IntN(3)], pad: rng.IntN(5),
			}
			g.check(t, kern, rng)
		}
	}
}

func FuzzSgemm(f *testing.F) {
	f.Add(uint8(13), uint8(33), uint16(7), uint8(0), uint8(0))
	f.Add(uint8(1), uint8(1), uint16(300), uint8(3), uint8(2))
	f.Fuzz(func(t *testing.T, m, n uint8, k uint16, tr, pad uint8) {
		g := gemmCase{transA: tr&1 != 0, transB: tr&2 != 0, m: int(m%100) + 1, n: int(n%100) + 1, k: int(k%800) + 1, alpha: 1, beta: float32(tr>>2&1) * 0.5, pad: int(pad % 8)}
		for _, kern := range kernels() {
			g.check(t, kern, rand.New(rand.NewPCG(uint64(m), uint64(k))))
		}
	})
}
