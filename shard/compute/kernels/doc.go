// Package kernels holds pipeswarm's own CPU kernels: a single-threaded float32 GEMM
// with packing, cache blocking and micro-kernels in Go assembly (AVX-512 or AVX2+FMA
// on amd64, chosen once at start from the CPU's features; plain Go elsewhere and under
// the purego tag). They live apart from package compute because a package that uses
// cgo cannot hold Go assembly.
package kernels
