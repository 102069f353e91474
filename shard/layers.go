package shard

import (
	"math"

	"github.com/pipeswarm/pipeswarm/shard/compute"
)

// Layer kernels. Shapes are given as [rows, cols], row-major; N = batch·seq tokens.

// rmsnormForward: out[N,d] = w[d] · x[N,d] / sqrt(mean(x²) + eps); rstd[N] saved.
func rmsnormForward(out, rstd, x, w []float32, n, d int, eps float32) {
	compute.ParallelFor(n, func(lo, hi int) {
		for i := lo; i < hi; i++ {
			xr := x[i*d : (i+1)*d]
			var ss float32
			for _, v := range xr {
				ss += v * v
			}
			r := float32(1 / math.Sqrt(float64(ss/float32(d)+eps)))
			rstd[i] = r
			or := out[i*d : (i+1)*d]
			for j, v := range xr {
				or[j] = w[j] * (v * r)
			}
		}
	})
}

// rmsnormBackward: dx[N,d] += ∂L/∂x, dw[d] += ∂L/∂w, given dout[N,d] and the saved
// x, rstd. With y = w·x·r, r = (mean(x²)+eps)^-½:
// ∂L/∂x_j = r·w_j·dy_j − r³/d · x_j · Σ_i w_i·dy_i·x_i.
func rmsnormBackward(dx, dw, dout, x, rstd, w []float32, n, d int) {
	for i := range n {
		xr, dr, dxr := x[i*d:(i+1)*d], dout[i*d:(i+1)*d], dx[i*d:(i+1)*d]
		r := rstd[i]
		var dot float32
		for j, v := range xr {
			g := dr[j]
			dot += w[j] * g * v
			dw[j] += g * v * r
		}
		c := r * r * r * dot / float32(d)
		for j, v := range xr {
			dxr[j] += r*w[j]*dr[j] - c*v
		}
	}
}

// linearForward: y[N,out] = x[N,in] · Wᵀ, W[out,in].
func linearForward(y, x, w []float32, n, in, out int) {
	compute.Gemm(false, true, n, out, in, 1, x, in, w, in, 0, y, out)
}

// linearBackward: dW[out,in] += dyᵀ·x; dx[N,in] = dy·W (+ dx if accumulate).
func linearBackward(dx, dw, dy, x, w []float32, n, in, out int, accumulate bool) {
	compute.Gemm(true, false, out, in, n, 1, dy, out, x, in, 1, dw, in)
	var beta float32
	if accumulate {
		beta = 1
	}
	compute.Gemm(false, false, n, in, out, 1, dy, out, w, in, beta, dx, in)
}

// ropeTables returns cos and sin [T, hd/2] for positions 0..T-1, as Hugging Face's
// LlamaRotaryEmbedding computes them (inv_freq_i = theta^(-2i/hd)).
func ropeTables(seqLen, headDim int, theta float64) (cos, sin []float32) {
	h := headDim / 2
	cos, sin = make([]float32, seqLen*h), make([]float32, seqLen*h)
	for i := range h {
		inv := float64(float32(1 / math.Pow(theta, float64(2*i)/float64(headDim))))
		for t := range seqLen {
			a := float64(float32(float64(t) * inv))
			cos[t*h+i], sin[t*h+i] = float32(math.Cos(a)), float32(math.Sin(a))
		}
	}
	return cos, sin
}

// ropeApply rotates the q and k parts of qkv[N, 3d] in place, in Llama's rotate_half
// convention: for i < hd/2, (x_i, x_{i+hd/2}) ← (x_i·c − x_{i+hd/2}·s, x_{i+hd/2}·c + x_i·s).
// sign = −1 applies the inverse rotation, which is the backward pass (it is orthogonal).
func ropeApply(qkv, cos, sin []float32, n, seqLen, nHeads, headDim int, sign float32) {
	d := nHeads * headDim
	h := headDim / 2
	compute.ParallelFor(n, func(lo, hi int) {
		for r := lo; r < hi; r++ {
			t := r % seqLen
			c, s := cos[t*h:(t+1)*h], sin[t*h:(t+1)*h]
			row := qkv[r*3*d : r*3*d+2*d] // q then k
			for hd := 0; hd < 2*nHeads; hd++ {
				x := row[hd*headDim : (hd+1)*headDim]
				x1, x2 := x[:h], x[h:]
				for i := range h {
					a, b := x1[i], x2[i]
					si := sign * s[i]
					x1[i] = a*c[i] - b*si
					x2[i] = b*c[i] + a*si
				}
			}
		}
	})
}

// attentionForward: causal softmax attention per (batch, head).
// qkv[N,3d] holds roped q | k | v; p[B·H, T, T] receives the attention probabilities
// (zero above the diagonal); att[N,d] receives the heads' outputs side by side.
func attentionForward(att, p, qkv []float32, b, t, nHeads, headDim int) {
	d := nHeads * headDim
	scale := float32(1 / math.Sqrt(float64(headDim)))
	compute.ParallelFor(b*nHeads, func(lo, hi int) {
		for bh := lo; bh < hi; bh++ {
			bi, h := bh/nHeads, bh%nHeads
			base := bi * t * 3 * d
			q, k, v := qkv[base+h*headDim:], qkv[base+d+h*headDim:], qkv[base+2*d+h*headDim:]
			s := p[bh*t*t : (bh+1)*t*t]
			compute.Sgemm(false, true, t, t, headDim, scale, q, 3*d, k, 3*d, 0, s, t)
			for i := range t {
				causalSoftmaxRow(s[i*t:(i+1)*t], i+1)
			}
			compute.Sgemm(false, false, t, headDim, t, 1, s, t, v, 3*d, 0, att[bi*t*d+h*headDim:], d)
		}
	})
}

// causalSoftmaxRow replaces row[:n] by its softmax and zeroes row[n:].
func causalSoftmaxRow(row []float32, n int) {
	m := row[0]
	for _, v := range row[1:n] {
		m = max(m, v)
	}
	var sum float32
	for j := range n {
		e := compute.Exp(row[j] - m)
		row[j] = e
		sum += e
	}
	inv := 1 / sum
	for j := range n {
		row[j] *= inv
	}
	clear(row[n:])
}

// attentionBackward: given datt[N,d], writes dqkv[N,3d] (gradient w.r.t. the roped q,
// k and v) from the saved p and qkv.
func attentionBackward(dqkv, datt, p, qkv []float32, b, t, nHeads, headDim int) {
	d := nHeads * headDim
	scale := float32(1 / math.Sqrt(float64(headDim)))
	compute.ParallelFor(b*nHeads, func(lo, hi int) {
		dp := make([]float32, t*t)
		for bh := lo; bh < hi; bh++ {
			bi, h := bh/nHeads, bh%nHeads
			base := bi * t * 3 * d
			q, k, v := qkv[base+h*headDim:], qkv[base+d+h*headDim:], qkv[base+2*d+h*headDim:]
			dq, dk, dv := dqkv[base+h*headDim:], dqkv[base+d+h*headDim:], dqkv[base+2*d+h*headDim:]
			do := datt[bi*t*d+h*headDim:]
			s := p[bh*t*t : (bh+1)*t*t]
			// dV = Pᵀ·dO, dP = dO·Vᵀ
			compute.Sgemm(true, false, t, headDim, t, 1, s, t, do, d, 0, dv, 3*d)
			compute.Sgemm(false, true, t, t, headDim, 1, do, d, v, 3*d, 0, dp, t)
			// dS = P ⊙ (dP − rowsum(dP ⊙ P)), times the score scale.
			for i := range t {
				pr, dr := s[i*t:i*t+i+1], dp[i*t:(i+1)*t]
				var dot float32
				for j, pv := range pr {
					dot += pv * dr[j]
				}
				for j, pv := range pr {
					dr[j] = scale * pv * (dr[j] - dot)
				}
				clear(dr[i+1:])
			}
			// dQ = dS·K, dK = dSᵀ·Q
			compute.Sgemm(false, false, t, headDim, t, 1, dp, t, k, 3*d, 0, dq, 3*d)
			compute.Sgemm(true, false, t, headDim, t, 1, dp, t, q, 3*d, 0, dk, 3*d)
		}
	})
}

// swigluForward: m[N,F] = silu(g)·u where gu[N,2F] holds gate | up per row.
func swigluForward(m, gu []float32, n, f int) {
	compute.ParallelFor(n, func(lo, hi int) {
		for r := lo; r < hi; r++ {
			g, u, mr := gu[r*2*f:r*2*f+f], gu[r*2*f+f:(r+1)*2*f], m[r*f:(r+1)*f]
			for j, gv := range g {
				mr[j] = gv / (1 + compute.Exp(-gv)) * u[j]
			}
		}
	})
}

// swigluBackward: dgu[N,2F] from dm[N,F] and the saved gu.
// silu(g) = g·σ(g), silu'(g) = σ(g)·(1 + g·(1 − σ(g))).
func swigluBackward(dgu, dm, gu []float32, n, f int) {
	compute.ParallelFor(n, func(lo, hi int) {
		for r := lo; r < hi; r++ {
			g, u, dmr := gu[r*2*f:r*2*f+f], gu[r*2*f+f:(r+1)*2*f], dm[r*f:(r+1)*f]
			dg, du := dgu[r*2*f:r*2*f+f], dgu[r*2*f+f:(r+1)*2*f]
			for j, gv := range g {
				sg := 1 / (1 + compute.Exp(-gv))
				du[j] = dmr[j] * gv * sg
				dg[j] = dmr[j] * u[j] * sg * (1 + gv*(1-sg))
			}
		}
	})
}

// embedForward: x[N,d] = E[tokens[n]].
func embedForward(x, e []float32, tokens []int32, d int) {
	for n, tok := range tokens {
		copy(x[n*d:(n+1)*d], e[int(tok)*d:(int(tok)+1)*d])
	}
}

// embedBackward: dE[tokens[n]] += dx[n].
func embedBackward(de, dx []float32, tokens []int32, d int) {
	for n, tok := range tokens {
		row := de[int(tok)*d : (int(tok)+1)*d]
		for j, g := range dx[n*d : (n+1)*d] {
			row[j] += g
		}
	}
}

// crossEntropy returns the mean over N rows of −log softmax(logits)[target] and
// overwrites logits[N,V] with its gradient times scale: (softmax − onehot)·scale/N.
func crossEntropy(logits []float32, targets []int32, v int, scale float32) float64 {
	n := len(targets)
	g := scale / float32(n)
	// One loss per row, summed in row order afterwards: the result does not depend on
	// how many workers split the rows (a run must not change with the thread count).
	losses := make([]float64, n)
	compute.ParallelFor(n, func(lo, hi int) {
		for r := lo; r < hi; r++ {
			row := logits[r*v : (r+1)*v]
			m := row[0]
			for _, x := range row[1:] {
				m = max(m, x)
			}
			tgt := targets[r]
			xt := row[tgt] - m
			var z float32
			for j, x := range row {
				e := compute.Exp(x - m)
				row[j] = e
				z += e
			}
			losses[r] = math.Log(float64(z)) - float64(xt)
			inv := g / z
			for j := range row {
				row[j] *= inv
			}
			row[tgt] -= g
		}
	})
	var total float64
	for _, l := range losses {
		total += l
	}
	return total / float64(n)
}
