package shard

import (
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/pipeswarm/pipeswarm/shard/backend"
)

// sealed wraps a backend so that its buffers are opaque to everyone else: a Buf from
// it is a sealedBuf whose contents only its own methods reach, and its mirrors are
// separate copies rather than views of host memory. A stage that did any arithmetic
// on host memory, read a buffer it was not handed back, or failed to bring Params
// and Grads in and out would then compute something else than the same stage on the
// wrapped backend. It also counts the kernels called.
type sealed struct {
	in    backend.Backend
	calls map[string]int
}

type sealedBuf struct{ b backend.Buf }

func (s sealedBuf) Len() int { return s.b.Len() }

func (s *sealed) un(b backend.Buf) backend.Buf {
	sb, ok := b.(sealedBuf)
	if !ok {
		panic("sealed backend handed a buffer it did not make")
	}
	return sb.b
}

func (s *sealed) k(name string) { s.calls[name]++ }

func (s *sealed) Name() string                   { return s.in.Name() }
func (s *sealed) Precision() string              { return s.in.Precision() }
func (s *sealed) Describe() string               { return "sealed " + s.in.Describe() }
func (s *sealed) GEMM() *backend.GEMM            { return s.in.GEMM() }
func (s *sealed) Alloc(n int) backend.Buf        { return sealedBuf{s.in.Alloc(n)} }
func (s *sealed) Mirror(h []float32) backend.Buf { return s.Alloc(len(h)) }
func (s *sealed) View(b backend.Buf, off, n int) backend.Buf {
	return sealedBuf{s.in.View(s.un(b), off, n)}
}
func (s *sealed) Upload(dst backend.Buf, src []float32)   { s.in.Upload(s.un(dst), src) }
func (s *sealed) Download(dst []float32, src backend.Buf) { s.in.Download(dst, s.un(src)) }
func (s *sealed) Zero(b backend.Buf)                      { s.in.Zero(s.un(b)) }

func (s *sealed) Linear(y, x, w backend.Buf, n, in, out int) {
	s.k("Linear")
	s.in.Linear(s.un(y), s.un(x), s.un(w), n, in, out)
}
func (s *sealed) LinearBackward(dx, dw, dy, x, w backend.Buf, n, in, out int, acc bool) {
	s.k("LinearBackward")
	s.in.LinearBackward(s.un(dx), s.un(dw), s.un(dy), s.un(x), s.un(w), n, in, out, acc)
}
func (s *sealed) RMSNorm(out, rstd, x, w backend.Buf, n, d int, eps float32) {
	s.k("RMSNorm")
	s.in.RMSNorm(s.un(out), s.un(rstd), s.un(x), s.un(w), n, d, eps)
}
func (s *sealed) RMSNormBackward(dx, dw, dout, x, rstd, w backend.Buf, n, d int) {
	s.k("RMSNormBackward")
	s.in.RMSNormBackward(s.un(dx), s.un(dw), s.un(dout), s.un(x), s.un(rstd), s.un(w), n, d)
}
func (s *sealed) RoPE(qkv, cos, sin backend.Buf, n, seqLen, nHeads, headDim int, inverse bool) {
	s.k("RoPE")
	s.in.RoPE(s.un(qkv), s.un(cos), s.un(sin), n, seqLen, nHeads, headDim, inverse)
}
func (s *sealed) Attention(att, p, qkv backend.Buf, b, t, nHeads, headDim int) {
	s.k("Attention")
	s.in.Attention(s.un(att), s.un(p), s.un(qkv), b, t, nHeads, headDim)
}
func (s *sealed) AttentionBackward(dqkv, datt, p, qkv backend.Buf, b, t, nHeads, headDim int) {
	s.k("AttentionBackward")
	s.in.AttentionBackward(s.un(dqkv), s.un(datt), s.un(p), s.un(qkv), b, t, nHeads, headDim)
}
func (s *sealed) SwiGLU(m, gu backend.Buf, n, f int) {
	s.k("SwiGLU")
	s.in.SwiGLU(s.un(m), s.un(gu), n, f)
}
func (s *sealed) SwiGLUBackward(dgu, dm, gu backend.Buf, n, f int) {
	s.k("SwiGLUBackward")
	s.in.SwiGLUBackward(s.un(dgu), s.un(dm), s.un(gu), n, f)
}
func (s *sealed) Embed(x, table backend.Buf, tokens []int32, d int) {
	s.k("Embed")
	s.in.Embed(s.un(x), s.un(table), tokens, d)
}
func (s *sealed) EmbedBackward(dtable, dx backend.Buf, tokens []int32, d int) {
	s.k("EmbedBackward")
	s.in.EmbedBackward(s.un(dtable), s.un(dx), tokens, d)
}
func (s *sealed) CrossEntropy(logits backend.Buf, targets []int32, v int, scale float32) float64 {
	s.k("CrossEntropy")
	return s.in.CrossEntropy(s.un(logits), targets, v, scale)
}
func (s *sealed) ProjectCols(w, u, t backend.Buf, d, k, cols int) {
	s.k("ProjectCols")
	s.in.ProjectCols(s.un(w), s.un(u), s.un(t), d, k, cols)
}
func (s *sealed) ProjectRows(e, base, u, t backend.Buf, rows, d, k int) {
	s.k("ProjectRows")
	if base != nil {
		base = s.un(base)
	}
	s.in.ProjectRows(s.un(e), base, s.un(u), s.un(t), rows, d, k)
}
func (s *sealed) Add(dst, src backend.Buf) {
	s.k("Add")
	s.in.Add(s.un(dst), s.un(src))
}

// stepResult is everything a pipeline of stages hands out over two accumulated
// micro-batches and a parameter change between steps.
type stepResult struct {
	losses  []float64
	outputs [][]float32 // every Forward's and Backward's result, in call order
	grads   [][]float32
}

// runPipeline runs n stages of c on be, constrained to sub if it is not nil.
func runPipeline(t *testing.T, be backend.Backend, c Config, n int, sub *Subspace) stepResult {
	t.Helper()
	stages, err := NewStages(c, n, WithBackend(be))
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(5, 5))
	b := 2
	var r stepResult
	for _, s := range stages {
		s.Init(11)
		if sub != nil {
			if err := s.SetSubspace(sub, 1); err != nil {
				t.Fatal(err)
			}
		}
	}
	for range 2 { // steps
		for _, s := range stages {
			s.ZeroGrads()
		}
		for range 2 { // micro-batches accumulate into Grads
			tokens, targets := randIDs(rng, b*c.SeqLen, c.Vocab), randIDs(rng, b*c.SeqLen, c.Vocab)
			tapes := make([]*Tape, n)
			var x []float32
			for i, s := range stages {
				tapes[i] = s.NewTape(b, c.SeqLen)
				x = s.Forward(tapes[i], tokens, x)
				r.outputs = append(r.outputs, slices.Clone(x))
			}
			r.losses = append(r.losses, stages[n-1].Loss(tapes[n-1], targets, 0.5))
			var g []float32
			for i := n - 1; i >= 0; i-- {
				g = stages[i].Backward(tapes[i], g)
				r.outputs = append(r.outputs, slices.Clone(g))
			}
		}
		for _, s := range stages {
			s.ProjectGrads()
			r.grads = append(r.grads, slices.Clone(s.Grads))
			// An optimiser-like change on the host, which the next step must see.
			for i := range s.Params {
				s.Params[i] -= 0.1 * s.Grads[i]
			}
			s.ProjectParams()
			r.grads = append(r.grads, slices.Clone(s.Params))
		}
	}
	return r
}

// A stage's forward and backward compute only through its backend: on a backend whose
// buffers nobody else can read, a split pipeline gives, bit for bit, what it gives on
// the backend it wraps, and every kernel of a stage went through the seam; so do the
// projections into a residual subspace.
func TestStagesComputeOnlyThroughTheirBackend(t *testing.T) {
	c := Config{Vocab: 13, DModel: 16, NLayers: 3, NHeads: 2, DFF: 24, SeqLen: 6, RopeTheta: 10000, NormEps: 1e-5}
	sub, err := NewSubspace(c, 4, 9)
	if err != nil {
		t.Fatal(err)
	}
	for _, be := range backends(t) {
		for _, n := range []int{1, 3} {
			for _, sub := range []*Subspace{nil, sub} {
				kernels := []string{"Linear", "LinearBackward", "RMSNorm", "RMSNormBackward", "RoPE", "Attention",
					"AttentionBackward", "SwiGLU", "SwiGLUBackward", "Embed", "EmbedBackward", "CrossEntropy", "Add"}
				if sub != nil {
					kernels = append(kernels, "ProjectCols", "ProjectRows")
				}
				sealedMatchesOpen(t, be, c, n, sub, kernels)
			}
		}
	}
}

func sealedMatchesOpen(t *testing.T, be backend.Backend, c Config, n int, sub *Subspace, kernels []string) {
	t.Helper()
	want := runPipeline(t, be, c, n, sub)
	sb := &sealed{in: be, calls: map[string]int{}}
	got := runPipeline(t, sb, c, n, sub)
	if !slices.Equal(got.losses, want.losses) {
		t.Fatalf("%s, %d stages: losses %v on the sealed backend, %v on the open one", be.Name(), n, got.losses, want.losses)
	}
	for i := range want.outputs {
		if !slices.Equal(got.outputs[i], want.outputs[i]) {
			t.Fatalf("%s, %d stages: result %d of Forward/Backward differs on the sealed backend", be.Name(), n, i)
		}
	}
	for i := range want.grads {
		if !slices.Equal(got.grads[i], want.grads[i]) {
			t.Fatalf("%s, %d stages, subspace %t: gradients or weights %d differ on the sealed backend", be.Name(), n, sub != nil, i)
		}
	}
	for _, k := range kernels {
		if sb.calls[k] == 0 {
			t.Fatalf("%s, %d stages: %s never called through the backend", be.Name(), n, k)
		}
	}
}
