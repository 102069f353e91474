//go:build !purego

package kernels

import "golang.org/x/sys/cpu"

//go:noescape
func expAVX512(dst, src *float32, n int)

//go:noescape
func swigluAVX512(m, gate, u *float32, n int)

//go:noescape
func swigluBackwardAVX512(dg, du, dm, gate, u *float32, n int)

//go:noescape
func maxAVX512(x *float32, n int) float32

//go:noescape
func expSubSumAVX512(x *float32, n int, m float32, part *float32)

//go:noescape
func scaleAVX512(x *float32, n int, s float32)

//go:noescape
func dotAVX512(a, b *float32, n int, part *float32)

//go:noescape
func softmaxGradAVX512(dp, p *float32, n int, scale, dot float32)

//go:noescape
func rmsScaleAVX512(out, w, x *float32, n int, r float32)

//go:noescape
func rmsBackwardDotAVX512(dw, w, gr, x *float32, n int, r float32, part *float32)

//go:noescape
func rmsBackwardDxAVX512(dx, w, gr, x *float32, n int, r, c float32)

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

// The kernels below take whole blocks of 16 (the callers slice them so) and report
// whether they ran.

func maxVec(x []float32) (float32, bool) {
	if !vecAVX512 || len(x) == 0 {
		return 0, false
	}
	return maxAVX512(&x[0], len(x)), true
}

func expSubSumVec(x []float32, m float32, part *[16]float32) bool {
	if !vecAVX512 || len(x) == 0 {
		return false
	}
	expSubSumAVX512(&x[0], len(x), m, &part[0])
	return true
}

func scaleVec(x []float32, s float32) bool {
	if !vecAVX512 || len(x) == 0 {
		return false
	}
	scaleAVX512(&x[0], len(x), s)
	return true
}

func dotVec(a, b []float32, part *[16]float32) bool {
	if !vecAVX512 || len(a) == 0 {
		return false
	}
	dotAVX512(&a[0], &b[0], len(a), &part[0])
	return true
}

func softmaxGradVec(dp, p []float32, scale, dot float32) bool {
	if !vecAVX512 || len(dp) == 0 {
		return false
	}
	softmaxGradAVX512(&dp[0], &p[0], len(dp), scale, dot)
	return true
}

func rmsScaleVec(out, w, x []float32, r float32) bool {
	if !vecAVX512 || len(out) == 0 {
		return false
	}
	rmsScaleAVX512(&out[0], &w[0], &x[0], len(out), r)
	return true
}

func rmsBackwardDotVec(dw, w, g, x []float32, r float32, part *[16]float32) bool {
	if !vecAVX512 || len(dw) == 0 {
		return false
	}
	rmsBackwardDotAVX512(&dw[0], &w[0], &g[0], &x[0], len(dw), r, &part[0])
	return true
}

func rmsBackwardDxVec(dx, w, g, x []float32, r, c float32) bool {
	if !vecAVX512 || len(dx) == 0 {
		return false
	}
	rmsBackwardDxAVX512(&dx[0], &w[0], &g[0], &x[0], len(dx), r, c)
	return true
}
