package backend

import (
	"fmt"
	"math"
	"sync"
	"unsafe"

	"github.com/pipeswarm/pipeswarm/shard/compute"
)

// bf16 is mixed precision as PyTorch's CPU autocast does it: the inputs of every GEMM
// (projections and attention) are rounded to bfloat16 and multiplied with float32
// accumulation into float32 outputs; norms, RoPE, softmax, SwiGLU and the loss are
// float32 (the host kernels cpu32 uses), and so are the master weights, gradients
// and everything a stage stores. With oneDNN the products are its bf16 matmul, with
// the Go kernels compute.GoSgemmBF16; with OpenBLAS the inputs are rounded to bf16
// values kept in float32 and multiplied by its float32 kernels, which is the same
// arithmetic (a product of two bf16 values is exact in float32) in another order.
type bf16 struct {
	hostMemory
	g      *GEMM
	native bool // oneDNN's bf16 matmul
	desc   string
}

func openBF16(g *GEMM) (Backend, error) {
	if g.dnnl != nil {
		// A block-sized linear shows which kernel oneDNN picks on this CPU; where it
		// has no bf16 matmul the inputs are rounded here instead.
		k := probe
		k.BF16 = true
		if mm, err := g.dnnl.Matmul(k); err == nil {
			return &bf16{g: g, native: true, desc: fmt.Sprintf("bf16 GEMM inputs, float32 accumulation; oneDNN %s bf16 matmul %s (ISA %s)",
				g.dnnl.Version, mm.Impl, g.dnnl.ISA)}, nil
		}
	}
	if g.sgemm16 != nil {
		return &bf16{g: g, desc: "bf16 GEMM inputs, float32 accumulation; pipeswarm Go kernels, " + compute.GoBF16ISA()}, nil
	}
	return &bf16{g: g, desc: "bf16 GEMM inputs rounded, float32 accumulation; GEMM " + g.Describe()}, nil
}

func (*bf16) Name() string       { return "bf16" }
func (*bf16) Precision() string  { return "bf16" }
func (b *bf16) GEMM() *GEMM      { return b.g }
func (b *bf16) Describe() string { return b.desc }

// bf16Bits is x rounded to bfloat16, nearest-even, as its 16 bits; a NaN stays a NaN.
// AVX512-BF16's vcvtneps2bf16 rounds the same way.
func bf16Bits(x float32) uint16 {
	u := math.Float32bits(x)
	if u&0x7fffffff > 0x7f800000 {
		return uint16(u>>16 | 0x40)
	}
	return uint16((u + 0x7fff + (u>>16)&1) >> 16)
}

// toBF16 rounds x[rows, cols] (row stride ld) into the contiguous dst, split over the
// workers by rows when parallel (each value is rounded alone, so the split changes
// nothing).
func toBF16(dst []uint16, x []float32, rows, cols, ld int, parallel bool) {
	conv := func(lo, hi int) {
		for r := lo; r < hi; r++ {
			d, s := dst[r*cols:(r+1)*cols], x[r*ld:r*ld+cols]
			for j, v := range s {
				d[j] = bf16Bits(v)
			}
		}
	}
	forRows(rows, cols, parallel, conv)
}

// roundBF16 is toBF16 keeping the rounded values as float32.
func roundBF16(dst, x []float32, rows, cols, ld int, parallel bool) {
	conv := func(lo, hi int) {
		for r := lo; r < hi; r++ {
			d, s := dst[r*cols:(r+1)*cols], x[r*ld:r*ld+cols]
			for j, v := range s {
				d[j] = math.Float32frombits(uint32(bf16Bits(v)) << 16)
			}
		}
	}
	forRows(rows, cols, parallel, conv)
}

func forRows(rows, cols int, parallel bool, conv func(lo, hi int)) {
	if rows == 0 || cols == 0 {
		return
	}
	if !parallel {
		conv(0, rows)
		return
	}
	compute.ParallelFor(rows, conv)
}

// Scratch copies of GEMM operands; pooled, as attention asks for small ones hundreds
// of times a step.
var (
	scratch16 = sync.Pool{New: func() any { return new([]uint16) }}
	scratch32 = sync.Pool{New: func() any { return new([]float32) }}
)

func grow[T any](p *[]T, n int) []T {
	if cap(*p) < n {
		*p = make([]T, n)
	}
	*p = (*p)[:n]
	return *p
}

// gemm is c = alpha·op(a)·op(b) + beta·c with a and b rounded to bf16, in
// compute.Blocks's fixed blocks, each one single-threaded call. parallel spreads the
// blocks over the workers (false inside a ParallelFor body).
func (be *bf16) gemm(parallel, transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	if m == 0 || n == 0 {
		return
	}
	// a is stored m×k, or k×m when transposed; it is rounded as stored into a
	// contiguous copy (rounding it into its transpose measured slower with oneDNN).
	ar, ac := m, k
	if transA {
		ar, ac = k, m
	}
	if !be.native && be.g.sgemm16 != nil {
		if parallel {
			// Each operand rounded and packed once for all the workers; every element
			// of c is computed alone, so the split changes no bit.
			compute.GemmBF16(transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
		} else {
			be.g.sgemm16(transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
		}
		return
	}
	if !be.native {
		pa, pb := scratch32.Get().(*[]float32), scratch32.Get().(*[]float32)
		defer scratch32.Put(pa)
		defer scratch32.Put(pb)
		br, bc := k, n
		if transB {
			br, bc = n, k
		}
		a32, b32 := grow(pa, ar*ac), grow(pb, br*bc)
		roundBF16(a32, a, ar, ac, lda, parallel)
		roundBF16(b32, b, br, bc, ldb, parallel)
		if parallel {
			compute.GemmWith(be.g.sgemm, transA, transB, m, n, k, alpha, a32, ac, b32, bc, beta, c, ldc)
		} else {
			be.g.sgemm(transA, transB, m, n, k, alpha, a32, ac, b32, bc, beta, c, ldc)
		}
		return
	}
	pa := scratch16.Get().(*[]uint16)
	defer scratch16.Put(pa)
	a16 := grow(pa, ar*ac)
	toBF16(a16, a, ar, ac, lda, parallel)
	// Each block's call packs (and rounds) its part of b.
	run := func(r0, rows, c0, cols int) {
		aOff := r0 * ac // row r0 of a
		if transA {
			aOff = r0 // column r0 of the stored a
		}
		bOff := c0
		if transB {
			bOff = c0 * ldb
		}
		dnnlGemm(be.g.dnnl, true, transA, transB, rows, cols, k, alpha, unsafe.Pointer(&a16[aOff]), ac, b[bOff:], ldb, beta, c[r0*ldc+c0:], ldc)
	}
	if !parallel {
		run(0, m, 0, n)
		return
	}
	compute.Blocks(m, n, k, run)
}

func (be *bf16) Linear(y, x, w Buf, n, in, out int) {
	be.gemm(true, false, true, n, out, in, 1, hostOf(x), in, hostOf(w), in, 0, hostOf(y), out)
}

func (be *bf16) LinearBackward(dx, dw, dy, x, w Buf, n, in, out int, accumulate bool) {
	be.gemm(true, true, false, out, in, n, 1, hostOf(dy), out, hostOf(x), in, 1, hostOf(dw), in)
	var beta float32
	if accumulate {
		beta = 1
	}
	be.gemm(true, false, false, n, in, out, 1, hostOf(dy), out, hostOf(w), in, beta, hostOf(dx), in)
}

// serial is gemm on the calling goroutine, for the attention kernels' per-head GEMMs.
func (be *bf16) serial(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	be.gemm(false, transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

func (be *bf16) Attention(att, p, qkv Buf, b, t, nHeads, headDim int) {
	attention(hostOf(att), hostOf(p), hostOf(qkv), b, t, nHeads, headDim, be.serial)
}

func (be *bf16) AttentionBackward(dqkv, datt, p, qkv Buf, b, t, nHeads, headDim int) {
	attentionBackward(hostOf(dqkv), hostOf(datt), hostOf(p), hostOf(qkv), b, t, nHeads, headDim, be.serial)
}
