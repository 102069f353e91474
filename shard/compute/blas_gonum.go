//go:build !cgo || purego

package compute

// Backend names the BLAS implementation in use.
func Backend() string { return "gonum (pure Go)" }

// gonum's native Sgemm already splits large products across goroutines.
const splitGemm = false
