package shard

import (
	"math"
	"math/rand/v2"
	"testing"
)

// TestRecomputeGivesTheSameGradientsBitForBit runs the same micro-batches through a stage
// with full tapes and through one that recomputes, with several micro-batches in flight
// (their forwards all before their backwards, so the shared activations hold the last
// forward's when the first backward runs), on every stage position and backend: every
// output, loss, input gradient and parameter gradient must be equal, bit for bit.
func TestRecomputeGivesTheSameGradientsBitForBit(t *testing.T) {
	c := Config{Vocab: 64, DModel: 32, NLayers: 4, NHeads: 4, DFF: 88, SeqLen: 16, RopeTheta: 1e4, NormEps: 1e-5}
	const b, inFlight = 2, 3
	n := b * c.SeqLen
	for _, be := range backends(t) {
		for _, pos := range []struct {
			r           Range
			first, last bool
		}{{Range{0, 2}, true, false}, {Range{1, 3}, false, false}, {Range{2, 4}, false, true}, {Range{0, 4}, true, true}} {
			var stages [2]*Stage
			for i, on := range []bool{false, true} {
				s, err := NewStage(c, pos.r, pos.first, pos.last, WithBackend(be), WithRecompute(on))
				if err != nil {
					t.Fatal(err)
				}
				s.Init(7)
				stages[i] = s
			}
			rng := rand.New(rand.NewPCG(1, 2))
			tokens, targets, xs, douts := make([][]int32, inFlight), make([][]int32, inFlight), make([][]float32, inFlight), make([][]float32, inFlight)
			for m := range inFlight {
				tokens[m], targets[m] = make([]int32, n), make([]int32, n)
				for i := range n {
					tokens[m][i], targets[m][i] = int32(rng.IntN(c.Vocab)), int32(rng.IntN(c.Vocab))
				}
				xs[m], douts[m] = make([]float32, n*c.DModel), make([]float32, n*c.DModel)
				for i := range xs[m] {
					xs[m][i], douts[m][i] = float32(rng.NormFloat64()), float32(rng.NormFloat64()*1e-2)
				}
			}
			type result struct {
				outs, dxs [][]float32
				losses    []float64
			}
			var res [2]result
			for i, s := range stages {
				tapes := make([]*Tape, inFlight)
				for m := range tapes {
					tapes[m] = s.NewTape(b, c.SeqLen)
				}
				for step := range 2 { // the second step reuses the tapes and accumulates
					for m, tp := range tapes {
						out := s.Forward(tp, tokens[m], xs[m])
						res[i].outs = append(res[i].outs, append([]float32(nil), out...))
						if s.Last {
							res[i].losses = append(res[i].losses, s.Loss(tp, targets[m], 1/float32(inFlight)))
						}
					}
					for m, tp := range tapes {
						dx := s.Backward(tp, douts[(m+step)%inFlight])
						res[i].dxs = append(res[i].dxs, append([]float32(nil), dx...))
					}
				}
			}
			name := be.Name() + "/" + posName(pos.r, pos.first, pos.last)
			for k := range res[0].outs {
				sameBits(t, name+" output", res[1].outs[k], res[0].outs[k])
				sameBits(t, name+" input gradient", res[1].dxs[k], res[0].dxs[k])
			}
			for k, l := range res[0].losses {
				if math.Float64bits(res[1].losses[k]) != math.Float64bits(l) {
					t.Errorf("%s: loss %d: recomputed %v, full tape %v", name, k, res[1].losses[k], l)
				}
			}
			for _, tn := range stages[0].Tensors() {
				sameBits(t, name+" "+tn.Name, tn.View(stages[1].Grads), tn.View(stages[0].Grads))
			}
		}
	}
}

func posName(r Range, first, last bool) string {
	s := "blocks"
	if first {
		s = "embed+" + s
	}
	if last {
		s += "+head"
	}
	return s + "[" + string(rune('0'+r.Lo)) + "," + string(rune('0'+r.Hi)) + ")"
}
