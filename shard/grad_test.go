package shard

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/pipeswarm/pipeswarm/shard/backend"
	"github.com/pipeswarm/pipeswarm/shard/compute"
)

// Finite-difference checks, one per layer: each forward is reduced to a scalar
// L = Σ r·out with a fixed random r (accumulated in float64), so the analytic gradient
// of every input is what backward returns for dout = r. Every check runs on every
// backend this build has: cpu32's gradients against finite differences, and a
// reduced-precision backend's (whose loss is too coarse for finite differences)
// against cpu32's, within its precision's bound.

// bf16Tol bounds ‖g_bf16 − g_fp32‖/‖g_fp32‖ per gradient: bfloat16 keeps 8 mantissa
// bits (relative rounding 2⁻⁹ ≈ 0.2%), and a gradient passes through a few GEMMs whose
// inputs are each rounded, each adding about that much; 3% leaves room for the
// softmax and norm backwards that amplify it, and catches any wrong term (which is
// off by O(1)).
const bf16Tol = 3e-2

// backends returns every backend available in this build, cpu32 first.
func backends(t testing.TB) []backend.Backend {
	var out []backend.Backend
	for _, name := range backend.Available() {
		be, err := backend.Open(name)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, be)
	}
	return out
}

// up puts host values on be.
func up(be backend.Backend, v []float32) backend.Buf {
	b := be.Alloc(len(v))
	be.Upload(b, v)
	return b
}

// down brings a buffer back to the host.
func down(be backend.Backend, b backend.Buf) []float32 {
	v := make([]float32, b.Len())
	be.Download(v, b)
	return v
}

// relL2 is ‖got − want‖ / ‖want‖.
func relL2(got, want []float32) float64 {
	var num, den float64
	for i := range want {
		e := float64(got[i]) - float64(want[i])
		num += e * e
		den += float64(want[i]) * float64(want[i])
	}
	if den == 0 {
		return math.Sqrt(num)
	}
	return math.Sqrt(num / den)
}

// gradCase is one layer's check: run returns, on be, the loss as a function of the
// host inputs xs and the analytic gradients of the loss w.r.t. each of them.
type gradCase struct {
	names []string
	run   func(be backend.Backend) (loss func() float64, xs, grads [][]float32)
}

// checkOnEveryBackend runs c on every backend: cpu32's gradients are checked by finite
// differences, any other backend's against cpu32's within its precision's bound.
func checkOnEveryBackend(t *testing.T, c gradCase) {
	t.Helper()
	var ref [][]float32
	for _, be := range backends(t) {
		loss, xs, grads := c.run(be)
		if be.Precision() == "fp32" {
			for i, x := range xs {
				checkFD(t, be.Name()+" "+c.names[i], x, grads[i], loss)
			}
			if ref == nil {
				ref = grads
			}
			continue
		}
		for i, g := range grads {
			if e := relL2(g, ref[i]); e > bf16Tol || math.IsNaN(e) {
				t.Fatalf("%s %s: relative L2 error %.3g against cpu32, want <= %g", be.Name(), c.names[i], e, bf16Tol)
			} else {
				t.Logf("%s %s: relative L2 error %.3g against cpu32", be.Name(), c.names[i], e)
			}
		}
	}
}

func randVec(rng *rand.Rand, n int, std float64) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(rng.NormFloat64() * std)
	}
	return v
}

func dot64(a, b []float32) float64 {
	var s float64
	for i := range a {
		s += float64(a[i]) * float64(b[i])
	}
	return s
}

// checkFD perturbs every element of x by ±h, evaluates loss, and compares the central
// difference with grad; it fails on an element whose error exceeds tol·(1+|grad|).
func checkFD(t *testing.T, what string, x, grad []float32, loss func() float64) {
	t.Helper()
	const h, tol = 3e-3, 3e-3
	for i := range x {
		orig := x[i]
		x[i] = orig + h
		up := loss()
		x[i] = orig - h
		down := loss()
		x[i] = orig
		fd := (up - down) / (2 * h)
		if math.Abs(fd-float64(grad[i])) > tol*(1+math.Abs(fd)) {
			t.Fatalf("%s[%d]: analytic %.6g, finite difference %.6g", what, i, grad[i], fd)
		}
	}
}

func TestRMSNormGradientMatchesFiniteDifferences(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 1))
	n, d := 3, 8
	x, w, r := randVec(rng, n*d, 1), randVec(rng, d, 1), randVec(rng, n*d, 1)
	checkOnEveryBackend(t, gradCase{names: []string{"dx", "dw"},
		run: func(be backend.Backend) (func() float64, [][]float32, [][]float32) {
			xs := [][]float32{x, w}
			out, rstd, rb := be.Alloc(n*d), be.Alloc(n), up(be, r)
			var xb, wb backend.Buf
			loss := func() float64 {
				xb, wb = up(be, x), up(be, w)
				be.RMSNorm(out, rstd, xb, wb, n, d, 1e-5)
				return dot64(down(be, out), r)
			}
			loss()
			dx, dw := be.Alloc(n*d), be.Alloc(d)
			be.RMSNormBackward(dx, dw, rb, xb, rstd, wb, n, d)
			return loss, xs, [][]float32{down(be, dx), down(be, dw)}
		}})
}

func TestLinearGradientMatchesFiniteDifferences(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	n, in, out := 4, 5, 3
	x, w, r := randVec(rng, n*in, 1), randVec(rng, out*in, 1), randVec(rng, n*out, 1)
	checkOnEveryBackend(t, gradCase{names: []string{"dx", "dW"},
		run: func(be backend.Backend) (func() float64, [][]float32, [][]float32) {
			xs := [][]float32{x, w}
			y := be.Alloc(n * out)
			loss := func() float64 { be.Linear(y, up(be, x), up(be, w), n, in, out); return dot64(down(be, y), r) }
			dx, dw := be.Alloc(n*in), be.Alloc(out*in)
			be.LinearBackward(dx, dw, up(be, r), up(be, x), up(be, w), n, in, out, false)
			return loss, xs, [][]float32{down(be, dx), down(be, dw)}
		}})
}

func TestRoPEAttentionGradientMatchesFiniteDifferences(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 3))
	b, seq, heads, hd := 2, 5, 2, 4
	d, n := heads*hd, b*seq
	cos, sin := ropeTables(seq, hd, 10000)
	pre := randVec(rng, n*3*d, 1) // q|k|v before RoPE
	r := randVec(rng, n*d, 1)
	checkOnEveryBackend(t, gradCase{names: []string{"dqkv"},
		run: func(be backend.Backend) (func() float64, [][]float32, [][]float32) {
			xs := [][]float32{pre}
			cb, sb := up(be, cos), up(be, sin)
			qkv, p, att := be.Alloc(n*3*d), be.Alloc(b*heads*seq*seq), be.Alloc(n*d)
			loss := func() float64 {
				be.Upload(qkv, pre)
				be.RoPE(qkv, cb, sb, n, seq, heads, hd, false)
				be.Attention(att, p, qkv, b, seq, heads, hd)
				return dot64(down(be, att), r)
			}
			loss()
			dqkv := be.Alloc(n * 3 * d)
			be.AttentionBackward(dqkv, up(be, r), p, qkv, b, seq, heads, hd)
			be.RoPE(dqkv, cb, sb, n, seq, heads, hd, true)
			return loss, xs, [][]float32{down(be, dqkv)}
		}})
}

func TestAttentionIsCausal(t *testing.T) {
	for _, be := range backends(t) {
		rng := rand.New(rand.NewPCG(1, 4))
		b, seq, heads, hd := 1, 6, 2, 4
		d := heads * hd
		qkv := randVec(rng, seq*3*d, 1)
		p, att := be.Alloc(heads*seq*seq), be.Alloc(seq*d)
		be.Attention(att, p, up(be, qkv), b, seq, heads, hd)
		before := down(be, att)[:3*d]
		// Changing the last token's key and value must not move the first three outputs.
		for j := range 3 * d {
			qkv[(seq-1)*3*d+j] += 5
		}
		be.Attention(att, p, up(be, qkv), b, seq, heads, hd)
		after := down(be, att)
		for i, v := range before {
			if after[i] != v {
				t.Fatalf("%s: output %d of an early token changed from %g to %g when a later token changed", be.Name(), i, v, after[i])
			}
		}
	}
}

func TestSwiGLUGradientMatchesFiniteDifferences(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 5))
	n, f := 3, 6
	gu, r := randVec(rng, n*2*f, 1.5), randVec(rng, n*f, 1)
	checkOnEveryBackend(t, gradCase{names: []string{"dgu"},
		run: func(be backend.Backend) (func() float64, [][]float32, [][]float32) {
			xs := [][]float32{gu}
			m := be.Alloc(n * f)
			loss := func() float64 { be.SwiGLU(m, up(be, gu), n, f); return dot64(down(be, m), r) }
			dgu := be.Alloc(n * 2 * f)
			be.SwiGLUBackward(dgu, up(be, r), up(be, gu), n, f)
			return loss, xs, [][]float32{down(be, dgu)}
		}})
}

func TestEmbeddingGradientMatchesFiniteDifferences(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 6))
	v, d := 5, 3
	e := randVec(rng, v*d, 1)
	tokens := []int32{0, 3, 3, 1} // a repeated token must accumulate
	r := randVec(rng, len(tokens)*d, 1)
	checkOnEveryBackend(t, gradCase{names: []string{"dE"},
		run: func(be backend.Backend) (func() float64, [][]float32, [][]float32) {
			xs := [][]float32{e}
			x := be.Alloc(len(tokens) * d)
			loss := func() float64 { be.Embed(x, up(be, e), tokens, d); return dot64(down(be, x), r) }
			de := be.Alloc(v * d)
			be.EmbedBackward(de, up(be, r), tokens, d)
			return loss, xs, [][]float32{down(be, de)}
		}})
}

func TestHeadAndLossGradientMatchesFiniteDifferences(t *testing.T) {
	c := Config{Vocab: 7, DModel: 8, NLayers: 1, NHeads: 2, DFF: 8, SeqLen: 4, RopeTheta: 10000, NormEps: 1e-5}
	rng := rand.New(rand.NewPCG(1, 7))
	params := randVec(rng, newLayout(c, Range{1, 1}, false, true).size, 1)
	b, seq := 2, 4
	x := randVec(rng, b*seq*c.DModel, 1)
	targets := []int32{0, 1, 2, 3, 4, 5, 6, 0}
	checkOnEveryBackend(t, gradCase{names: []string{"dx", "dparams"},
		run: func(be backend.Backend) (func() float64, [][]float32, [][]float32) {
			xs := [][]float32{x, params}
			s, err := NewStage(c, Range{1, 1}, false, true, WithBackend(be)) // head only: final norm, lm_head, loss
			if err != nil {
				t.Fatal(err)
			}
			copy(s.Params, params)
			xs[1] = s.Params // the finite differences perturb the stage's own parameters
			tp := s.NewTape(b, seq)
			loss := func() float64 { s.Forward(tp, nil, x); return s.Loss(tp, targets, 1) }
			loss()
			dx := append([]float32(nil), s.Backward(tp, nil)...)
			return loss, xs, [][]float32{dx, append([]float32(nil), s.Grads...)}
		}})
}

func TestCrossEntropyOfUniformLogitsIsLogVocab(t *testing.T) {
	for _, be := range backends(t) {
		got := be.CrossEntropy(be.Alloc(3*256), []int32{0, 17, 255}, 256, 1)
		if want := math.Log(256); math.Abs(got-want) > 1e-6 {
			t.Fatalf("%s: loss %g, want ln 256 = %g", be.Name(), got, want)
		}
	}
}

func TestBlockGradientMatchesFiniteDifferences(t *testing.T) {
	c := Config{Vocab: 9, DModel: 8, NLayers: 1, NHeads: 2, DFF: 12, SeqLen: 4, RopeTheta: 10000, NormEps: 1e-5}
	b, seq := 2, 4
	tokens := []int32{1, 2, 3, 4, 5, 6, 7, 8}
	targets := []int32{2, 3, 4, 5, 6, 7, 8, 0}
	checkOnEveryBackend(t, gradCase{names: []string{"dparams"},
		run: func(be backend.Backend) (func() float64, [][]float32, [][]float32) {
			s, err := NewStage(c, Range{0, 1}, true, true, WithBackend(be))
			if err != nil {
				t.Fatal(err)
			}
			s.Init(3)
			rng := rand.New(rand.NewPCG(1, 8))
			for _, tn := range s.Tensors() {
				v := tn.View(s.Params)
				for i := range v {
					if len(tn.Shape) == 1 {
						v[i] += float32(0.2 * rng.NormFloat64()) // gains away from exactly 1
					} else {
						v[i] *= 15 // weights well away from the near-linear regime of a fresh init
					}
				}
			}
			tp := s.NewTape(b, seq)
			loss := func() float64 { s.Forward(tp, tokens, nil); return s.Loss(tp, targets, 1) }
			loss()
			s.Backward(tp, nil)
			return loss, [][]float32{s.Params}, [][]float32{append([]float32(nil), s.Grads...)}
		}})
}

// The pipeline cut must not change the numbers: stages 0..S-1 run in sequence give
// the unsplit model's loss and every parameter gradient.
func TestStageCompositionMatchesUnsplitModel(t *testing.T) {
	c := Config{Vocab: 256, DModel: 16, NLayers: 4, NHeads: 2, DFF: 24, SeqLen: 8, RopeTheta: 10000, NormEps: 1e-5}
	rng := rand.New(rand.NewPCG(2, 2))
	b := 3
	tokens, targets := make([]int32, b*c.SeqLen), make([]int32, b*c.SeqLen)
	for i := range tokens {
		tokens[i], targets[i] = int32(rng.IntN(256)), int32(rng.IntN(256))
	}
	for _, be := range backends(t) {
		t.Run(be.Name(), func(t *testing.T) { checkComposition(t, be, c, tokens, targets, b) })
	}
}

func checkComposition(t *testing.T, be backend.Backend, c Config, tokens, targets []int32, b int) {
	run := func(n int) (float64, map[string][]float32) {
		stages, err := NewStages(c, n, WithBackend(be))
		if err != nil {
			t.Fatal(err)
		}
		tapes := make([]*Tape, n)
		var x []float32
		for i, s := range stages {
			s.Init(42)
			tapes[i] = s.NewTape(b, c.SeqLen)
			x = s.Forward(tapes[i], tokens, x)
		}
		loss := stages[n-1].Loss(tapes[n-1], targets, 1)
		var g []float32
		for i := n - 1; i >= 0; i-- {
			g = stages[i].Backward(tapes[i], g)
		}
		grads := map[string][]float32{}
		for _, s := range stages {
			for _, tn := range s.Tensors() {
				grads[tn.Name] = tn.View(s.Grads)
			}
		}
		return loss, grads
	}
	loss1, g1 := run(1)
	for _, n := range []int{2, 4} {
		loss, g := run(n)
		if math.Abs(loss-loss1) > 1e-6*loss1 {
			t.Fatalf("%d stages: loss %.9g, unsplit %.9g", n, loss, loss1)
		}
		if len(g) != len(g1) {
			t.Fatalf("%d stages hold %d tensors, unsplit %d", n, len(g), len(g1))
		}
		for name, want := range g1 {
			got := g[name]
			for i := range want {
				if math.Abs(float64(got[i]-want[i])) > 1e-6*(1+math.Abs(float64(want[i]))) {
					t.Fatalf("%d stages: grad %s[%d] = %g, unsplit %g", n, name, i, got[i], want[i])
				}
			}
		}
	}
}

func TestInitIsDeterministicAndIndependentOfSplit(t *testing.T) {
	c := Config{Vocab: 256, DModel: 16, NLayers: 4, NHeads: 2, DFF: 24, SeqLen: 8, RopeTheta: 10000, NormEps: 1e-5}
	whole, _ := NewStages(c, 1)
	parts, _ := NewStages(c, 4)
	whole[0].Init(7)
	byName := map[string][]float32{}
	for _, tn := range whole[0].Tensors() {
		byName[tn.Name] = tn.View(whole[0].Params)
	}
	for _, s := range parts {
		s.Init(7)
		for _, tn := range s.Tensors() {
			want := byName[tn.Name]
			for i, v := range tn.View(s.Params) {
				if v != want[i] {
					t.Fatalf("%s[%d] = %g in the split model, %g unsplit", tn.Name, i, v, want[i])
				}
			}
		}
	}
	other, _ := NewStages(c, 1)
	other[0].Init(8)
	if other[0].Params[0] == whole[0].Params[0] {
		t.Fatalf("seeds 7 and 8 gave the same first parameter")
	}
}

func TestSplitLayersIsContiguousAndBalanced(t *testing.T) {
	got, err := SplitLayers(10, 4)
	if err != nil {
		t.Fatal(err)
	}
	want := []Range{{0, 3}, {3, 6}, {6, 8}, {8, 10}}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("SplitLayers(10,4) = %v, want %v", got, want)
		}
	}
	if _, err := SplitLayers(2, 3); err == nil {
		t.Fatal("3 stages for 2 layers: want an error")
	}
}

func TestResultsDoNotDependOnTheComputeThreads(t *testing.T) {
	// Big enough that Gemm splits across workers (2·m·n·k ≥ 1 Mi).
	c := Config{Vocab: 256, DModel: 64, NLayers: 2, NHeads: 4, DFF: 96, SeqLen: 32, RopeTheta: 10000, NormEps: 1e-5}
	rng := rand.New(rand.NewPCG(3, 3))
	b := 4
	tokens, targets := make([]int32, b*c.SeqLen), make([]int32, b*c.SeqLen)
	for i := range tokens {
		tokens[i], targets[i] = int32(rng.IntN(256)), int32(rng.IntN(256))
	}
	for _, be := range providerBackends(t) {
		t.Run(be.Name()+"/"+be.GEMM().Name, func(t *testing.T) { checkThreadIndependence(t, be, c, tokens, targets, b) })
	}
}

// providerBackends is every backend with every GEMM provider available here.
func providerBackends(t testing.TB) []backend.Backend {
	var out []backend.Backend
	for _, name := range backend.Names {
		for _, g := range backend.GEMMNames[1:] {
			be, err := backend.OpenWith(name, g)
			if err != nil {
				t.Logf("%s/%s: %v", name, g, err)
				continue
			}
			out = append(out, be)
		}
	}
	return out
}

// Providers differ by the order of float32 sums only: one block step's loss and
// gradients agree across them within these bounds (relative, L2 for the gradients),
// and with the same provider they are equal bit for bit. bf16 is looser: a sum
// rounded a little differently can round an activation to the next bf16 value.
var crossProviderLossTol = map[string]float64{"fp32": 1e-6, "bf16": 1e-4}

func TestProvidersAgreeOnABlockStepAndEachRepeatsItself(t *testing.T) {
	c := Config{Vocab: 256, DModel: 64, NLayers: 2, NHeads: 4, DFF: 96, SeqLen: 32, RopeTheta: 10000, NormEps: 1e-5}
	rng := rand.New(rand.NewPCG(5, 5))
	b := 4
	tokens, targets := make([]int32, b*c.SeqLen), make([]int32, b*c.SeqLen)
	for i := range tokens {
		tokens[i], targets[i] = int32(rng.IntN(256)), int32(rng.IntN(256))
	}
	step := func(be backend.Backend) (float64, []float32) {
		stages, err := NewStages(c, 1, WithBackend(be))
		if err != nil {
			t.Fatal(err)
		}
		s := stages[0]
		s.Init(7)
		tp := s.NewTape(b, c.SeqLen)
		s.Forward(tp, tokens, nil)
		loss := s.Loss(tp, targets, 1)
		s.Backward(tp, nil)
		return loss, slices.Clone(s.Grads)
	}
	refs := map[string]struct {
		gemm  string
		loss  float64
		grads []float32
	}{}
	bes := providerBackends(t)
	if len(bes) < 3 {
		t.Logf("only %d backend/provider pairs here: install libdnnl2 and libopenblas0 to compare the providers", len(bes))
	}
	for _, be := range bes {
		name := be.Name() + "/" + be.GEMM().Name
		loss, g := step(be)
		if loss2, g2 := step(be); loss2 != loss || !slices.Equal(g2, g) {
			t.Fatalf("%s: a second run gives loss %v (first %v), gradients equal: %v", name, loss2, loss, slices.Equal(g2, g))
		}
		ref, ok := refs[be.Precision()]
		if !ok {
			refs[be.Precision()] = struct {
				gemm  string
				loss  float64
				grads []float32
			}{be.GEMM().Name, loss, g}
			continue
		}
		tol := crossProviderLossTol[be.Precision()]
		dl, dg := math.Abs(loss-ref.loss)/math.Abs(ref.loss), relL2(g, ref.grads)
		t.Logf("%s against %s: loss %.7g vs %.7g (relative %.2g), gradients relative L2 %.2g", name, ref.gemm, loss, ref.loss, dl, dg)
		if dl > tol || dg > 100*tol || math.IsNaN(dg) {
			t.Fatalf("%s against %s: loss relative difference %.3g (want <= %g), gradients relative L2 %.3g (want <= %g)",
				name, ref.gemm, dl, tol, dg, 100*tol)
		}
	}
}

func checkThreadIndependence(t *testing.T, be backend.Backend, c Config, tokens, targets []int32, b int) {
	run := func(workers int) (float64, []float32) {
		compute.SetWorkers(workers)
		defer compute.SetWorkers(0)
		stages, err := NewStages(c, 1, WithBackend(be))
		if err != nil {
			t.Fatal(err)
		}
		s := stages[0]
		s.Init(7)
		tp := s.NewTape(b, c.SeqLen)
		s.Forward(tp, tokens, nil)
		loss := s.Loss(tp, targets, 1)
		s.Backward(tp, nil)
		return loss, slices.Clone(s.Grads)
	}
	loss1, g1 := run(1)
	for _, w := range []int{2, 3, 5} {
		loss, g := run(w)
		if loss != loss1 || !slices.Equal(g, g1) {
			t.Fatalf("%d workers: loss %v (1 worker: %v), gradients equal: %v", w, loss, loss1, slices.Equal(g, g1))
		}
	}
}
