//go:build !amd64 || purego

package bf16

// best is the Go emulation of AVX512-BF16: this build has no assembly kernels.
const best = isaGeneric

func dpbf16TileFMA(kp int, a, b *uint32, c *float32, ldc int, alpha, beta float32, rows int, cols uint32, readC bool, acc *float32, mode int) {
	panic("compute: no AVX-512 kernel in this build")
}

func dpbf16Tile(kp int, a, b *uint32, c *float32, ldc int, alpha, beta float32, rows int, cols uint32, readC bool, acc *float32, mode int) {
	panic("compute: no AVX512-BF16 kernel in this build")
}

func packRowsNative(dst []uint32, w int, x []float32, ld, r0, count, k int) {
	panic("compute: no AVX512-BF16 kernel in this build")
}

func packColsNative(dst []uint32, w, kp int, x []float32, ld, count, p0, p1 int) {
	panic("compute: no AVX512-BF16 kernel in this build")
}
