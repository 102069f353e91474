//go:build amd64 && !purego

package bf16

import "golang.org/x/sys/cpu"

// best is the fastest set of kernels this CPU runs (the AVX512-BF16 packers need
// AVX512BW's word permutes too).
var best = func() isa {
	switch {
	case cpu.X86.HasAVX512BF16 && cpu.X86.HasAVX512BW && cpu.X86.HasAVX512F:
		return isaAVX512BF16
	case cpu.X86.HasAVX512F:
		return isaAVX512
	}
	return isaGeneric
}()

//go:noescape
func dpbf16Tile(kp int, a, b *uint32, c *float32, ldc int, alpha, beta float32, rows int, cols uint32, readC bool, acc *float32, mode int)

//go:noescape
func dpbf16TileFMA(kp int, a, b *uint32, c *float32, ldc int, alpha, beta float32, rows int, cols uint32, readC bool, acc *float32, mode int)

//go:noescape
func packTranspose(dst *uint32, w int, src *float32, ld, lines, pairs int)

// packRowsNative is packBF16's full k-pairs for k along the stored rows: 16 lines by
// 16 pairs at a time, transposed in registers.
func packRowsNative(dst []uint32, w int, x []float32, ld, r0, count, k int) {
	pairs := k / 2
	if pairs == 0 {
		return
	}
	_ = dst[pairs*w-1]
	for g := 0; g < w; g += 16 {
		lines := min(16, max(0, count-g))
		if lines == 0 {
			for p := range pairs {
				clear(dst[p*w+g : p*w+min(w, g+16)])
			}
			continue
		}
		_ = x[(r0+g+lines-1)*ld+2*pairs-1]
		packTranspose(&dst[g], w, &x[(r0+g)*ld], ld, lines, pairs)
	}
}

//go:noescape
func packPairRow(dst *uint32, panel, half int, src0, src1 *float32, lines, cw, chunks int)

// packColsNative is packCols on AVX-512: a row pair at a time across every panel, so
// the operand is read in the order it is stored.
func packColsNative(dst []uint32, w, kp int, x []float32, ld, count, p0, p1 int) {
	if p0 >= p1 {
		return
	}
	cw, half := 12, 0
	switch w {
	case 12:
	case 32:
		cw, half = 16, 64
	default:
		panic("bf16: no native packer for panels of width other than 12 or 32")
	}
	panels := (count + w - 1) / w
	_ = dst[(panels-1)*kp*w+p1*w-1]
	_ = x[(2*p1-1)*ld+count-1]
	for p := p0; p < p1; p++ {
		packPairRow(&dst[p*w], 4*kp*w, half, &x[2*p*ld], &x[(2*p+1)*ld], count, cw, panels*w/cw)
	}
}
