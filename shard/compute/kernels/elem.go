package kernels

// SwiGLU sets m[i] = silu(g[i])·u[i] = g[i]/(1 + e^−g[i])·u[i] over len(m); g and u
// must be as long. Vector lanes compute exactly what the scalar loop does.
func SwiGLU(m, g, u []float32) {
	g, u = g[:len(m)], u[:len(m)]
	done := swigluVec(m, g, u)
	for j := done; j < len(m); j++ {
		gv := g[j]
		m[j] = gv / (1 + Exp(-gv)) * u[j]
	}
}

// SwiGLUBackward sets, with s = σ(g) = 1/(1 + e^−g), du = dm·g·s and
// dg = dm·u·s·(1 + g·(1 − s)) (silu'(g) = s·(1 + g·(1 − s))) over len(dm).
func SwiGLUBackward(dg, du, dm, g, u []float32) {
	n := len(dm)
	dg, du, g, u = dg[:n], du[:n], g[:n], u[:n]
	done := swigluBackwardVec(dg, du, dm, g, u)
	for j := done; j < n; j++ {
		gv := g[j]
		sg := 1 / (1 + Exp(-gv))
		du[j] = dm[j] * gv * sg
		dg[j] = dm[j] * u[j] * sg * (1 + gv*(1-sg))
	}
}

// ExpTo sets dst[i] = Exp(src[i]) over len(dst).
func ExpTo(dst, src []float32) {
	src = src[:len(dst)]
	done := expVec(dst, src)
	for j := done; j < len(dst); j++ {
		dst[j] = Exp(src[j])
	}
}
