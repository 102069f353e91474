//go:build !purego

package kernels

import "golang.org/x/sys/cpu"

// The assembly kernels (gosgemm_amd64.s) take raw pointers; the wrappers check that
// the slices hold the whole tile and panels first.

//go:noescape
func sgemmKernel12x32AVX512(k int, a, b, c *float32, ldc int, alpha float32, load int)

//go:noescape
func sgemmKernel6x16AVX2(k int, a, b, c *float32, ldc int, alpha float32, load int)

//go:noescape
func transpose4x8(dst *float32, dstStride int, src *float32, srcStride int, nblk int)

//go:noescape
func packRowsAVX512Asm(dst *float32, panelStride int, src *float32, ld int, kc int, panels int, w int, full, tail uint32)

var (
	avx512Kernel = microKernel{isa: "avx512", mr: 12, nr: 32, fn: kernelAVX512, packRows: packRowsAVX512, packT: packTAVX}
	avx2Kernel   = microKernel{isa: "avx2", mr: 6, nr: 16, fn: kernelAVX2, packRows: packRowsGo, packT: packTAVX}
)

// packRowsAVX512 is packRowsGo with masked 512-bit moves.
func packRowsAVX512(dst []float32, w int, src []float32, ld, n, kc int) {
	if kc == 0 || n == 0 {
		return
	}
	panels := (n + w - 1) / w
	_, _ = dst[panels*kc*w-1], src[(kc-1)*ld+n-1]
	if w > 32 {
		panic("kernels: panel wider than 32")
	}
	tail := n - (panels-1)*w
	packRowsAVX512Asm(&dst[0], kc*w, &src[0], ld, kc, panels, w, 1<<w-1, 1<<tail-1)
}

// packTAVX is packTGo with 4×8 transposes in registers for whole groups of four rows
// and eight steps.
func packTAVX(pan []float32, w int, src []float32, ld, rows, kc int) {
	rows4, kc8 := rows&^3, kc&^7
	if kc8 > 0 && rows4 > 0 {
		_, _ = pan[(kc8-1)*w+rows4-1], src[(rows4-1)*ld+kc8-1]
		for i := 0; i < rows4; i += 4 {
			transpose4x8(&pan[i], w, &src[i*ld], ld, kc8/8)
		}
	}
	if kc8 > 0 {
		packTTail(pan, w, src, ld, rows4, rows, 0, kc8)
	}
	packTTail(pan, w, src, ld, 0, rows, kc8, kc)
}

func kernelAVX512(k int, a, b, c []float32, ldc int, alpha float32, load bool) {
	_, _, _ = a[12*k-1], b[32*k-1], c[11*ldc+31]
	sgemmKernel12x32AVX512(k, &a[0], &b[0], &c[0], ldc, alpha, b2i(load))
}

func kernelAVX2(k int, a, b, c []float32, ldc int, alpha float32, load bool) {
	_, _, _ = a[6*k-1], b[16*k-1], c[5*ldc+15]
	sgemmKernel6x16AVX2(k, &a[0], &b[0], &c[0], ldc, alpha, b2i(load))
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

func hasAVX512() bool { return cpu.X86.HasAVX512F }
func hasAVX2() bool   { return cpu.X86.HasAVX2 && cpu.X86.HasFMA }

func bestKernel() microKernel { return kernels()[0] }

// kernels lists every micro-kernel this CPU can run, best first.
func kernels() []microKernel {
	var ks []microKernel
	if hasAVX512() {
		ks = append(ks, avx512Kernel)
	}
	if hasAVX2() {
		ks = append(ks, avx2Kernel)
	}
	return append(ks, genericKernel)
}
