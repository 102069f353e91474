package bf16

import (
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"testing"
)

// operands returns a, b and c for op(a)[m,k]·op(b)[k,n] with row strides padded by
// pad, filled by fill.
func operands(transA, transB bool, m, n, k, pad int, fill func() float32) (a []float32, lda int, b []float32, ldb int, c []float32, ldc int) {
	ar, ac := m, k
	if transA {
		ar, ac = k, m
	}
	br, bc := k, n
	if transB {
		br, bc = n, k
	}
	lda, ldb, ldc = ac+pad, bc+pad, n+pad
	mk := func(rows, ld int) []float32 {
		s := make([]float32, rows*ld)
		for i := range s {
			s[i] = fill()
		}
		return s
	}
	return mk(ar, lda), lda, mk(br, ldb), ldb, mk(m, ldc), ldc
}

func at(x []float32, ld int, trans bool, i, j int) float32 {
	if trans {
		return x[j*ld+i]
	}
	return x[i*ld+j]
}

func TestSgemmMatchesReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	fill := func() float32 { return float32(rng.NormFloat64()) }
	for _, native := range nativeModes() {
		for _, sh := range [][3]int{{1, 1, 1}, {5, 7, 3}, {12, 32, 2}, {13, 33, 17}, {31, 16, 64}, {40, 70, 129}, {128, 64, 128}, {14, 33, 2*kcPairs*3 + 3}} {
			for _, tr := range [][2]bool{{false, false}, {false, true}, {true, false}, {true, true}} {
				for _, ab := range [][2]float32{{1, 0}, {0.125, 0}, {1, 1}, {-2, 0.5}} {
					m, n, k := sh[0], sh[1], sh[2]
					name := fmt.Sprintf("kernels=%v/%dx%dx%d/ta=%v,tb=%v/alpha=%g,beta=%g", native, m, n, k, tr[0], tr[1], ab[0], ab[1])
					a, lda, b, ldb, c, ldc := operands(tr[0], tr[1], m, n, k, 3, fill)
					c0 := append([]float32(nil), c...)
					if ab[1] == 0 {
						for i := range c {
							c[i] = float32(math.NaN()) // beta 0 must not read c
						}
					}
					gemm(native, serial, tr[0], tr[1], m, n, k, ab[0], a, lda, b, ldb, ab[1], c, ldc)
					for i := range m {
						for j := range n {
							var want, mag float64
							for kk := range k {
								x := float64(fromBF16(uint32(toBF16(at(a, lda, tr[0], i, kk)))))
								y := float64(fromBF16(uint32(toBF16(at(b, ldb, tr[1], kk, j)))))
								want += x * y
								mag += math.Abs(x * y)
							}
							want *= float64(ab[0])
							mag *= math.Abs(float64(ab[0]))
							if ab[1] != 0 {
								want += float64(ab[1]) * float64(c0[i*ldc+j])
								mag += math.Abs(float64(ab[1]) * float64(c0[i*ldc+j]))
							}
							got := float64(c[i*ldc+j])
							if tol := mag * float64(k+3) * 0x1p-24; math.Abs(got-want) > tol || math.IsNaN(got) {
								t.Fatalf("%s: c[%d,%d] = %g, want %g ± %g", name, i, j, got, want, tol)
							}
						}
						for j := n; j < ldc; j++ {
							if i*ldc+j < len(c) && math.Float32bits(c[i*ldc+j]) != math.Float32bits(c0[i*ldc+j]) && !(ab[1] == 0) {
								t.Fatalf("%s: c[%d,%d] past n was written", name, i, j)
							}
						}
					}
				}
			}
		}
	}
}

// nativeModes lists every set of kernels this CPU runs.
func nativeModes() []isa {
	var out []isa
	for i := isaGeneric; i <= best; i++ {
		out = append(out, i)
	}
	return out
}

// TestSgemmNativeMatchesEmulation asserts that the Go emulation computes the same bits
// as the AVX512-BF16 kernels, over values spanning float32's whole range (products and
// sums that overflow, underflow into the flushed range, cancel, and NaNs).
func TestSgemmNativeMatchesEmulation(t *testing.T) {
	if best == isaGeneric {
		t.Skip("this CPU has no AVX-512: nothing to compare the emulation with")
	}
	rng := rand.New(rand.NewPCG(3, 4))
	special := []float32{0, float32(math.Copysign(0, -1)), 1, -1, float32(math.Inf(1)), float32(math.Inf(-1)), float32(math.NaN()),
		math.MaxFloat32, -math.MaxFloat32, 0x1p-126, -0x1p-126, 0x1p-127, 0x1p-149, 0x1.00fffep0, 0x1.018p0, 0x1.008p0, 0x1.fffffep127}
	fills := map[string]func() float32{
		"normal": func() float32 { return float32(rng.NormFloat64()) },
		"wide": func() float32 { // any exponent, any mantissa
			return math.Float32frombits(rng.Uint32()&^(0xff<<23) | uint32(rng.IntN(255))<<23)
		},
		"tiny": func() float32 { return float32(rng.NormFloat64() * 0x1p-63) }, // products near 2⁻¹²⁶
		"special": func() float32 {
			if rng.IntN(4) == 0 {
				return special[rng.IntN(len(special))]
			}
			return float32(rng.NormFloat64())
		},
	}
	for name, fill := range fills {
		for _, sh := range [][3]int{{13, 33, 17}, {24, 64, 256}, {7, 48, 3}, {25, 40, 2*kcPairs*2 + 37}} {
			for _, tr := range [][2]bool{{false, false}, {false, true}, {true, false}, {true, true}} {
				for _, ab := range [][2]float32{{1, 0}, {0.3, 0.7}, {1, 1}} {
					m, n, k := sh[0], sh[1], sh[2]
					a, lda, b, ldb, c, ldc := operands(tr[0], tr[1], m, n, k, 1, fill)
					c0 := append([]float32(nil), c...)
					gemm(isaGeneric, serial, tr[0], tr[1], m, n, k, ab[0], a, lda, b, ldb, ab[1], c, ldc)
					for _, set := range nativeModes()[1:] {
						cn := append([]float32(nil), c0...)
						gemm(set, serial, tr[0], tr[1], m, n, k, ab[0], a, lda, b, ldb, ab[1], cn, ldc)
						for i := range c {
							g, w := math.Float32bits(cn[i]), math.Float32bits(c[i])
							if g != w && !(math.IsNaN(float64(cn[i])) && math.IsNaN(float64(c[i]))) {
								t.Fatalf("%s %dx%dx%d ta=%v tb=%v alpha=%g beta=%g: c[%d]: %v %#08x (%g), emulation %#08x (%g)",
									name, m, n, k, tr[0], tr[1], ab[0], ab[1], i, set, g, cn[i], w, c[i])
							}
						}
					}
				}
			}
		}
	}
}

// TestToBF16MatchesInstruction compares the Go rounding with the packers' instruction
// on every class of float32: halfway cases, denormals, NaNs, infinities, overflow.
func TestToBF16MatchesInstruction(t *testing.T) {
	if best != isaAVX512BF16 {
		t.Skip("this CPU has no AVX512-BF16")
	}
	rng := rand.New(rand.NewPCG(5, 6))
	const lines, k = 32, 64
	x := make([]float32, lines*k)
	for round := range 200 {
		for i := range x {
			u := rng.Uint32()
			switch rng.IntN(6) {
			case 0:
				u &^= 0x7f800000 // zero exponent: denormal
			case 1:
				u |= 0x7f800000 // inf or NaN
			case 2:
				u = u&^0xffff | 0x8000 // halfway
			case 3:
				u = u&^0xffff | 0x7fff
			}
			x[i] = math.Float32frombits(u)
		}
		// Every width, partial line groups, k-pairs past a group of 16, odd k.
		w := []int{bf16MR, bf16NR}[round%2]
		count, kk := 1+rng.IntN(w), 1+rng.IntN(k)
		for _, alongRows := range []bool{false, true} {
			ld := k
			if !alongRows {
				ld = lines
			}
			kp := (kk + 1) / 2
			got, want := make([]uint32, kp*w), make([]uint32, kp*w)
			for i := range got {
				got[i], want[i] = 0xdeadbeef, 0xdeadbeef // padding must be written
			}
			packBF16(true, got, w, x, ld, 0, count, kk, alongRows)
			packBF16(false, want, w, x, ld, 0, count, kk, alongRows)
			for i := range got {
				if got[i] != want[i] {
					t.Fatalf("round %d w=%d count=%d k=%d alongRows=%v word %d: instruction %#08x, Go %#08x", round, w, count, kk, alongRows, i, got[i], want[i])
				}
			}
		}
	}
}

func TestSgemmRepeatable(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	fill := func() float32 { return float32(rng.NormFloat64()) }
	for _, native := range nativeModes() {
		a, lda, b, ldb, c, ldc := operands(false, true, 100, 200, 300, 0, fill)
		c1 := append([]float32(nil), c...)
		gemm(native, serial, false, true, 100, 200, 300, 1, a, lda, b, ldb, 1, c, ldc)
		gemm(native, serial, false, false, 37, 21, 5, 1, a, lda, b, ldb, 0, make([]float32, 37*21), 21) // other shapes reuse the pool
		gemm(native, serial, false, true, 100, 200, 300, 1, a, lda, b, ldb, 1, c1, ldc)
		for i := range c {
			if math.Float32bits(c[i]) != math.Float32bits(c1[i]) {
				t.Fatalf("kernels=%v: c[%d] %g then %g", native, i, c[i], c1[i])
			}
		}
	}
}

// TestGemmSplitIsSgemm: Gemm spread over goroutines in any ranges is Sgemm, bit for bit.
func TestGemmSplitIsSgemm(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	fill := func() float32 { return float32(rng.NormFloat64()) }
	for _, native := range nativeModes() {
		for _, sh := range [][3]int{{200, 70, 600}, {30, 300, 45}} {
			for _, tr := range [][2]bool{{false, true}, {true, false}} {
				m, n, k := sh[0], sh[1], sh[2]
				a, lda, b, ldb, c, ldc := operands(tr[0], tr[1], m, n, k, 2, fill)
				want := append([]float32(nil), c...)
				gemm(native, serial, tr[0], tr[1], m, n, k, 0.5, a, lda, b, ldb, 1, want, ldc)
				for _, parts := range []int{1, 2, 3, 7} {
					got := append([]float32(nil), c...)
					par := func(n int, fn func(lo, hi int)) {
						var wg sync.WaitGroup
						chunk := (n + parts - 1) / parts
						for lo := 0; lo < n; lo += chunk {
							wg.Go(func() { fn(lo, min(lo+chunk, n)) })
						}
						wg.Wait()
					}
					gemm(native, par, tr[0], tr[1], m, n, k, 0.5, a, lda, b, ldb, 1, got, ldc)
					for i := range got {
						if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
							t.Fatalf("kernels=%v %v %dx%dx%d in %d parts: c[%d] = %g, serially %g", native, tr, m, n, k, parts, i, got[i], want[i])
						}
					}
				}
			}
		}
	}
}

func TestSgemmZeroK(t *testing.T) {
	for _, native := range nativeModes() {
		c := []float32{1, 2, 3, 4}
		gemm(native, serial, false, false, 2, 2, 0, 1, nil, 0, nil, 2, 0.5, c, 2)
		if c[0] != 0.5 || c[3] != 2 {
			t.Fatalf("kernels=%v: k=0 with beta 0.5 gave %v, want beta·c", native, c)
		}
	}
}

// BenchmarkSgemm times Sgemm single-threaded on a block's projection shapes (2048
// tokens, d 256, SwiGLU 688): y = x·Wᵀ, dW += dyᵀ·x, dx = dy·W.
func BenchmarkSgemm(b *testing.B) {
	const n = 2048
	for _, p := range []struct {
		name    string
		in, out int
	}{{"qkv", 256, 768}, {"o", 256, 256}, {"gateup", 256, 1376}, {"down", 688, 256}} {
		for _, g := range []struct {
			name           string
			transA, transB bool
			m, nn, k       int
			lda, ldb, ldc  int
			beta           float32
		}{
			{"fwd", false, true, n, p.out, p.in, p.in, p.in, p.out, 0},
			{"dW", true, false, p.out, p.in, n, p.out, p.in, p.in, 1},
			{"dx", false, false, n, p.in, p.out, p.out, p.in, p.in, 0},
		} {
			b.Run(p.name+"/"+g.name, func(b *testing.B) {
				rng := rand.New(rand.NewPCG(1, 1))
				mk := func(l int) []float32 {
					s := make([]float32, l)
					for i := range s {
						s[i] = float32(rng.NormFloat64())
					}
					return s
				}
				ar := g.m
				if g.transA {
					ar = g.k
				}
				br := g.k
				if g.transB {
					br = g.nn
				}
				a, bb, c := mk(ar*g.lda), mk(br*g.ldb), mk(g.m*g.ldc)
				for b.Loop() {
					Sgemm(g.transA, g.transB, g.m, g.nn, g.k, 1, a, g.lda, bb, g.ldb, g.beta, c, g.ldc)
				}
				b.ReportMetric(2*float64(g.m)*float64(g.nn)*float64(g.k)/(b.Elapsed().Seconds()/float64(b.N))/1e9, "GFLOP/s")
			})
		}
	}
}

// BenchmarkPack times rounding and packing one operand of a block's GEMM (2048×256
// floats) into panels of each width, k along the rows and down the columns.
func BenchmarkPack(b *testing.B) {
	const lines, k = 192, 256
	x := make([]float32, lines*k)
	for i := range x {
		x[i] = float32(i%97) / 7
	}
	for _, w := range []int{bf16MR, bf16NR} {
		for _, alongRows := range []bool{true, false} {
			ld := k
			if !alongRows {
				ld = lines
			}
			dst := make([]uint32, k/2*w)
			b.Run(fmt.Sprintf("w=%d/alongRows=%v", w, alongRows), func(b *testing.B) {
				for b.Loop() {
					for r0 := 0; r0 < lines; r0 += w {
						packBF16(best == isaAVX512BF16, dst, w, x, ld, r0, min(w, lines-r0), k, alongRows)
					}
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(lines*k), "ns/element")
			})
		}
	}
}
