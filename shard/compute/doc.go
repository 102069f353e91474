// Package compute is the seam between a stage's layers and the hardware: the few
// operations a stage needs (matrix multiply, a parallel loop, a fast exp) over flat
// row-major float32 buffers. The default build multiplies with OpenBLAS through
// gonum's BLAS interface (gonum.org/v1/netlib, cgo); building with CGO_ENABLED=0 or
// the purego tag uses gonum's pure-Go BLAS instead. A GPU backend would replace this
// package and nothing above it.
package compute
