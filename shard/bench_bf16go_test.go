package shard

import (
	"math/rand/v2"
	"reflect"
	"testing"

	"github.com/pipeswarm/pipeswarm/shard/backend"
	"github.com/pipeswarm/pipeswarm/shard/compute"
)

// packOnceBF16 is the bf16 backend on the Go kernels with its projections on
// compute.GemmBF16, which packs each operand once for all workers, instead of one
// GoSgemmBF16 call per fixed block (each packing the operand the blocks share). The
// results are the same bits either way: every element of c is computed alone.
type packOnceBF16 struct{ backend.Backend }

// hostBuf is the storage of a host backend's buffer b (a []float32 under another name).
func hostBuf(b backend.Buf) []float32 {
	return reflect.ValueOf(b).Convert(reflect.TypeFor[[]float32]()).Interface().([]float32)
}

func (packOnceBF16) Linear(y, x, w backend.Buf, n, in, out int) {
	compute.GemmBF16(false, true, n, out, in, 1, hostBuf(x), in, hostBuf(w), in, 0, hostBuf(y), out)
}

func (packOnceBF16) LinearBackward(dx, dw, dy, x, w backend.Buf, n, in, out int, accumulate bool) {
	compute.GemmBF16(true, false, out, in, n, 1, hostBuf(dy), out, hostBuf(x), in, 1, hostBuf(dw), in)
	var beta float32
	if accumulate {
		beta = 1
	}
	compute.GemmBF16(false, false, n, in, out, 1, hostBuf(dy), out, hostBuf(w), in, beta, hostBuf(dx), in)
}

// BenchmarkBlockTrainStepBF16PackOnce is BenchmarkBlockTrainStep's bf16 arm on the Go
// kernels with the projections on compute.GemmBF16.
func BenchmarkBlockTrainStepBF16PackOnce(b *testing.B) {
	be, err := backend.OpenWith("bf16", "go")
	if err != nil {
		b.Skip(err)
	}
	benchBlockTrainStepOn(b, packOnceBF16{be})
}

// TestPackOnceBF16IsGoBF16: the bf16 backend on the Go kernels computes a block's
// step to the same bits whether its projections pack per block or once.
func TestPackOnceBF16IsGoBF16(t *testing.T) {
	be, err := backend.OpenWith("bf16", "go")
	if err != nil {
		t.Skip(err)
	}
	c := Config{Vocab: 64, DModel: 64, NLayers: 1, NHeads: 2, DFF: 176, SeqLen: 32, RopeTheta: 10000, NormEps: 1e-5}
	grads := func(be backend.Backend) []float32 {
		s, err := NewStage(c, Range{0, 1}, false, false, WithBackend(be))
		if err != nil {
			t.Fatal(err)
		}
		s.Init(1)
		rng := rand.New(rand.NewPCG(1, 1))
		x, dout := randVec(rng, 8*c.SeqLen*c.DModel, 1), randVec(rng, 8*c.SeqLen*c.DModel, 1e-3)
		tp := s.NewTape(8, c.SeqLen)
		s.ZeroGrads()
		s.Forward(tp, nil, x)
		s.Backward(tp, dout)
		return append([]float32(nil), s.Grads...)
	}
	want, got := grads(be), grads(packOnceBF16{be})
	for i := range want {
		if want[i] != got[i] {
			t.Fatalf("grad %d: %g packing once, %g per block", i, got[i], want[i])
		}
	}
}
