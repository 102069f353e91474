package shard

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/pipeswarm/pipeswarm/optim"
	"github.com/pipeswarm/pipeswarm/shard/backend"
)

var subCfg = Config{Vocab: 256, DModel: 32, NLayers: 4, NHeads: 2, DFF: 48, SeqLen: 16, RopeTheta: 10000, NormEps: 1e-5}

func TestSubspaceBasisIsOrthonormalAndSeeded(t *testing.T) {
	a, err := NewSubspace(subCfg, 8, 3)
	if err != nil {
		t.Fatal(err)
	}
	d, k := a.D, a.K
	for p := range k {
		for q := range k {
			var dot float64
			for i := range d {
				dot += float64(a.U[i*k+p]) * float64(a.U[i*k+q])
			}
			want := 0.0
			if p == q {
				want = 1
			}
			if math.Abs(dot-want) > 1e-6 {
				t.Fatalf("UᵀU[%d,%d] = %g, want %g", p, q, dot, want)
			}
		}
	}
	b, _ := NewSubspace(subCfg, 8, 3)
	c, _ := NewSubspace(subCfg, 8, 4)
	if a.U[5] != b.U[5] || a.Fixed[7] != b.Fixed[7] {
		t.Fatal("the same seed gave a different subspace")
	}
	if a.U[5] == c.U[5] {
		t.Fatal("different seeds gave the same basis")
	}
	if _, err := NewSubspace(subCfg, 33, 1); err == nil {
		t.Fatal("rank above d_model accepted")
	}
}

// subspaceRun trains a 4-layer model cut into 3 stages under the subspace for a few
// steps, sending each boundary either compressed (c = Uᵀ(x − fixed), Uᵀg) or in full,
// and returns the losses, the final parameters, and the worst relative error of
// rebuilding a boundary stream from its compressed form.
func subspaceRun(t *testing.T, compressed bool, denseTail int) (losses []float64, params [][]float32, worstRebuild float64) {
	t.Helper()
	stages, err := NewStages(subCfg, 3)
	if err != nil {
		t.Fatal(err)
	}
	sub, err := NewSubspace(subCfg, 8, 9)
	if err != nil {
		t.Fatal(err)
	}
	b, seq := 2, subCfg.SeqLen
	n := b * seq
	var opts []*optim.AdamW
	var tapes []*Tape
	for _, s := range stages {
		s.Init(9)
		if err := s.SetSubspace(sub, denseTail); err != nil {
			t.Fatal(err)
		}
		opt, err := optim.NewAdamW(len(s.Params), optim.DefaultAdamW())
		if err != nil {
			t.Fatal(err)
		}
		opts, tapes = append(opts, opt), append(tapes, s.NewTape(b, seq))
	}
	rng := rand.New(rand.NewPCG(5, 5))
	tokens, targets := make([]int32, n), make([]int32, n)
	c := make([]float32, n*sub.K)
	rebuilt := make([]float32, n*subCfg.DModel)
	for range 6 {
		for i := range tokens {
			tokens[i], targets[i] = int32(rng.IntN(40)), int32(rng.IntN(40))
		}
		var x []float32
		for i, s := range stages {
			x = s.Forward(tapes[i], tokens, x)
			if i < len(stages)-1 {
				sub.Compress(c, x, tokens)
				sub.Expand(rebuilt, c, tokens)
				worstRebuild = math.Max(worstRebuild, relErr(rebuilt, x))
				if compressed {
					x = rebuilt
				}
			}
		}
		losses = append(losses, stages[2].Loss(tapes[2], targets, 1))
		var g []float32
		for i := 2; i >= 0; i-- {
			g = stages[i].Backward(tapes[i], g)
			if compressed && g != nil {
				sub.CompressGrad(c, g, n)
				full := make([]float32, len(g))
				sub.ExpandGrad(full, c, n)
				g = full
			}
		}
		for i, s := range stages {
			s.ProjectGrads()
			opts[i].Step(s.Params, s.Grads, 3e-3)
			s.ProjectParams()
			s.ZeroGrads()
		}
	}
	for _, s := range stages {
		params = append(params, append([]float32(nil), s.Params...))
	}
	return losses, params, worstRebuild
}

func relErr(a, b []float32) float64 {
	var num, den float64
	for i := range a {
		d := float64(a[i] - b[i])
		num += d * d
		den += float64(b[i]) * float64(b[i])
	}
	return math.Sqrt(num / den)
}

func TestSubspaceBoundaryStreamIsRebuiltExactlyAfterTraining(t *testing.T) {
	for _, tail := range []int{0, 1} {
		_, _, worst := subspaceRun(t, false, tail)
		if worst > 1e-5 {
			t.Errorf("dense tail %d: rebuilt boundary stream differs from the real one by %.2g (relative)", tail, worst)
		}
	}
}

// Sending c and Uᵀg instead of the full tensors changes nothing but rounding: the
// same losses and the same parameters after several optimiser steps.
func TestCompressedBoundariesTrainLikeFullOnes(t *testing.T) {
	lossFull, pFull, _ := subspaceRun(t, false, 1)
	lossComp, pComp, _ := subspaceRun(t, true, 1)
	for i := range lossFull {
		if math.Abs(lossFull[i]-lossComp[i]) > 1e-5*lossFull[i] {
			t.Fatalf("step %d: loss %.7f with compressed boundaries, %.7f with full ones", i+1, lossComp[i], lossFull[i])
		}
	}
	for s := range pFull {
		if e := relErr(pComp[s], pFull[s]); e > 1e-4 {
			t.Fatalf("stage %d parameters differ by %.2g (relative) after training", s, e)
		}
	}
	if lossFull[len(lossFull)-1] >= lossFull[0] {
		t.Fatalf("loss did not fall under the subspace: %v", lossFull)
	}
}

func TestDenseTailMustLieInTheLastStage(t *testing.T) {
	stages, _ := NewStages(subCfg, 2) // layers [0,2) and [2,4)
	sub, _ := NewSubspace(subCfg, 8, 1)
	if err := stages[0].SetSubspace(sub, 3); err == nil {
		t.Fatal("a dense tail of 3 layers reaches into stage 0, whose boundary must be compressed; want an error")
	}
	if err := stages[1].SetSubspace(sub, 2); err != nil {
		t.Fatalf("a dense tail inside the last stage: %v", err)
	}
}

// The compressed boundary's backward pair: with stage 1 fed Expand(c), CompressGrad of
// its input gradient is dL/dc; and through a whole compressed cut, stage 0 driven by
// ExpandGrad(CompressGrad(g)) gets the gradient of L(stage1(Expand(Compress(stage0)))).
func TestCompressedBoundaryGradientMatchesFiniteDifferences(t *testing.T) {
	c := Config{Vocab: 16, DModel: 8, NLayers: 2, NHeads: 2, DFF: 12, SeqLen: 4, RopeTheta: 10000, NormEps: 1e-5}
	sub, err := NewSubspace(c, 4, 5)
	if err != nil {
		t.Fatal(err)
	}
	b, seq := 2, 4
	n := b * seq
	tokens := []int32{1, 2, 3, 4, 5, 6, 7, 8}
	targets := []int32{2, 3, 4, 5, 6, 7, 8, 9}
	setup := func(be backend.Backend) (stages []*Stage, t0, t1 *Tape, cv, x []float32) {
		stages, err := NewStages(c, 2, WithBackend(be))
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range stages {
			s.Init(6)
			if err := s.SetSubspace(sub, 1); err != nil {
				t.Fatal(err)
			}
			for i := range s.Params {
				s.Params[i] *= 2 // off the near-linear regime of a fresh init, not so far that h=3e-3 sees curvature
			}
		}
		rng := rand.New(rand.NewPCG(4, 4))
		return stages, stages[0].NewTape(b, seq), stages[1].NewTape(b, seq), randVec(rng, n*sub.K, 1), make([]float32, n*c.DModel)
	}
	// Stage 1 fed Expand(c): CompressGrad of its input gradient is dL/dc.
	checkOnEveryBackend(t, gradCase{names: []string{"dc"},
		run: func(be backend.Backend) (func() float64, [][]float32, [][]float32) {
			stages, _, t1, cv, x := setup(be)
			lossOfC := func() float64 {
				sub.Expand(x, cv, tokens)
				stages[1].Forward(t1, tokens, x)
				return stages[1].Loss(t1, targets, 1)
			}
			lossOfC()
			dc := make([]float32, n*sub.K)
			sub.CompressGrad(dc, stages[1].Backward(t1, nil), n)
			return lossOfC, [][]float32{cv}, [][]float32{dc}
		}})
	// Through a whole compressed cut: stage 0 driven by ExpandGrad(CompressGrad(g)).
	checkOnEveryBackend(t, gradCase{names: []string{"stage 0 params"},
		run: func(be backend.Backend) (func() float64, [][]float32, [][]float32) {
			stages, t0, t1, cv, x := setup(be)
			lossOfStage0 := func() float64 {
				sub.Compress(cv, stages[0].Forward(t0, tokens, nil), tokens)
				sub.Expand(x, cv, tokens)
				stages[1].Forward(t1, tokens, x)
				return stages[1].Loss(t1, targets, 1)
			}
			lossOfStage0()
			dc := make([]float32, n*sub.K)
			sub.CompressGrad(dc, stages[1].Backward(t1, nil), n)
			g := make([]float32, n*c.DModel)
			sub.ExpandGrad(g, dc, n)
			stages[0].Backward(t0, g)
			return lossOfStage0, [][]float32{stages[0].Params}, [][]float32{slices.Clone(stages[0].Grads)}
		}})
}
