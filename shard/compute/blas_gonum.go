//go:build !cgo || purego

package compute

// Backend names the GEMM implementation in use.
func Backend() string { return "pipeswarm Go kernels, " + GoKernelISA() }

// splitGemm reports whether Gemm should split work across goroutines itself.
const splitGemm = true

// goKernels reports whether Sgemm runs GoSgemm rather than a linked BLAS.
const goKernels = true
