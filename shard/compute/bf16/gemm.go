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
	gemm(best, serial, transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

// Gemm is Sgemm spread over goroutines by parallelFor, which runs fn over [0, n) cut
// into ranges (compute.ParallelFor). Each operand is packed once, its panels shared
// out, then the tiles of c; as every element of c is computed alone in the same way
// whoever computes it, the result is Sgemm's, bit for bit, whatever the split.
func Gemm(parallelFor func(n int, fn func(lo, hi int)), transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	gemm(best, parallelFor, transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

func serial(n int, fn func(lo, hi int)) {
	if n > 0 {
		fn(0, n)
	}
}

// ISA names what Sgemm multiplies with: "avx512bf16"; "avx512" (AVX-512 without
// AVX512-BF16: the instruction emulated with fused multiply-adds, the operands
// rounded in Go); or "generic", the Go emulation, hundreds of times slower.
func ISA() string { return best.String() }

// isa is a set of kernels.
type isa int

const (
	isaGeneric    isa = iota // Go
	isaAVX512                // FMA emulation of VDPBF16PS, Go packing
	isaAVX512BF16            // VDPBF16PS, AVX-512 packing
)

func (i isa) String() string {
	return [...]string{"generic", "avx512", "avx512bf16"}[i]
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

// gemm is Gemm on the kernels of set.
func gemm(set isa, par func(int, func(lo, hi int)), transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	if m == 0 || n == 0 {
		return
	}
	checkGemm("Sgemm", transA, transB, m, n, k, a, lda, b, ldb, c, ldc)
	native := set == isaAVX512BF16 // the packers need its rounding instruction
	kp := (k + 1) / 2
	mp, np := (m+bf16MR-1)/bf16MR, (n+bf16NR-1)/bf16NR
	pa, pb := getPack(mp*kp*bf16MR), getPack(np*kp*bf16NR)
	defer bf16Pack.Put(pa)
	defer bf16Pack.Put(pb)
	ap, bp := *pa, *pb
	// A's k-pairs run along its rows unless transposed; B's along its columns unless
	// transposed (Bᵀ's rows).
	// An operand whose k runs along its stored rows is packed a panel at a time; one
	// whose k runs down its columns a range of k-pairs at a time across every panel,
	// reading it in the order it is stored.
	jobs := func(alongRows bool, panels int) int {
		if alongRows {
			return panels
		}
		return (kp + pairsPerJob - 1) / pairsPerJob
	}
	ja, jb := jobs(!transA, mp), jobs(transB, np)
	pack := func(dst []uint32, w int, x []float32, ld, count int, alongRows bool, job int) {
		if alongRows {
			packBF16(native, dst[job*kp*w:(job+1)*kp*w], w, x, ld, job*w, min(w, count-job*w), k, true)
			return
		}
		p0 := job * pairsPerJob
		p1 := min(p0+pairsPerJob, kp)
		packCols(native, dst, w, kp, x, ld, count, p0, min(p1, k/2))
		if p1 == kp && k%2 == 1 { // the last pair has no odd element
			for i := range (count + w - 1) / w {
				d := dst[(i*kp+kp-1)*w : (i*kp+kp)*w]
				lines := min(w, count-i*w)
				for r := range lines {
					d[r] = uint32(toBF16(x[(k-1)*ld+i*w+r]))
				}
				clear(d[lines:])
			}
		}
	}
	par(ja+jb, func(lo, hi int) {
		for x := lo; x < hi; x++ {
			if x < ja {
				pack(ap, bf16MR, a, lda, m, !transA, x)
			} else {
				pack(bp, bf16NR, b, ldb, n, transB, x-ja)
			}
		}
	})
	readC := beta != 0
	var accs []float32
	if set != isaGeneric && kp > kcPairs {
		pacc := bf16Acc.Get().(*[]float32)
		defer bf16Acc.Put(pacc)
		if cap(*pacc) < mp*np*bf16MR*bf16NR {
			*pacc = make([]float32, mp*np*bf16MR*bf16NR)
		}
		accs = (*pacc)[:mp*np*bf16MR*bf16NR]
	}
	tiles := func(j0, j1, i0, i1 int) {
		if set != isaGeneric && kp > 0 {
			tilesNative(set, kp, mp, j0, j1, i0, i1, ap, bp, m, n, alpha, beta, c, ldc, readC, accs)
		} else {
			tilesGo(kp, j0, j1, i0, i1, ap, bp, m, n, alpha, beta, c, ldc, readC)
		}
	}
	// Cut c along its longer side in panels.
	if np >= mp {
		par(np, func(lo, hi int) { tiles(lo, hi, 0, mp) })
	} else {
		par(mp, func(lo, hi int) { tiles(0, np, lo, hi) })
	}
}

// tilesGo is the Go emulation over the tiles of column panels [j0, j1) and row
// panels [i0, i1).
func tilesGo(kp, j0, j1, i0, i1 int, ap, bp []uint32, m, n int, alpha, beta float32, c []float32, ldc int, readC bool) {
	var tile [bf16MR * bf16NR]float32
	for j := j0; j < j1; j++ {
		col := j * bf16NR
		cols := min(bf16NR, n-col)
		bj := bp[j*kp*bf16NR:]
		for i := i0; i < i1; i++ {
			row := i * bf16MR
			dpbf16TileGo(kp, ap[i*kp*bf16MR:], bj, &tile)
			for r := range min(bf16MR, m-row) {
				cr := c[(row+r)*ldc+col : (row+r)*ldc+col+cols]
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

// pairsPerJob is how many k-pairs of an operand whose k runs down its columns one
// packing job takes.
const pairsPerJob = 64

// kcPairs is how many k-pairs the native kernels take at a time: a B panel's slice
// (16 KiB) then stays in L1 while every A panel passes it. Each tile's sums are kept
// in float32 between slices and picked up where they stopped, so the result is the
// same as one pass over k.
const kcPairs = 128

// bf16Acc holds the tiles' sums between slices of k; pooled like the panels.
var bf16Acc = sync.Pool{New: func() any { return new([]float32) }}

// tilesNative runs the AVX512-BF16 kernel over the tiles of column panels [j0, j1)
// and row panels [i0, i1), in slices of k; accs holds every tile's sums (mp row
// panels to a column) when there is more than one slice.
func tilesNative(set isa, kp, mp, j0, j1, i0, i1 int, ap, bp []uint32, m, n int, alpha, beta float32, c []float32, ldc int, readC bool, accs []float32) {
	kernel := dpbf16Tile
	if set == isaAVX512 {
		kernel = dpbf16TileFMA
	}
	slices := (kp + kcPairs - 1) / kcPairs
	var one [bf16MR * bf16NR]float32
	for s := range slices {
		p0 := s * kcPairs
		pk := min(kcPairs, kp-p0)
		var mode int
		if s > 0 {
			mode |= 1 // resume from the stored sums
		}
		if s == slices-1 {
			mode |= 2 // the last slice: alpha, beta and the store into c
		}
		for j := j0; j < j1; j++ {
			col := j * bf16NR
			mask := uint32(1)<<min(bf16NR, n-col) - 1
			bj := bp[(j*kp+p0)*bf16NR:]
			for i := i0; i < i1; i++ {
				row := i * bf16MR
				acc := one[:]
				if slices > 1 {
					acc = accs[(j*mp+i)*len(one):]
				}
				kernel(pk, &ap[(i*kp+p0)*bf16MR], &bj[0], &c[row*ldc+col], ldc, alpha, beta, min(bf16MR, m-row), mask, readC, &acc[0], mode)
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
	if !alongRows {
		packCols(native, dst, w, kp, x[min(r0, len(x)):], ld, count, 0, k/2)
	} else if native {
		packRowsNative(dst, w, x, ld, r0, count, k)
	} else {
		for p := range k / 2 {
			d := dst[p*w : (p+1)*w]
			for r := range count {
				lo, hi := x[(r0+r)*ld+2*p], x[(r0+r)*ld+2*p+1]
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

// packCols packs the full k-pairs [p0, p1) of every panel of width w (kp k-pairs each,
// one after another in dst) of an operand whose k runs down its columns: line r is
// column r of x, count lines in all, the panels' lines past count zero.
func packCols(native bool, dst []uint32, w, kp int, x []float32, ld, count, p0, p1 int) {
	if native {
		packColsNative(dst, w, kp, x, ld, count, p0, p1)
		return
	}
	for i := range (count + w - 1) / w {
		lines := min(w, count-i*w)
		for p := p0; p < p1; p++ {
			d := dst[(i*kp+p)*w : (i*kp+p+1)*w]
			r0, r1 := x[2*p*ld+i*w:], x[(2*p+1)*ld+i*w:]
			for r := range lines {
				d[r] = uint32(toBF16(r0[r])) | uint32(toBF16(r1[r]))<<16
			}
			clear(d[lines:])
		}
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
