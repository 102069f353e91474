package compute

import "github.com/pipeswarm/pipeswarm/shard/compute/bf16"

// GoSgemmBF16 is Sgemm with the inputs rounded to bfloat16 and float32 accumulation,
// on pipeswarm's own kernels (AVX512-BF16 where the CPU has it, a Go emulation giving
// the same bits elsewhere): c = alpha·op(a)·op(b) + beta·c on the calling goroutine,
// row-major; with beta 0, c is not read. Results are the same on every call and every
// CPU; bf16.Sgemm says exactly what is computed.
func GoSgemmBF16(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	bf16.Sgemm(transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

// GemmBF16 is GoSgemmBF16 spread over Workers() goroutines (inline when the product is
// small), with the same result bit for bit whatever the number of workers: each
// operand is rounded and packed once, its panels shared out, then the tiles of c,
// and every element of c is computed alone the same way whoever computes it.
func GemmBF16(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	if 2*m*n*k < minSplitFlops {
		bf16.Sgemm(transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
		return
	}
	bf16.Gemm(ParallelFor, transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

// GoBF16ISA names what GoSgemmBF16 runs on: "avx512bf16", or "generic" (the Go
// emulation, far slower).
func GoBF16ISA() string { return bf16.ISA() }
