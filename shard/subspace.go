package shard

import (
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"

	"github.com/pipeswarm/pipeswarm/shard/backend"
	"github.com/pipeswarm/pipeswarm/shard/compute"
)

// Subspace is the shared residual subspace of a "protocol model" (Pluralis): every
// residual-writing projection (attention o_proj, MLP down_proj) of a constrained block
// writes only inside span(U), U a d×k orthonormal basis, and the token embedding is a
// fixed table plus a part in span(U). The residual stream at a stage boundary is then
// exactly fixed[token] + U·c, so a stage sends c (k numbers per token) and the token
// ids, and the next stage rebuilds the stream; the backward pass sends Uᵀ·g.
//
// U and the fixed table are pure functions of the run seed, so every stage of every
// replica derives the same ones without a download.
//
// Compress, Expand and their gradient forms are safe for concurrent use. A stage
// projects its parameters and gradients on its backend (Stage.ProjectGrads).
type Subspace struct {
	D, K  int
	U     []float32 // [d, k], orthonormal columns
	Fixed []float32 // [vocab, d], the embedding's frozen part

	fixedU []float32 // [vocab, k] = Fixed·U, so Compress needs no scratch
}

// NewSubspace derives the basis and fixed embedding of rank k for c from seed.
func NewSubspace(c Config, k int, seed uint64) (*Subspace, error) {
	if k < 1 || k > c.DModel {
		return nil, fmt.Errorf("%w: subspace rank %d outside 1..d_model %d", ErrConfig, k, c.DModel)
	}
	d := c.DModel
	rng := seeded(seed, "pipeswarm.subspace.basis")
	// Gram–Schmidt (twice, in float64) on Gaussian columns gives an orthonormal basis
	// whose span is uniformly random.
	u := make([]float64, d*k)
	for i := range u {
		u[i] = rng.NormFloat64()
	}
	for j := range k {
		for pass := 0; pass < 2; pass++ {
			for p := range j {
				var dot float64
				for i := range d {
					dot += u[i*k+j] * u[i*k+p]
				}
				for i := range d {
					u[i*k+j] -= dot * u[i*k+p]
				}
			}
		}
		var nrm float64
		for i := range d {
			nrm += u[i*k+j] * u[i*k+j]
		}
		nrm = math.Sqrt(nrm)
		for i := range d {
			u[i*k+j] /= nrm
		}
	}
	s := &Subspace{D: d, K: k, U: make([]float32, d*k), Fixed: make([]float32, c.Vocab*d)}
	for i, v := range u {
		s.U[i] = float32(v)
	}
	frng := seeded(seed, "pipeswarm.subspace.fixed_embed")
	for i := range s.Fixed {
		s.Fixed[i] = float32(frng.NormFloat64() * 0.02) // the scale of a trained embedding's init
	}
	s.fixedU = make([]float32, c.Vocab*k)
	compute.Gemm(false, false, c.Vocab, k, d, 1, s.Fixed, d, s.U, k, 0, s.fixedU, k)
	return s, nil
}

func seeded(seed uint64, name string) *rand.Rand {
	h := fnv.New64a()
	h.Write([]byte(name))
	return rand.New(rand.NewPCG(seed, h.Sum64()))
}

// Compress: c[N,k] = Uᵀ·(x[N,d] − fixed[tokens]) = x·U − (Fixed·U)[tokens]. It uses no
// scratch, so boundaries may call it while a stage projects its parameters.
func (s *Subspace) Compress(c, x []float32, tokens []int32) {
	compute.Gemm(false, false, len(tokens), s.K, s.D, 1, x, s.D, s.U, s.K, 0, c, s.K)
	for r, tok := range tokens {
		cr, fr := c[r*s.K:(r+1)*s.K], s.fixedU[int(tok)*s.K:(int(tok)+1)*s.K]
		for j := range cr {
			cr[j] -= fr[j]
		}
	}
}

// Expand: x[N,d] = fixed[tokens] + U·c[N,k].
func (s *Subspace) Expand(x, c []float32, tokens []int32) {
	for r, tok := range tokens {
		copy(x[r*s.D:(r+1)*s.D], s.Fixed[int(tok)*s.D:(int(tok)+1)*s.D])
	}
	compute.Gemm(false, true, len(tokens), s.D, s.K, 1, c, s.K, s.U, s.K, 1, x, s.D)
}

// CompressGrad: c[N,k] = Uᵀ·g[N,d], the boundary gradient as the previous stage needs it.
func (s *Subspace) CompressGrad(c, g []float32, n int) {
	compute.Gemm(false, false, n, s.K, s.D, 1, g, s.D, s.U, s.K, 0, c, s.K)
}

// ExpandGrad: g[N,d] = U·c[N,k].
func (s *Subspace) ExpandGrad(g, c []float32, n int) {
	compute.Gemm(false, true, n, s.D, s.K, 1, c, s.K, s.U, s.K, 0, g, s.D)
}

// SetSubspace constrains the stage to sub: the embedding (first stage) and the
// residual-writing projections of every block below layer NLayers−denseTail. The
// parameters are projected at once; keep them there with ProjectGrads before and
// ProjectParams after every optimiser step.
func (s *Stage) SetSubspace(sub *Subspace, denseTail int) error {
	if sub.D != s.Config.DModel || len(sub.Fixed) != s.Config.Vocab*s.Config.DModel {
		return fmt.Errorf("%w: subspace for d=%d does not fit this model", ErrConfig, sub.D)
	}
	if denseTail < 0 || denseTail > s.Config.NLayers {
		return fmt.Errorf("%w: dense tail %d outside 0..%d", ErrConfig, denseTail, s.Config.NLayers)
	}
	if !s.Last && s.Layers.Hi > s.Config.NLayers-denseTail {
		return fmt.Errorf("%w: layers [%d,%d) of a stage that is not last fall in the dense tail of %d; its boundary could not be compressed",
			ErrConfig, s.Layers.Lo, s.Layers.Hi, denseTail)
	}
	s.Sub, s.denseTail = sub, denseTail
	be, c := s.be, s.Config
	s.sub.u = be.Mirror(sub.U)
	be.Upload(s.sub.u, sub.U)
	n := sub.K * max(c.DModel, c.DFF)
	if s.First {
		s.sub.fixed = be.Mirror(sub.Fixed)
		be.Upload(s.sub.fixed, sub.Fixed)
		n = max(n, c.Vocab*sub.K)
	}
	s.sub.t = be.Alloc(n)
	s.ProjectParams()
	return nil
}

// constrained reports whether block b's residual writes are kept in the subspace.
func (s *Stage) constrained(b blockOffsets) bool {
	return b.layer < s.Config.NLayers-s.denseTail
}

// ProjectGrads projects the gradients of the constrained parameters onto the
// subspace, so the optimiser's moments (and so its steps) see only the directions
// the parameters may move in; then a compressed boundary gradient and a full one give
// the same step.
func (s *Stage) ProjectGrads() { s.project(s.Grads, s.g, nil) }

// ProjectParams puts the constrained parameters back in the subspace after an
// optimiser step (Adam's per-coordinate scaling leaves it slightly).
func (s *Stage) ProjectParams() {
	if s.Sub != nil {
		s.project(s.Params, s.p, s.sub.fixed)
	}
}

// project puts buf (Params or Grads, host) into the subspace on the stage's backend,
// whose view of it is v; fixed is the embedding's frozen part there, or nil.
func (s *Stage) project(buf []float32, v views, fixed backend.Buf) {
	if s.Sub == nil {
		return
	}
	be, c, k := s.be, s.Config, s.Sub.K
	be.Upload(v.all, buf) // free on a host backend: all mirrors buf
	if s.First {
		be.ProjectRows(v.embed, fixed, s.sub.u, s.sub.t, c.Vocab, c.DModel, k)
	}
	for i, b := range s.lay.blocks {
		if s.constrained(b) {
			be.ProjectCols(v.blocks[i].wo, s.sub.u, s.sub.t, c.DModel, k, c.DModel)
			be.ProjectCols(v.blocks[i].down, s.sub.u, s.sub.t, c.DModel, k, c.DFF)
		}
	}
	be.Download(buf, v.all)
}
