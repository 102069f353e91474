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

// Sums over a vector (Softmax, SoftmaxBackward, Dot) take one fixed order, with
// vectors or without: 16 running lane sums over the whole blocks of 16 (lane l adds
// elements 16b+l in turn), those added pairwise (lane l to l+8, then +4, +2, +1),
// then the remaining elements in order.

// laneSum16 adds 16 lane sums pairwise.
func laneSum16(p *[16]float32) float32 {
	var s [8]float32
	for l := range 8 {
		s[l] = p[l] + p[l+8]
	}
	for l := range 4 {
		s[l] += s[l+4]
	}
	s[0], s[1] = s[0]+s[2], s[1]+s[3]
	return s[0] + s[1]
}

// Softmax replaces x by e^(x−max x)/Σ e^(x−max x).
func Softmax(x []float32) {
	if len(x) == 0 {
		return
	}
	full := len(x) &^ 15
	m, ok := maxVec(x[:full])
	if !ok {
		m = x[0]
		for _, v := range x[:full] {
			m = max(m, v)
		}
	}
	for _, v := range x[full:] {
		m = max(m, v)
	}
	var part [16]float32
	if !expSubSumVec(x[:full], m, &part) {
		for b := 0; b < full; b += 16 {
			blk := x[b : b+16]
			for l, v := range blk {
				e := Exp(v - m)
				blk[l] = e
				part[l] += e
			}
		}
	}
	sum := laneSum16(&part)
	for j := full; j < len(x); j++ {
		e := Exp(x[j] - m)
		x[j] = e
		sum += e
	}
	Scale(x, 1/sum)
}

// SoftmaxBackward sets dp[j] = scale·p[j]·(dp[j] − Σ_i p[i]·dp[i]) over len(dp): the
// gradient of softmax scores from that of their probabilities p, times scale.
func SoftmaxBackward(dp, p []float32, scale float32) {
	p = p[:len(dp)]
	dot := Dot(p, dp)
	full := len(dp) &^ 15
	if !softmaxGradVec(dp[:full], p[:full], scale, dot) {
		full = 0
	}
	for j := full; j < len(dp); j++ {
		dp[j] = scale * p[j] * (dp[j] - dot)
	}
}

// Dot is Σ a[i]·b[i] over len(a), each product rounded before it is added.
func Dot(a, b []float32) float32 {
	b = b[:len(a)]
	full := len(a) &^ 15
	var part [16]float32
	if !dotVec(a[:full], b[:full], &part) {
		for j := 0; j < full; j += 16 {
			ab, bb := a[j:j+16], b[j:j+16]
			for l := range 16 {
				part[l] += ab[l] * bb[l]
			}
		}
	}
	sum := laneSum16(&part)
	for j := full; j < len(a); j++ {
		sum += a[j] * b[j]
	}
	return sum
}

// Scale sets x[i] *= s.
func Scale(x []float32, s float32) {
	full := len(x) &^ 15
	if !scaleVec(x[:full], s) {
		full = 0
	}
	for j := full; j < len(x); j++ {
		x[j] *= s
	}
}

// RMSScale sets out[i] = w[i]·(x[i]·r) over len(out).
func RMSScale(out, w, x []float32, r float32) {
	w, x = w[:len(out)], x[:len(out)]
	full := len(out) &^ 15
	if !rmsScaleVec(out[:full], w[:full], x[:full], r) {
		full = 0
	}
	for j := full; j < len(out); j++ {
		out[j] = w[j] * (x[j] * r)
	}
}

// RMSNormBackwardRow is one row of RMSNorm's backward, y = w·x·r with
// r = (mean(x²)+eps)^-½ saved: with dot = Σ w·dy·x (in the fixed order),
// dw += dy·x·r and dx += r·w·dy − (r³·dot/d)·x, d = len(x).
func RMSNormBackwardRow(dx, dw, dy, x, w []float32, r float32) {
	d := len(x)
	dx, dw, dy, w = dx[:d], dw[:d], dy[:d], w[:d]
	full := d &^ 15
	var part [16]float32
	if !rmsBackwardDotVec(dw[:full], w[:full], dy[:full], x[:full], r, &part) {
		for b := 0; b < full; b += 16 {
			for l := range 16 {
				j := b + l
				g, v := dy[j], x[j]
				part[l] += w[j] * g * v
				dw[j] += g * v * r
			}
		}
	}
	dot := laneSum16(&part)
	for j := full; j < d; j++ {
		g, v := dy[j], x[j]
		dot += w[j] * g * v
		dw[j] += g * v * r
	}
	c := r * r * r * dot / float32(d)
	if !rmsBackwardDxVec(dx[:full], w[:full], dy[:full], x[:full], r, c) {
		full = 0
	}
	for j := full; j < d; j++ {
		dx[j] += r*w[j]*dy[j] - c*x[j]
	}
}
