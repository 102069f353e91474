// Package kernels holds pipeswarm's own CPU kernels over flat float32 slices: a
// single-threaded GEMM with packing, cache blocking and micro-kernels in Go assembly
// (AVX-512 or AVX2+FMA on amd64, chosen once at start from the CPU's features; plain
// Go elsewhere and under the purego tag), and the element-wise kernels of a block
// (exp, softmax, SwiGLU, RMSNorm), AVX-512 where the CPU has it. Each vector
// element-wise kernel does its scalar loop's float32 operations in the same order, so
// the two agree bit for bit; sums take one fixed order with or without vectors. The
// package has no cgo, which Go assembly needs, and no dependency on compute, which
// wraps it.
package kernels
