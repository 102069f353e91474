//go:build amd64 && !purego

package bf16

import "golang.org/x/sys/cpu"

// bf16Native says GoSgemmBF16 runs on the AVX512-BF16 kernels (the packers need
// AVX512BW's word permutes too).
var bf16Native = cpu.X86.HasAVX512BF16 && cpu.X86.HasAVX512BW && cpu.X86.HasAVX512F

//go:noescape
func dpbf16Tile(kp int, a, b *uint32, c *float32, ldc int, alpha, beta float32, rows int, cols uint32, readC bool)

//go:noescape
func packTranspose(dst *uint32, w int, src *float32, ld, lines, pairs int)

//go:noescape
func packLoad(dst *uint32, dstStride int, src *float32, ld, lines int, width uint32, pairs int)

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

// packColsNative is packBF16's full k-pairs for k down the columns: 16 consecutive
// lines of two rows at a time.
func packColsNative(dst []uint32, w int, x []float32, ld, r0, count, k int) {
	packNative(packLoad, dst, w, x, ld, r0, count, k, 1)
}

func packNative(pack func(dst *uint32, dstStride int, src *float32, ld, lines int, width uint32, pairs int),
	dst []uint32, w int, x []float32, ld, r0, count, k, lineStep int) {
	// lineStep: 1, the lines are consecutive elements of a row.
	pairs := k / 2
	if pairs == 0 {
		return
	}
	_ = dst[pairs*w-1]
	for g := 0; g < w; g += 16 {
		width := uint32(1)<<min(16, w-g) - 1
		lines := min(16, max(0, count-g))
		src := &x[0]
		if lines > 0 {
			src = &x[(r0+g)*lineStep]
		}
		pack(&dst[g], 4*w, src, ld, lines, width, pairs)
	}
}
