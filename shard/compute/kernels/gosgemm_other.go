//go:build !amd64 || purego

package kernels

func bestKernel() microKernel { return genericKernel }

// kernels lists every micro-kernel this CPU can run, best first.
func kernels() []microKernel { return []microKernel{genericKernel} }
