package compute

import "github.com/pipeswarm/pipeswarm/shard/compute/kernels"

// GoSgemm is Sgemm with pipeswarm's own kernels, whatever BLAS the build links: c =
// alpha·op(a)·op(b) + beta·c on the calling goroutine, row-major. Results are the same
// on every call with the same shape, transposes and strides; with beta 0, c is not
// read.
func GoSgemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	kernels.Sgemm(transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

// GoKernelISA names the instruction set GoSgemm runs: "avx512", "avx2" or "generic".
func GoKernelISA() string { return kernels.ISA() }

// GemmPackBytes bounds the packing buffers GoSgemm holds per goroutine computing at
// once (pooled across calls).
func GemmPackBytes() int64 { return kernels.PackBytes }
