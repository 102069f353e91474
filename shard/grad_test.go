package shard

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/pipeswarm/pipeswarm/shard/compute"
)

// Finite-difference checks, one per layer: each forward is reduced to a scalar
// L = Σ r·out with a fixed random r (accumulated in float64), so the analytic gradient
// of every input is what backward returns for dout = r.

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
	out, rstd := make([]float32, n*d), make([]float32, n)
	loss := func() float64 { rmsnormForward(out, rstd, x, w, n, d, 1e-5); return dot64(out, r) }
	loss()
	dx, dw := make([]float32, n*d), make([]float32, d)
	rmsnormBackward(dx, dw, r, x, rstd, w, n, d)
	checkFD(t, "dx", x, dx, loss)
	checkFD(t, "dw", w, dw, loss)
}

func TestLinearGradientMatchesFiniteDifferences(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	n, in, out := 4, 5, 3
	x, w, r := randVec(rng, n*in, 1), randVec(rng, out*in, 1), randVec(rng, n*out, 1)
	y := make([]float32, n*out)
	loss := func() float64 { linearForward(y, x, w, n, in, out); return dot64(y, r) }
	dx, dw := make([]float32, n*in), make([]float32, out*in)
	linearBackward(dx, dw, r, x, w, n, in, out, false)
	checkFD(t, "dx", x, dx, loss)
	checkFD(t, "dW", w, dw, loss)
}

func TestRoPEAttentionGradientMatchesFiniteDifferences(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 3))
	b, seq, heads, hd := 2, 5, 2, 4
	d, n := heads*hd, b*seq
	cos, sin := ropeTables(seq, hd, 10000)
	pre := randVec(rng, n*3*d, 1) // q|k|v before RoPE
	r := randVec(rng, n*d, 1)
	qkv, p, att := make([]float32, n*3*d), make([]float32, b*heads*seq*seq), make([]float32, n*d)
	loss := func() float64 {
		copy(qkv, pre)
		ropeApply(qkv, cos, sin, n, seq, heads, hd, 1)
		attentionForward(att, p, qkv, b, seq, heads, hd)
		return dot64(att, r)
	}
	loss()
	dqkv := make([]float32, n*3*d)
	attentionBackward(dqkv, r, p, qkv, b, seq, heads, hd)
	ropeApply(dqkv, cos, sin, n, seq, heads, hd, -1)
	checkFD(t, "dqkv", pre, dqkv, loss)
}

func TestAttentionIsCausal(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 4))
	b, seq, heads, hd := 1, 6, 2, 4
	d := heads * hd
	qkv := randVec(rng, seq*3*d, 1)
	p, att := make([]float32, heads*seq*seq), make([]float32, seq*d)
	attentionForward(att, p, qkv, b, seq, heads, hd)
	before := append([]float32(nil), att[:3*d]...)
	// Changing the last token's key and value must not move the first three outputs.
	for j := range 3 * d {
		qkv[(seq-1)*3*d+j] += 5
	}
	attentionForward(att, p, qkv, b, seq, heads, hd)
	for i, v := range before {
		if att[i] != v {
			t.Fatalf("output %d of an early token changed from %g to %g when a later token changed", i, v, att[i])
		}
	}
}

func TestSwiGLUGradientMatchesFiniteDifferences(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 5))
	n, f := 3, 6
	gu, r := randVec(rng, n*2*f, 1.5), randVec(rng, n*f, 1)
	m := make([]float32, n*f)
	loss := func() float64 { swigluForward(m, gu, n, f); return dot64(m, r) }
	dgu := make([]float32, n*2*f)
	swigluBackward(dgu, r, gu, n, f)
	checkFD(t, "dgu", gu, dgu, loss)
}

func TestEmbeddingGradientMatchesFiniteDifferences(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 6))
	v, d := 5, 3
	e := randVec(rng, v*d, 1)
	tokens := []int32{0, 3, 3, 1} // a repeated token must accumulate
	r := randVec(rng, len(tokens)*d, 1)
	x := make([]float32, len(tokens)*d)
	loss := func() float64 { embedForward(x, e, tokens, d); return dot64(x, r) }
	de := make([]float32, v*d)
	embedBackward(de, r, tokens, d)
	checkFD(t, "dE", e, de, loss)
}

func TestHeadAndLossGradientMatchesFiniteDifferences(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 7))
	c := Config{Vocab: 7, DModel: 8, NLayers: 1, NHeads: 2, DFF: 8, SeqLen: 4, RopeTheta: 10000, NormEps: 1e-5}
	s, err := NewStage(c, Range{1, 1}, false, true) // head only: final norm, lm_head, loss
	if err != nil {
		t.Fatal(err)
	}
	copy(s.Params, randVec(rng, len(s.Params), 1))
	b, seq := 2, 4
	x := randVec(rng, b*seq*c.DModel, 1)
	targets := []int32{0, 1, 2, 3, 4, 5, 6, 0}
	tp := s.NewTape(b, seq)
	loss := func() float64 { s.Forward(tp, nil, x); return s.Loss(tp, targets, 1) }
	loss()
	dx := append([]float32(nil), s.Backward(tp, nil)...)
	checkFD(t, "dx", x, dx, loss)
	grads := append([]float32(nil), s.Grads...)
	checkFD(t, "dparams", s.Params, grads, loss)
}

func TestCrossEntropyOfUniformLogitsIsLogVocab(t *testing.T) {
	logits := make([]float32, 3*256)
	got := crossEntropy(logits, []int32{0, 17, 255}, 256, 1)
	if want := math.Log(256); math.Abs(got-want) > 1e-6 {
		t.Fatalf("loss %g, want ln 256 = %g", got, want)
	}
}

func TestBlockGradientMatchesFiniteDifferences(t *testing.T) {
	c := Config{Vocab: 9, DModel: 8, NLayers: 1, NHeads: 2, DFF: 12, SeqLen: 4, RopeTheta: 10000, NormEps: 1e-5}
	s, err := NewStage(c, Range{0, 1}, true, true)
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
	b, seq := 2, 4
	tokens := []int32{1, 2, 3, 4, 5, 6, 7, 8}
	targets := []int32{2, 3, 4, 5, 6, 7, 8, 0}
	tp := s.NewTape(b, seq)
	loss := func() float64 { s.Forward(tp, tokens, nil); return s.Loss(tp, targets, 1) }
	loss()
	s.Backward(tp, nil)
	grads := append([]float32(nil), s.Grads...)
	checkFD(t, "dparams", s.Params, grads, loss)
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
	run := func(n int) (float64, map[string][]float32) {
		stages, err := NewStages(c, n)
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
	run := func(workers int) (float64, []float32) {
		compute.SetWorkers(workers)
		defer compute.SetWorkers(0)
		stages, err := NewStages(c, 1)
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
