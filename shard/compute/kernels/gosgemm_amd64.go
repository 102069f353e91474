//go:build !purego

package kernels

import "golang.org/x/sys/cpu"

// The assembly kernels (gosgemm_amd64.s) take raw pointers; the wrappers check that
// the slices hold the whole tile and panels first.

//go:noescape
func sgemmKernel12x32AVX512(k int, a, b, c *float32, ldc int, alpha float32, load int)

//go:noescape
func sgemmKernel6x16AVX2(k int, a, b, c *float32, ldc int, alpha float32, load int)

var (
	avx512Kernel = microKernel{isa: "avx512", mr: 12, nr: 32, fn: kernelAVX512}
	avx2Kernel   = microKernel{isa: "avx2", mr: 6, nr: 16, fn: kernelAVX2}
)

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
