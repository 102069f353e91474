package train

import (
	"math"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/data"
)

// TestRecomputeTrainsTheSameModelBitForBit steps a 3-stage model with 3 micro-batches
// per step with and without model.recompute: every step's loss and gradient norm, every
// stage's gradients and, after the optimiser, its weights must be equal, bit for bit.
func TestRecomputeTrainsTheSameModelBitForBit(t *testing.T) {
	src := strings.Replace(smallSpec, "n_layers: 2", "n_layers: 3", 1)
	src = strings.Replace(src, "stages: 1, micro_batches: 1", "stages: 3, micro_batches: 2", 1)
	var runs [2]*model
	var samplers [2]*data.Sampler[int32]
	for i, on := range []bool{false, true} {
		sp := testSpec(t, src)
		sp.Model.Recompute = on
		m, err := newModel(sp)
		if err != nil {
			t.Fatal(err)
		}
		if m.stages[1].Recompute() != on {
			t.Fatalf("model.recompute %v: the stages recompute: %v", on, m.stages[1].Recompute())
		}
		runs[i] = m
		text, _, err := Corpus("")
		if err != nil {
			t.Fatal(err)
		}
		if samplers[i], err = data.NewSampler(data.Widen(text), sp.Model.SeqLen, sp.Seed, 0); err != nil {
			t.Fatal(err)
		}
	}
	sp := testSpec(t, src)
	n := sp.Train.BatchSize / sp.Pipeline.MicroBatches * sp.Model.SeqLen
	for step := range 4 {
		var loss, norm [2]float64
		for i, m := range runs {
			inputs, targets := make([]int32, n), make([]int32, n)
			loss[i], norm[i] = m.step(samplers[i], inputs, targets, 3e-3, 1, nil)
		}
		if math.Float64bits(loss[0]) != math.Float64bits(loss[1]) || math.Float64bits(norm[0]) != math.Float64bits(norm[1]) {
			t.Fatalf("step %d: loss %v, norm %v recomputed; %v, %v with full tapes", step+1, loss[1], norm[1], loss[0], norm[0])
		}
		for s := range runs[0].stages {
			a, b := runs[0].stages[s], runs[1].stages[s]
			for k := range a.Grads {
				if math.Float32bits(a.Grads[k]) != math.Float32bits(b.Grads[k]) {
					t.Fatalf("step %d stage %d: gradient %d is %v recomputed, %v with full tapes", step+1, s, k, b.Grads[k], a.Grads[k])
				}
			}
			for k := range a.Params {
				if math.Float32bits(a.Params[k]) != math.Float32bits(b.Params[k]) {
					t.Fatalf("step %d stage %d: weight %d is %v recomputed, %v with full tapes", step+1, s, k, b.Params[k], a.Params[k])
				}
			}
		}
	}
}
