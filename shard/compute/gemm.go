package compute

import (
	"runtime"
	"sync"
	"sync/atomic"
)

// minSplitFlops is the product size below which splitting a Gemm across goroutines
// costs more in scheduling than it saves.
const minSplitFlops = 1 << 20

// workers overrides GOMAXPROCS as the compute fan-out when positive.
var workers atomic.Int32

// Workers is how many goroutines ParallelFor and Gemm spread work over: SetWorkers's
// value, else GOMAXPROCS.
func Workers() int {
	if w := workers.Load(); w > 0 {
		return int(w)
	}
	return runtime.GOMAXPROCS(0)
}

// SetWorkers sets the compute fan-out for the whole process (many in-process nodes
// sharing a few cores run best with 1 each); n ≤ 0 goes back to GOMAXPROCS.
func SetWorkers(n int) { workers.Store(int32(max(n, 0))) }

// gemmParts is how many blocks a large Gemm is cut into, whatever the number of
// workers: each block is one Sgemm call of the same shape every time, so the result
// does not depend on the thread count (BLAS kernels may round differently for
// different shapes). It also caps a Gemm's parallelism at 4; measured on 2 cores,
// 4 blocks beat 8 (smaller blocks run the kernels less efficiently).
const gemmParts = 4

// SgemmFunc is a single-threaded row-major GEMM, c = alpha·op(a)·op(b) + beta·c, as
// Sgemm: the kernel a GEMM provider brings (shard/backend).
type SgemmFunc func(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int)

// Gemm computes c = alpha·op(a)·op(b) + beta·c for row-major matrices, where op(x) is x
// or xᵀ as transA/transB say, op(a) is m×k, op(b) is k×n and c is m×n; lda, ldb, ldc are
// row strides, with this package's own kernels. Large products are cut by rows (or
// columns) of c into gemmParts blocks that Workers() goroutines share.
func Gemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	GemmWith(Sgemm, transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

// GemmWith is Gemm computing each block with kernel.
func GemmWith(kernel SgemmFunc, transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	if m == 0 || n == 0 {
		return
	}
	Blocks(m, n, k, func(r0, rows, c0, cols int) {
		aOff := r0 * lda // row r0 of op(a)
		if transA {
			aOff = r0 // column r0 of a
		}
		bOff := c0 // column c0 of op(b)
		if transB {
			bOff = c0 * ldb // row c0 of b
		}
		kernel(transA, transB, rows, cols, k, alpha, a[aOff:], lda, b[bOff:], ldb, beta, c[r0*ldc+c0:], ldc)
	})
}

// Blocks cuts the product c[m,n] = op(a)[m,k]·op(b)[k,n] into the blocks every
// GEMM backend computes one call each: gemmParts blocks of rows (or of columns, when
// n > m), the same whatever the number of workers, so no result depends on the
// thread count. It runs block(r0, rows, c0, cols) for each on Workers() goroutines,
// or once for the whole of c on the caller's goroutine when the product is small.
func Blocks(m, n, k int, block func(r0, rows, c0, cols int)) {
	if 2*m*n*k < minSplitFlops {
		block(0, m, 0, n)
		return
	}
	if m >= n {
		chunk := blockOf(m)
		ParallelFor((m+chunk-1)/chunk, func(lo, hi int) {
			for p := lo; p < hi; p++ {
				r0 := p * chunk
				block(r0, min(chunk, m-r0), 0, n)
			}
		})
		return
	}
	chunk := blockOf(n)
	ParallelFor((n+chunk-1)/chunk, func(lo, hi int) {
		for p := lo; p < hi; p++ {
			c0 := p * chunk
			block(0, m, c0, min(chunk, n-c0))
		}
	})
}

// blockOf is the rows (or columns) per block when x of them are cut into gemmParts,
// a multiple of 8 so blocks start aligned for the kernels.
func blockOf(x int) int {
	return max(8, (x+gemmParts*8-1)/(gemmParts*8)*8)
}

// Sgemm is Gemm on the calling goroutine only; use it inside ParallelFor bodies.
// It multiplies with pipeswarm's own kernels (GoSgemm).
func Sgemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	if m == 0 || n == 0 {
		return
	}
	GoSgemm(transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

// ParallelFor splits [0, n) into at most Workers() contiguous chunks and runs fn on each
// concurrently, returning when all are done. Small n runs inline.
func ParallelFor(n int, fn func(lo, hi int)) {
	w := min(Workers(), n)
	if w <= 1 {
		if n > 0 {
			fn(0, n)
		}
		return
	}
	chunk := (n + w - 1) / w
	var wg sync.WaitGroup
	for lo := chunk; lo < n; lo += chunk {
		hi := min(lo+chunk, n)
		wg.Go(func() { fn(lo, hi) })
	}
	fn(0, min(chunk, n))
	wg.Wait()
}
