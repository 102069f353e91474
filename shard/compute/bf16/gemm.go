// Package bf16 is pipeswarm's own bfloat16 GEMM: inputs rounded to bf16, products
// accumulated in float32, on AVX512-BF16's dot-product instruction where the CPU has
// it and on a Go emulation of the same arithmetic elsewhere.
package bf16

import (
	"math"
	"sync"
)

//go:generate go run gen.go

// The tile Sgemm's kernels compute: bf16MR rows by bf16NR columns of c.
const (
	bf16MR = 12
	bf16NR = 32
)

// Sgemm is c = alpha·op(a)·op(b) + beta·c with the inputs rounded to bfloat16
// and float32 accumulation, on the calling goroutine, row-major, op(a) m×k, op(b) k×n;
// with beta 0, c is not read. Each element of c is exactly what AVX512-BF16's
// VDPBF16PS computes from 0 over k in pairs (k, k+1) taken in order (lane += odd
// product, then += even product, each one rounding to nearest even with results
// below 2⁻¹²⁶ flushed to zero), then alpha·acc + beta·c with each product and the sum
// rounded once. Rounding to bf16 is to nearest even, NaN stays NaN, and values below
// 2⁻¹²⁶ become zero, as the instruction's conversions do. The result is the same on
// every call, on every CPU: with AVX512-BF16 the products run on it, elsewhere a Go
// emulation of it gives the same bits (only a NaN's payload may differ).
func Sgemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	gemm(bf16Native, transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

// ISA names what Sgemm multiplies with: "avx512bf16", or "generic" for the
// Go emulation (much slower).
func ISA() string {
	if bf16Native {
		return "avx512bf16"
	}
	return "generic"
}

// bf16Pack holds a call's packed operands; pooled, as attention calls with small
// shapes hundreds of times a step.
var bf16Pack = sync.Pool{New: func() any { return new([]uint32) }}

func getPack(n int) *[]uint32 {
	p := bf16Pack.Get().(*[]uint32)
	if cap(*p) < n {
		*p = make([]uint32, n)
	}
	*p = (*p)[:n]
	return p
}

// gemm is Sgemm on the native kernels when native, else on the Go ones.
func gemm(native, transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	if m == 0 || n == 0 {
		return
	}
	checkGemm("Sgemm", transA, transB, m, n, k, a, lda, b, ldb, c, ldc)
	kp := (k + 1) / 2
	mp, np := (m+bf16MR-1)/bf16MR, (n+bf16NR-1)/bf16NR
	pa, pb := getPack(mp*kp*bf16MR), getPack(np*kp*bf16NR)
	defer bf16Pack.Put(pa)
	defer bf16Pack.Put(pb)
	ap, bp := *pa, *pb
	// A's k-pairs run along its rows unless transposed; B's along its columns unless
	// transposed (Bᵀ's rows).
	for i := 0; i < mp; i++ {
		packBF16(native, ap[i*kp*bf16MR:(i+1)*kp*bf16MR], bf16MR, a, lda, i*bf16MR, min(bf16MR, m-i*bf16MR), k, !transA)
	}
	for j := 0; j < np; j++ {
		packBF16(native, bp[j*kp*bf16NR:(j+1)*kp*bf16NR], bf16NR, b, ldb, j*bf16NR, min(bf16NR, n-j*bf16NR), k, transB)
	}
	readC := beta != 0
	var tile [bf16MR * bf16NR]float32
	for j := 0; j < np; j++ {
		j0 := j * bf16NR
		cols := min(bf16NR, n-j0)
		mask := uint32(1)<<cols - 1
		bj := bp[j*kp*bf16NR:]
		for i := 0; i < mp; i++ {
			i0 := i * bf16MR
			rows := min(bf16MR, m-i0)
			ai := ap[i*kp*bf16MR:]
			if native && kp > 0 {
				dpbf16Tile(kp, &ai[0], &bj[0], &c[i0*ldc+j0], ldc, alpha, beta, rows, mask, readC)
				continue
			}
			dpbf16TileGo(kp, ai, bj, &tile)
			for r := range rows {
				cr := c[(i0+r)*ldc+j0 : (i0+r)*ldc+j0+cols]
				for jj := range cr {
					v := float32(alpha * tile[r*bf16NR+jj]) // rounded before the sum, never fused
					if readC {
						v += float32(beta * cr[jj]) // rounded alone, as the kernel does
					}
					cr[jj] = v
				}
			}
		}
	}
}

// checkGemm panics when the slices cannot hold the matrices their shapes say.
func checkGemm(name string, transA, transB bool, m, n, k int, a []float32, lda int, b []float32, ldb int, c []float32, ldc int) {
	need := func(what string, s []float32, rows, cols, ld int) {
		if rows == 0 || cols == 0 {
			return
		}
		if ld < cols || len(s) < (rows-1)*ld+cols {
			panic(name + ": " + what + " is too short for its shape or its stride is below its width")
		}
	}
	ar, ac := m, k
	if transA {
		ar, ac = k, m
	}
	br, bc := k, n
	if transB {
		br, bc = n, k
	}
	need("a", a, ar, ac, lda)
	need("b", b, br, bc, ldb)
	need("c", c, m, n, ldc)
}

// packBF16 rounds rows (or columns) r0..r0+count of a matrix to bf16 and lays them
// out as a panel of width w: for each k-pair p, w words, word r holding elements
// (2p, 2p+1) of line r0+r, the even one in the low half; lines past count and the
// odd element past k are zero. alongRows says the k direction runs along the stored
// rows (x[line·ld + kk]); otherwise down the columns (x[kk·ld + line]).
func packBF16(native bool, dst []uint32, w int, x []float32, ld, r0, count, k int, alongRows bool) {
	kp := (k + 1) / 2
	if native {
		if alongRows {
			packRowsNative(dst, w, x, ld, r0, count, k)
		} else {
			packColsNative(dst, w, x, ld, r0, count, k)
		}
	} else {
		for p := range k / 2 {
			d := dst[p*w : (p+1)*w]
			for r := range count {
				var lo, hi float32
				if alongRows {
					lo, hi = x[(r0+r)*ld+2*p], x[(r0+r)*ld+2*p+1]
				} else {
					lo, hi = x[2*p*ld+r0+r], x[(2*p+1)*ld+r0+r]
				}
				d[r] = uint32(toBF16(lo)) | uint32(toBF16(hi))<<16
			}
			clear(d[count:])
		}
	}
	if k%2 == 1 {
		d := dst[(kp-1)*w : kp*w]
		for r := range count {
			if alongRows {
				d[r] = uint32(toBF16(x[(r0+r)*ld+k-1]))
			} else {
				d[r] = uint32(toBF16(x[(k-1)*ld+r0+r]))
			}
		}
		clear(d[count:])
	}
}

// toBF16 rounds x to bfloat16 as VCVTNEPS2BF16 does: nearest even; a NaN stays a quiet
// NaN; zero and values below 2⁻¹²⁶ (float32's denormals) become zero of their sign.
func toBF16(x float32) uint16 {
	u := math.Float32bits(x)
	switch {
	case u&0x7f800000 == 0:
		return uint16(u>>16) & 0x8000
	case u&0x7fffffff > 0x7f800000:
		return uint16(u>>16) | 0x40
	}
	return uint16((u + 0x7fff + (u>>16)&1) >> 16)
}

// fromBF16 widens a bfloat16 to float32, exactly.
func fromBF16(h uint32) float32 { return math.Float32frombits(h << 16) }

// dpbf16TileGo is the Go emulation of dpbf16Tile's accumulation: acc[bf16MR, bf16NR]
// from kp k-pairs of the panels a and b.
func dpbf16TileGo(kp int, a, b []uint32, acc *[bf16MR * bf16NR]float32) {
	clear(acc[:])
	for p := range kp {
		ap, bp := a[p*bf16MR:(p+1)*bf16MR], b[p*bf16NR:(p+1)*bf16NR]
		for i, av := range ap {
			aOdd, aEven := fromBF16(av>>16), fromBF16(av&0xffff)
			row := acc[i*bf16NR : (i+1)*bf16NR]
			for j, bv := range bp {
				s := dpStep(row[j], aOdd, fromBF16(bv>>16))
				row[j] = dpStep(s, aEven, fromBF16(bv&0xffff))
			}
		}
	}
}

// dpStep is one of VDPBF16PS's two steps on a lane: acc + x·y rounded once to nearest
// even (x·y of two bf16 values is exact in float64, and rounding the float64 sum to
// float32 rounds as a single rounding would, float64 having more than twice float32's
// precision), a result below 2⁻¹²⁶ flushed to zero of its sign.
func dpStep(acc, x, y float32) float32 {
	r := float32(float64(acc) + float64(x)*float64(y))
	if u := math.Float32bits(r); u&0x7f800000 == 0 {
		return math.Float32frombits(u & 0x80000000)
	}
	return r
}
