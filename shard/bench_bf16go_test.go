package shard

import (
	"math"
	"reflect"
	"testing"

	"github.com/pipeswarm/pipeswarm/shard/backend"
	"github.com/pipeswarm/pipeswarm/shard/compute"
)

// goBF16 is the bf16 backend with its GEMMs on compute.GoSgemmBF16 (pipeswarm's own
// bf16 kernels) instead of oneDNN, for measuring them in a block step before the
// backend package offers them: cpu32's host kernels, the projections on
// compute.GemmBF16, attention as the backend computes it (a copy, with
// the per-head GEMMs on GoSgemmBF16).
type goBF16 struct{ backend.Backend }

func (goBF16) Name() string { return "bf16" }

func (goBF16) Describe() string {
	return "bf16 GEMM inputs, float32 accumulation; Go kernels " + compute.GoBF16ISA()
}

// hostBuf is the storage of cpu32's buffer b (a []float32 under another name).
func hostBuf(b backend.Buf) []float32 {
	return reflect.ValueOf(b).Convert(reflect.TypeFor[[]float32]()).Interface().([]float32)
}

func (goBF16) Linear(y, x, w backend.Buf, n, in, out int) {
	gemmBF16(false, true, n, out, in, 1, hostBuf(x), in, hostBuf(w), in, 0, hostBuf(y), out)
}

func (goBF16) LinearBackward(dx, dw, dy, x, w backend.Buf, n, in, out int, accumulate bool) {
	gemmBF16(true, false, out, in, n, 1, hostBuf(dy), out, hostBuf(x), in, 1, hostBuf(dw), in)
	var beta float32
	if accumulate {
		beta = 1
	}
	gemmBF16(false, false, n, in, out, 1, hostBuf(dy), out, hostBuf(w), in, beta, hostBuf(dx), in)
}

func (goBF16) Attention(att, p, qkv backend.Buf, b, t, nHeads, headDim int) {
	attAtt, pp, q3 := hostBuf(att), hostBuf(p), hostBuf(qkv)
	d := nHeads * headDim
	scale := float32(1 / math.Sqrt(float64(headDim)))
	compute.ParallelFor(b*nHeads, func(lo, hi int) {
		for bh := lo; bh < hi; bh++ {
			bi, h := bh/nHeads, bh%nHeads
			base := bi * t * 3 * d
			q, k, v := q3[base+h*headDim:], q3[base+d+h*headDim:], q3[base+2*d+h*headDim:]
			s := pp[bh*t*t : (bh+1)*t*t]
			compute.GoSgemmBF16(false, true, t, t, headDim, scale, q, 3*d, k, 3*d, 0, s, t)
			for i := range t {
				causalSoftmaxRowBench(s[i*t:(i+1)*t], i+1)
			}
			compute.GoSgemmBF16(false, false, t, headDim, t, 1, s, t, v, 3*d, 0, attAtt[bi*t*d+h*headDim:], d)
		}
	})
}

func causalSoftmaxRowBench(row []float32, n int) {
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

func (goBF16) AttentionBackward(dqkv, datt, p, qkv backend.Buf, b, t, nHeads, headDim int) {
	dq3, dat, pp, q3 := hostBuf(dqkv), hostBuf(datt), hostBuf(p), hostBuf(qkv)
	d := nHeads * headDim
	scale := float32(1 / math.Sqrt(float64(headDim)))
	compute.ParallelFor(b*nHeads, func(lo, hi int) {
		dp := make([]float32, t*t)
		for bh := lo; bh < hi; bh++ {
			bi, h := bh/nHeads, bh%nHeads
			base := bi * t * 3 * d
			q, k, v := q3[base+h*headDim:], q3[base+d+h*headDim:], q3[base+2*d+h*headDim:]
			dq, dk, dv := dq3[base+h*headDim:], dq3[base+d+h*headDim:], dq3[base+2*d+h*headDim:]
			do := dat[bi*t*d+h*headDim:]
			s := pp[bh*t*t : (bh+1)*t*t]
			compute.GoSgemmBF16(true, false, t, headDim, t, 1, s, t, do, d, 0, dv, 3*d)
			compute.GoSgemmBF16(false, true, t, t, headDim, 1, do, d, v, 3*d, 0, dp, t)
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
			compute.GoSgemmBF16(false, false, t, headDim, t, 1, dp, t, k, 3*d, 0, dq, 3*d)
			compute.GoSgemmBF16(true, false, t, headDim, t, 1, dp, t, q, 3*d, 0, dk, 3*d)
		}
	})
}

// BenchmarkBlockTrainStepGoBF16 is BenchmarkBlockTrainStep's bf16 arm with the GEMMs on
// pipeswarm's own bf16 kernels.
func BenchmarkBlockTrainStepGoBF16(b *testing.B) {
	benchBlockTrainStepOn(b, goBF16{backend.CPU32()})
}

// gemmBF16 is the bf16 GEMM spread over the workers.
var gemmBF16 = compute.GemmBF16
