// Package compute holds the host primitives the CPU backends (shard/backend) and the
// subspace projections build on: matrix multiply in fixed blocks (Blocks, GemmWith)
// with pipeswarm's own kernels (GoSgemm, package kernels; GoSgemmBF16, package bf16),
// a parallel loop, a fast exp, over flat row-major float32 buffers. Libraries found
// at run time (oneDNN, OpenBLAS) plug their kernels in through shard/backend; this
// package needs none of them.
package compute
