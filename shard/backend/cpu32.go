package backend

import (
	"fmt"
	"math"
	"unsafe"

	"github.com/pipeswarm/pipeswarm/shard/compute"
	"github.com/pipeswarm/pipeswarm/shard/compute/kernels"
)

// host is a Buf in main memory: what both CPU backends use.
type host []float32

func (h host) Len() int { return len(h) }

// hostOf is b's storage; a Buf from another backend is a programmer error.
func hostOf(b Buf) []float32 {
	h, ok := b.(host)
	if !ok {
		panic(fmt.Sprintf("backend: a %T is not a host buffer", b))
	}
	return h
}

// hostMemory is the memory management both CPU backends share.
type hostMemory struct{}

func (hostMemory) Alloc(n int) Buf            { return host(make([]float32, n)) }
func (hostMemory) Mirror(h []float32) Buf     { return host(h) }
func (hostMemory) View(b Buf, off, n int) Buf { return host(hostOf(b)[off : off+n : off+n]) }
func (hostMemory) Zero(b Buf)                 { clear(hostOf(b)) }

func (hostMemory) Upload(dst Buf, src []float32) {
	d := hostOf(dst)
	if len(src) > len(d) {
		panic(fmt.Sprintf("backend: upload of %d values into %d", len(src), len(d)))
	}
	if len(src) > 0 && unsafe.SliceData(d) == unsafe.SliceData(src) {
		return // a mirror of src itself
	}
	copy(d, src)
}

func (hostMemory) Download(dst []float32, src Buf) {
	s := hostOf(src)
	if len(dst) > len(s) {
		panic(fmt.Sprintf("backend: download of %d values from %d", len(dst), len(s)))
	}
	if len(dst) > 0 && unsafe.SliceData(s) == unsafe.SliceData(dst) {
		return
	}
	copy(dst, s)
}

// cpu32 computes everything in float32 on the host, its GEMMs with a provider
// (gemm.go) in compute.Blocks's fixed blocks.
type cpu32 struct {
	hostMemory
	g *GEMM
}

// CPU32 is the float32 host backend with the process's GEMM provider (SetGEMM).
func CPU32() Backend {
	g, err := OpenGEMM(processGEMM())
	if err != nil { // SetGEMM only takes a provider that opened
		panic(fmt.Sprintf("backend: %v", err))
	}
	return cpu32{g: g}
}

func (cpu32) Name() string       { return "cpu32" }
func (cpu32) Precision() string  { return "fp32" }
func (b cpu32) GEMM() *GEMM      { return b.g }
func (b cpu32) Describe() string { return "float32, GEMM " + b.g.Describe() }

func (b cpu32) Linear(y, x, w Buf, n, in, out int) {
	compute.GemmWith(b.g.sgemm, false, true, n, out, in, 1, hostOf(x), in, hostOf(w), in, 0, hostOf(y), out)
}

func (b cpu32) LinearBackward(dx, dw, dy, x, w Buf, n, in, out int, accumulate bool) {
	compute.GemmWith(b.g.sgemm, true, false, out, in, n, 1, hostOf(dy), out, hostOf(x), in, 1, hostOf(dw), in)
	var beta float32
	if accumulate {
		beta = 1
	}
	compute.GemmWith(b.g.sgemm, false, false, n, in, out, 1, hostOf(dy), out, hostOf(w), in, beta, hostOf(dx), in)
}

func (b cpu32) Attention(att, p, qkv Buf, bt, t, nHeads, headDim int) {
	attention(hostOf(att), hostOf(p), hostOf(qkv), bt, t, nHeads, headDim, b.g.sgemm)
}

func (b cpu32) AttentionBackward(dqkv, datt, p, qkv Buf, bt, t, nHeads, headDim int) {
	attentionBackward(hostOf(dqkv), hostOf(datt), hostOf(p), hostOf(qkv), bt, t, nHeads, headDim, b.g.sgemm)
}

// sgemm is a single-threaded row-major GEMM; the attention kernels take one so each
// backend can bring its own.
type sgemm = compute.SgemmFunc

// The host kernels below are shared by both CPU backends: float32 is the precision
// of norms, RoPE, softmax, SwiGLU and the loss in either.

func (hostMemory) RMSNorm(out, rstd, x, w Buf, n, d int, eps float32) {
	rmsnorm(hostOf(out), hostOf(rstd), hostOf(x), hostOf(w), n, d, eps)
}

func (hostMemory) RMSNormBackward(dx, dw, dout, x, rstd, w Buf, n, d int) {
	rmsnormBackward(hostOf(dx), hostOf(dw), hostOf(dout), hostOf(x), hostOf(rstd), hostOf(w), n, d)
}

func (hostMemory) RoPE(qkv, cos, sin Buf, n, seqLen, nHeads, headDim int, inverse bool) {
	sign := float32(1)
	if inverse {
		sign = -1
	}
	rope(hostOf(qkv), hostOf(cos), hostOf(sin), n, seqLen, nHeads, headDim, sign)
}

func (hostMemory) SwiGLU(m, gu Buf, n, f int) { swiglu(hostOf(m), hostOf(gu), n, f) }

func (hostMemory) SwiGLUBackward(dgu, dm, gu Buf, n, f int) {
	swigluBackward(hostOf(dgu), hostOf(dm), hostOf(gu), n, f)
}

func (hostMemory) Embed(x, table Buf, tokens []int32, d int) {
	xs, e := hostOf(x), hostOf(table)
	for i, tok := range tokens {
		copy(xs[i*d:(i+1)*d], e[int(tok)*d:(int(tok)+1)*d])
	}
}

func (hostMemory) EmbedBackward(dtable, dx Buf, tokens []int32, d int) {
	de, g := hostOf(dtable), hostOf(dx)
	for i, tok := range tokens {
		row := de[int(tok)*d : (int(tok)+1)*d]
		for j, v := range g[i*d : (i+1)*d] {
			row[j] += v
		}
	}
}

func (hostMemory) CrossEntropy(logits Buf, targets []int32, v int, scale float32) float64 {
	return crossEntropy(hostOf(logits), targets, v, scale)
}

func (hostMemory) ProjectCols(w, u, t Buf, d, k, cols int) {
	wh, uh, th := hostOf(w), hostOf(u), hostOf(t)[:k*cols]
	compute.Gemm(true, false, k, cols, d, 1, uh, k, wh, cols, 0, th, cols)
	compute.Gemm(false, false, d, cols, k, 1, uh, k, th, cols, 0, wh, cols)
}

func (hostMemory) ProjectRows(e, base, u, t Buf, rows, d, k int) {
	eh, uh, th := hostOf(e), hostOf(u), hostOf(t)[:rows*k]
	var bh []float32
	if base != nil {
		bh = hostOf(base)
		for i := range eh {
			eh[i] -= bh[i]
		}
	}
	compute.Gemm(false, false, rows, k, d, 1, eh, d, uh, k, 0, th, k)
	compute.Gemm(false, true, rows, d, k, 1, th, k, uh, k, 0, eh, d)
	for i, b := range bh {
		eh[i] += b
	}
}

func (hostMemory) Add(dst, src Buf) {
	d, s := hostOf(dst), hostOf(src)
	compute.ParallelFor(len(s), func(lo, hi int) {
		for i := lo; i < hi; i++ {
			d[i] += s[i]
		}
	})
}

// rmsnorm: out[N,d] = w[d] · x[N,d] / sqrt(mean(x²) + eps); rstd[N] saved.
func rmsnorm(out, rstd, x, w []float32, n, d int, eps float32) {
	compute.ParallelFor(n, func(lo, hi int) {
		for i := lo; i < hi; i++ {
			xr := x[i*d : (i+1)*d]
			ss := kernels.Dot(xr, xr)
			r := float32(1 / math.Sqrt(float64(ss/float32(d)+eps)))
			rstd[i] = r
			kernels.RMSScale(out[i*d:(i+1)*d], w, xr, r)
		}
	})
}

// rmsnormBackward, with y = w·x·r, r = (mean(x²)+eps)^-½:
// ∂L/∂x_j = r·w_j·dy_j − r³/d · x_j · Σ_i w_i·dy_i·x_i. It runs on one goroutine:
// dw sums over rows, and a fixed order keeps it independent of the thread count.
func rmsnormBackward(dx, dw, dout, x, rstd, w []float32, n, d int) {
	for i := range n {
		kernels.RMSNormBackwardRow(dx[i*d:(i+1)*d], dw, dout[i*d:(i+1)*d], x[i*d:(i+1)*d], w, rstd[i])
	}
}

// rope rotates the q and k parts of qkv[N, 3d] in place: for i < hd/2,
// (x_i, x_{i+hd/2}) ← (x_i·c − x_{i+hd/2}·s, x_{i+hd/2}·c + x_i·s); sign −1 inverts.
func rope(qkv, cos, sin []float32, n, seqLen, nHeads, headDim int, sign float32) {
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

// attention: causal softmax attention per (batch, head), each pair on one goroutine
// with gemm.
func attention(att, p, qkv []float32, b, t, nHeads, headDim int, gemm sgemm) {
	d := nHeads * headDim
	scale := float32(1 / math.Sqrt(float64(headDim)))
	compute.ParallelFor(b*nHeads, func(lo, hi int) {
		for bh := lo; bh < hi; bh++ {
			bi, h := bh/nHeads, bh%nHeads
			base := bi * t * 3 * d
			q, k, v := qkv[base+h*headDim:], qkv[base+d+h*headDim:], qkv[base+2*d+h*headDim:]
			s := p[bh*t*t : (bh+1)*t*t]
			gemm(false, true, t, t, headDim, scale, q, 3*d, k, 3*d, 0, s, t)
			for i := range t {
				causalSoftmaxRow(s[i*t:(i+1)*t], i+1)
			}
			gemm(false, false, t, headDim, t, 1, s, t, v, 3*d, 0, att[bi*t*d+h*headDim:], d)
		}
	})
}

// causalSoftmaxRow replaces row[:n] by its softmax and zeroes row[n:].
func causalSoftmaxRow(row []float32, n int) {
	kernels.Softmax(row[:n])
	clear(row[n:])
}

// attentionBackward: dqkv[N,3d] (w.r.t. the roped q, k and v) from datt[N,d].
func attentionBackward(dqkv, datt, p, qkv []float32, b, t, nHeads, headDim int, gemm sgemm) {
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
			gemm(true, false, t, headDim, t, 1, s, t, do, d, 0, dv, 3*d)
			gemm(false, true, t, t, headDim, 1, do, d, v, 3*d, 0, dp, t)
			// dS = P ⊙ (dP − rowsum(dP ⊙ P)), times the score scale.
			for i := range t {
				dr := dp[i*t : (i+1)*t]
				kernels.SoftmaxBackward(dr[:i+1], s[i*t:i*t+i+1], scale)
				clear(dr[i+1:])
			}
			// dQ = dS·K, dK = dSᵀ·Q
			gemm(false, false, t, headDim, t, 1, dp, t, k, 3*d, 0, dq, 3*d)
			gemm(true, false, t, headDim, t, 1, dp, t, q, 3*d, 0, dk, 3*d)
		}
	})
}

// swiglu: m[N,F] = silu(g)·u where gu[N,2F] holds gate | up per row.
func swiglu(m, gu []float32, n, f int) {
	compute.ParallelFor(n, func(lo, hi int) {
		for r := lo; r < hi; r++ {
			kernels.SwiGLU(m[r*f:(r+1)*f], gu[r*2*f:r*2*f+f], gu[r*2*f+f:(r+1)*2*f])
		}
	})
}

// swigluBackward: silu(g) = g·σ(g), silu'(g) = σ(g)·(1 + g·(1 − σ(g))).
func swigluBackward(dgu, dm, gu []float32, n, f int) {
	compute.ParallelFor(n, func(lo, hi int) {
		for r := lo; r < hi; r++ {
			kernels.SwiGLUBackward(dgu[r*2*f:r*2*f+f], dgu[r*2*f+f:(r+1)*2*f], dm[r*f:(r+1)*f], gu[r*2*f:r*2*f+f], gu[r*2*f+f:(r+1)*2*f])
		}
	})
}

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
