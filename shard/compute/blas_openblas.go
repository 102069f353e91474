//go:build cgo && !purego

package compute

/*
#cgo LDFLAGS: -lopenblas
void openblas_set_num_threads(int);
*/
import "C"

import (
	"gonum.org/v1/gonum/blas/blas32"
	"gonum.org/v1/netlib/blas/netlib"
)

func init() {
	// Parallelism comes from this package's own row split, so OpenBLAS's thread pool
	// would only compete with it (and busy-wait between calls on a 2-core machine).
	C.openblas_set_num_threads(1)
	blas32.Use(netlib.Implementation{})
}

// Backend names the BLAS implementation in use.
func Backend() string { return "openblas (cgo, gonum.org/v1/netlib)" }

// splitGemm reports whether Gemm should split work across goroutines itself.
const splitGemm = true

// goKernels reports whether Sgemm runs GoSgemm rather than a linked BLAS.
const goKernels = false
