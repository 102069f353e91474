package optim

// SumSquares returns the sum of squares of g in float64, so that the partial sums
// of several buffers (or of several peers) can be added before the square root of
// a global norm.
func SumSquares(g []float32) float64 {
	// Four accumulators break the add dependency chain; float64 keeps the sum of
	// millions of terms accurate.
	var s0, s1, s2, s3 float64
	i := 0
	for ; i+4 <= len(g); i += 4 {
		x0, x1, x2, x3 := float64(g[i]), float64(g[i+1]), float64(g[i+2]), float64(g[i+3])
		s0 += x0 * x0
		s1 += x1 * x1
		s2 += x2 * x2
		s3 += x3 * x3
	}
	for ; i < len(g); i++ {
		x := float64(g[i])
		s0 += x * x
	}
	return (s0 + s1) + (s2 + s3)
}

// ClipFactor returns the factor that brings a gradient of global norm norm down to
// maxNorm, as torch.nn.utils.clip_grad_norm_ does: maxNorm/(norm+1e-6), or 1 if
// norm <= maxNorm or maxNorm <= 0 (clipping off). A NaN norm gives NaN, so a
// non-finite gradient stays visible to the caller rather than being scaled away.
func ClipFactor(norm, maxNorm float64) float32 {
	if maxNorm <= 0 || norm <= maxNorm {
		return 1
	}
	return float32(maxNorm / (norm + 1e-6))
}

// Scale multiplies g by s in place.
func Scale(g []float32, s float32) {
	for i := range g {
		g[i] *= s
	}
}
