// Package compute holds the host primitives the CPU backends (shard/backend) and the
// subspace projections build on: matrix multiply in fixed blocks (Blocks), a parallel
// loop, a fast exp, over flat row-major float32 buffers. The default build multiplies
// with OpenBLAS through gonum's BLAS interface (gonum.org/v1/netlib, cgo); building
// with CGO_ENABLED=0 or the purego tag uses pipeswarm's own kernels (GoSgemm, package
// kernels) instead.
package compute
