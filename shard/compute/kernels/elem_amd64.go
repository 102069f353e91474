//go:build !purego

package kernels

import "golang.org/x/sys/cpu"

//go:noescape
func expAVX512(dst, src *float32, n int)

//go:noescape
func swigluAVX512(m, gate, u *float32, n int)

//go:noescape
func swigluBackwardAVX512(dg, du, dm, gate, u *float32, n int)

// vecAVX512 says whether the element-wise kernels use AVX-512; tests turn it off to
// compare with the scalar loops.
var vecAVX512 = cpu.X86.HasAVX512F

// The vector kernels return how many leading elements they did (a multiple of 16);
// the callers' scalar loops do the rest. The slices are equally long.

func expVec(dst, src []float32) int {
	n := len(dst) &^ 15
	if !vecAVX512 || n == 0 {
		return 0
	}
	expAVX512(&dst[0], &src[0], n)
	return n
}

func swigluVec(m, g, u []float32) int {
	n := len(m) &^ 15
	if !vecAVX512 || n == 0 {
		return 0
	}
	swigluAVX512(&m[0], &g[0], &u[0], n)
	return n
}

func swigluBackwardVec(dg, du, dm, g, u []float32) int {
	n := len(dm) &^ 15
	if !vecAVX512 || n == 0 {
		return 0
	}
	swigluBackwardAVX512(&dg[0], &du[0], &dm[0], &g[0], &u[0], n)
	return n
}
