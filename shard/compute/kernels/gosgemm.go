package kernels

import "sync"

// microKernel computes one mr×nr tile of c from packed panels: a holds k steps of mr
// values of op(a) (one column of the tile's rows per step), b k steps of nr values of
// op(b). Each element is the sum over p = 0..k-1 in that order, fused multiply-adds
// from zero, times alpha; load says whether to add it to the tile in c (row stride
// ldc) or store it over what is there (c is then not read).
type microKernel struct {
	isa    string
	mr, nr int
	fn     func(k int, a, b, c []float32, ldc int, alpha float32, load bool)
	// packRows fills panels of width w ≤ 32 from kc rows of n values (packRowsGo);
	// packT fills one panel from the transpose of n ≤ w rows of kc values (packTGo).
	packRows, packT func(pan []float32, w int, src []float32, ld, n, kc int)
}

// Cache blocking: a kc×nc block of packed op(b) (at most 576 KB) stays in L2 while
// one mr×kc panel of packed op(a) (18 KB for the AVX-512 kernel) stays in L1 and the
// kernel sweeps the block's columns with it. Up to maxMC rows of op(a) are packed at
// a time, so each operand of one of compute.Blocks's blocks of the block's products
// is packed once. kc splits k into near-equal steps of at most maxKC, so the
// summation order is fixed by k alone. The sizes were measured on the block's products
// (k 256, 688 or 2048; n 256 to 1376) on a Zen 4 core (1 MB L2): within a few per cent
// of each other from kc 256 to 512, nc 256 to 2048.
const (
	maxKC = 384
	maxMC = 528
	maxNC = 384
)

// goKernel is the micro-kernel Sgemm runs, chosen once at start from the CPU's
// features (bestKernel); tests swap it to cover each ISA.
var goKernel = bestKernel()

// ISA names the instruction set Sgemm's micro-kernel uses: "avx512", "avx2" or
// "generic".
func ISA() string { return goKernel.isa }

// PackBytes bounds the packing buffers one goroutine's Sgemm holds (a panel of op(a)
// and a block of op(b)); they are pooled, so a process holds about that much per
// goroutine computing at once, whatever the shapes.
const PackBytes = 4 * (maxMC*maxKC + maxNC*maxKC)

// packPool holds packing buffers so a GEMM allocates nothing once warm.
var packPool = sync.Pool{New: func() any { return new([]float32) }}

// Sgemm computes c = alpha·op(a)·op(b) + beta·c on the calling goroutine (row-major,
// op(a) m×k, op(b) k×n, c m×n, lda, ldb, ldc the row strides). For a given shape, transposes and strides the result is the same on
// every call: each element sums its k products in the same order whichever tile or
// block it falls in. With beta 0, c is written without being read (it may hold NaN).
func Sgemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	goSgemm(goKernel, transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

func goSgemm(kern microKernel, transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	if m == 0 || n == 0 {
		return
	}
	checkGemm(transA, transB, m, n, k, a, lda, b, ldb, c, ldc)
	if beta != 1 {
		if beta == 0 && k > 0 && alpha != 0 {
			// The first k step stores over c instead.
		} else {
			scaleRows(m, n, beta, c, ldc)
		}
	}
	if k == 0 || alpha == 0 {
		return
	}
	mr, nr := kern.mr, kern.nr
	steps := (k + maxKC - 1) / maxKC
	kcMax := (k + steps - 1) / steps
	mcMax := min(maxMC/mr*mr, roundUp(m, mr))
	ncMax := min(maxNC, roundUp(n, nr))

	pa, pb := packPool.Get().(*[]float32), packPool.Get().(*[]float32)
	defer packPool.Put(pa)
	defer packPool.Put(pb)
	ap, bp := grow(pa, mcMax*kcMax), grow(pb, ncMax*kcMax)
	var tile [16 * 32]float32

	for ic := 0; ic < m; ic += mcMax {
		mc := min(mcMax, m-ic)
		for pc := 0; pc < k; pc += kcMax {
			kc := min(kcMax, k-pc)
			load := beta != 0 || pc > 0
			packA(kern, ap, transA, a, lda, ic, mc, pc, kc)
			for jc := 0; jc < n; jc += ncMax {
				nc := min(ncMax, n-jc)
				packB(kern, bp, transB, b, ldb, pc, kc, jc, nc)
				for ir := 0; ir < mc; ir += mr {
					rows := min(mr, mc-ir)
					apan := ap[ir*kc : (ir+mr)*kc]
					for jr := 0; jr < nc; jr += nr {
						cols := min(nr, nc-jr)
						bpan := bp[jr*kc : (jr+nr)*kc]
						off := (ic+ir)*ldc + jc + jr
						if rows == mr && cols == nr {
							kern.fn(kc, apan, bpan, c[off:], ldc, alpha, load)
							continue
						}
						// An edge tile goes through a full one in tile: the same
						// sums, then the same add (or store) per element.
						kern.fn(kc, apan, bpan, tile[:], nr, alpha, false)
						for i := range rows {
							ci, ti := c[off+i*ldc:off+i*ldc+cols], tile[i*nr:i*nr+cols]
							if load {
								for j := range ci {
									ci[j] += ti[j]
								}
							} else {
								copy(ci, ti)
							}
						}
					}
				}
			}
		}
	}
}

func roundUp(x, to int) int { return (x + to - 1) / to * to }

func grow(p *[]float32, n int) []float32 {
	if cap(*p) < n {
		*p = make([]float32, n)
	}
	return (*p)[:n]
}

// checkGemm panics, as a BLAS would, when a stride or buffer cannot hold its matrix.
func checkGemm(transA, transB bool, m, n, k int, a []float32, lda int, b []float32, ldb int, c []float32, ldc int) {
	ar, ac := m, k
	if transA {
		ar, ac = k, m
	}
	br, bc := k, n
	if transB {
		br, bc = n, k
	}
	if m < 0 || n < 0 || k < 0 {
		panic("kernels: negative GEMM dimension")
	}
	short := func(rows, cols, ld, l int) bool {
		return ld < max(cols, 1) || (rows > 0 && cols > 0 && l < (rows-1)*ld+cols)
	}
	switch {
	case short(ar, ac, lda, len(a)):
		panic("kernels: GEMM a is too short for its rows and stride")
	case short(br, bc, ldb, len(b)):
		panic("kernels: GEMM b is too short for its rows and stride")
	case short(m, n, ldc, len(c)):
		panic("kernels: GEMM c is too short for its rows and stride")
	}
}

// scaleRows sets c = beta·c over an m×n block; beta 0 stores zeros without reading c.
func scaleRows(m, n int, beta float32, c []float32, ldc int) {
	for i := range m {
		row := c[i*ldc : i*ldc+n]
		if beta == 0 {
			clear(row)
			continue
		}
		for j := range row {
			row[j] *= beta
		}
	}
}

// packA copies rows ic..ic+mc and columns pc..pc+kc of op(a) into dst as panels of mr
// rows, each kc steps of mr values, zero-padding the last panel.
func packA(kern microKernel, dst []float32, transA bool, a []float32, lda, ic, mc, pc, kc int) {
	mr := kern.mr
	if transA { // op(a)[i][p] = a[p*lda+i]: each step is a run of a row of a
		kern.packRows(dst, mr, a[pc*lda+ic:], lda, mc, kc)
		return
	}
	for ir := 0; ir < mc; ir += mr {
		rows := min(mr, mc-ir)
		kern.packT(dst[ir*kc:(ir+mr)*kc], mr, a[(ic+ir)*lda+pc:], lda, rows, kc)
	}
}

// packB copies rows pc..pc+kc and columns jc..jc+nc of op(b) into dst as panels of nr
// columns, each kc steps of nr values, zero-padding the last panel.
func packB(kern microKernel, dst []float32, transB bool, b []float32, ldb, pc, kc, jc, nc int) {
	nr := kern.nr
	if !transB { // op(b)[p][j] = b[p*ldb+j]
		kern.packRows(dst, nr, b[pc*ldb+jc:], ldb, nc, kc)
		return
	}
	for jr := 0; jr < nc; jr += nr {
		cols := min(nr, nc-jr)
		kern.packT(dst[jr*kc:(jr+nr)*kc], nr, b[(jc+jr)*ldb+pc:], ldb, cols, kc)
	}
}

// packRowsGo fills panels of width w, each kc steps of w values, from kc rows of n
// values of src (ld apart): step p of panel q is src[p*ld+q*w:][:w], the last panel
// zero-padded. It reads src a row at a time, in order.
func packRowsGo(dst []float32, w int, src []float32, ld, n, kc int) {
	for p := range kc {
		row := src[p*ld : p*ld+n]
		for q := 0; q < n; q += w {
			d := dst[q*kc+p*w : q*kc+p*w+w]
			clear(d[copy(d, row[q:min(q+w, n)]):])
		}
	}
}

// packTGo sets pan[p*w+i] = src[i*ld+p] for p < kc, i < rows, and zero for
// rows ≤ i < w: the transpose of rows rows of src.
func packTGo(pan []float32, w int, src []float32, ld, rows, kc int) {
	packTTail(pan, w, src, ld, 0, rows, 0, kc)
}

// packTTail is packTGo for rows r0.. and steps p0.. only, padding rows up to w.
func packTTail(pan []float32, w int, src []float32, ld, r0, rows, p0, kc int) {
	for i := r0; i < rows; i++ {
		row := src[i*ld+p0 : i*ld+kc]
		for p, v := range row {
			pan[(p0+p)*w+i] = v
		}
	}
	for p := p0; p < kc; p++ {
		clear(pan[p*w+rows : p*w+w])
	}
}

// genericKernel is the portable micro-kernel: 4×4 tiles in plain Go.
var genericKernel = microKernel{isa: "generic", mr: 4, nr: 4, fn: kernelGeneric, packRows: packRowsGo, packT: packTGo}

func kernelGeneric(k int, a, b, c []float32, ldc int, alpha float32, load bool) {
	a, b = a[:4*k], b[:4*k]
	var c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33 float32
	for ; len(a) >= 4 && len(b) >= 4; a, b = a[4:], b[4:] {
		a0, a1, a2, a3 := a[0], a[1], a[2], a[3]
		b0, b1, b2, b3 := b[0], b[1], b[2], b[3]
		c00, c01, c02, c03 = fma32(a0, b0, c00), fma32(a0, b1, c01), fma32(a0, b2, c02), fma32(a0, b3, c03)
		c10, c11, c12, c13 = fma32(a1, b0, c10), fma32(a1, b1, c11), fma32(a1, b2, c12), fma32(a1, b3, c13)
		c20, c21, c22, c23 = fma32(a2, b0, c20), fma32(a2, b1, c21), fma32(a2, b2, c22), fma32(a2, b3, c23)
		c30, c31, c32, c33 = fma32(a3, b0, c30), fma32(a3, b1, c31), fma32(a3, b2, c32), fma32(a3, b3, c33)
	}
	rows := [4][4]float32{{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}, {c30, c31, c32, c33}}
	for i := range 4 {
		ci := c[i*ldc : i*ldc+4]
		for j := range ci {
			v := rows[i][j] * alpha
			if load {
				v += ci[j]
			}
			ci[j] = v
		}
	}
}

// fma32 is c + a·b; the compiler fuses it where the architecture has an FMA that it
// always uses (arm64), so a build's results do not vary from run to run.
func fma32(a, b, c float32) float32 { return c + a*b }
