package shard

import (
	"encoding/json"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/optim"
	"github.com/pipeswarm/pipeswarm/shard/backend"
)

// blockBenchConfig is the shape the issue compares against PyTorch: one block,
// d_model 256, 4 heads, SwiGLU 688, batch 16 × seq 128.
var blockBenchConfig = Config{Vocab: 256, DModel: 256, NLayers: 1, NHeads: 4, DFF: 688, SeqLen: 128, RopeTheta: 10000, NormEps: 1e-5}

// blockFlops is the matmul work of one forward+backward of a block: 3× the forward's
// 2·N·params for the projections, plus causal-agnostic attention (QKᵀ and PV, ×3).
func blockFlops(c Config, b int) float64 {
	n := float64(b * c.SeqLen)
	d, f, t := float64(c.DModel), float64(c.DFF), float64(c.SeqLen)
	proj := 2 * n * (4*d*d + 3*d*f)
	attn := 2 * 2 * n * t * d
	return 3 * (proj + attn)
}

func BenchmarkBlockForwardBackward(b *testing.B) {
	c := blockBenchConfig
	s, err := NewStage(c, Range{0, 1}, false, false)
	if err != nil {
		b.Fatal(err)
	}
	s.Init(1)
	rng := rand.New(rand.NewPCG(1, 1))
	batch := 16
	x, dout := randVec(rng, batch*c.SeqLen*c.DModel, 1), randVec(rng, batch*c.SeqLen*c.DModel, 1e-3)
	tp := s.NewTape(batch, c.SeqLen)
	for b.Loop() {
		s.Forward(tp, nil, x)
		s.Backward(tp, dout)
	}
	b.ReportMetric(blockFlops(c, batch)/(b.Elapsed().Seconds()/float64(b.N))/1e9, "GFLOP/s")
}

// BenchmarkBlockTrainStep times forward + backward + AdamW of one block on the
// issue's shapes on each backend (cpu32, bf16) with each GEMM provider available
// (cpu32/go, cpu32/onednn, cpu32/openblas, bf16/go, ...), and in the same run the PyTorch
// reference (bench/block_step.py, Debian python3-torch, 2 threads,
// OMP_WAIT_POLICY=PASSIVE), fp32 and with bf16 autocast, on the same shapes. Each
// reports its median step.
func BenchmarkBlockTrainStep(b *testing.B) {
	for _, name := range backend.Names {
		for _, g := range backend.GEMMNames[1:] {
			b.Run(name+"/"+g, func(b *testing.B) { benchBlockTrainStep(b, name, g) })
		}
	}
	for _, arm := range []struct {
		name string
		args []string
	}{{"pytorch-fp32", nil}, {"pytorch-bf16", []string{"--bf16"}}} {
		b.Run(arm.name, func(b *testing.B) { benchPyTorchBlockStep(b, arm.args) })
	}
}

func benchBlockTrainStep(b *testing.B, name, gemm string) {
	be, err := backend.OpenWith(name, gemm)
	if err != nil {
		b.Skip(err)
	}
	benchBlockTrainStepOn(b, be)
}

func benchBlockTrainStepOn(b *testing.B, be backend.Backend) {
	c := blockBenchConfig
	s, err := NewStage(c, Range{0, 1}, false, false, WithBackend(be))
	if err != nil {
		b.Fatal(err)
	}
	s.Init(1)
	var decay []optim.Segment
	for _, t := range s.Tensors() {
		if t.Decay {
			decay = append(decay, optim.Segment{Off: t.Off, Len: t.Len()})
		}
	}
	cfg := optim.DefaultAdamW()
	cfg.Decay = decay
	opt, err := optim.NewAdamW(len(s.Params), cfg)
	if err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 1))
	batch := 16
	x, dout := randVec(rng, batch*c.SeqLen*c.DModel, 1), randVec(rng, batch*c.SeqLen*c.DModel, 1e-3)
	tp := s.NewTape(batch, c.SeqLen)
	var times []time.Duration
	for b.Loop() {
		t0 := time.Now()
		s.ZeroGrads()
		s.Forward(tp, nil, x)
		s.Backward(tp, dout)
		opt.Step(s.Params, s.Grads, 1e-3)
		times = append(times, time.Since(t0))
	}
	med := median(times)
	b.ReportMetric(float64(med.Microseconds())/1e3, "median-ms")
	b.ReportMetric(blockFlops(c, batch)/med.Seconds()/1e9, "GFLOP/s")
}

func benchPyTorchBlockStep(b *testing.B, args []string) {
	py := "/usr/bin/python3"
	if err := exec.Command(py, "-c", "import torch").Run(); err != nil {
		b.Skipf("no PyTorch reference: %s cannot import torch (apt-get install python3-torch): %v", py, err)
	}
	// One run of the script is the measurement; its own median replaces ns/op.
	// PyTorch at its best on 2 cores: OpenMP threads sleep instead of spinning.
	cmd := exec.Command(py, append([]string{"../bench/block_step.py", "--threads", "2", "--steps", "30"}, args...)...)
	cmd.Env = append(os.Environ(), "OMP_WAIT_POLICY=PASSIVE")
	out, err := cmd.Output()
	if err != nil {
		b.Fatalf("bench/block_step.py: %v", err)
	}
	var r struct {
		MedianMS float64 `json:"median_ms"`
		GFLOPS   float64 `json:"gflops"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		b.Fatalf("bench/block_step.py printed %q: %v", out, err)
	}
	b.ReportMetric(r.MedianMS*1e6, "ns/op")
	b.ReportMetric(r.MedianMS, "median-ms")
	b.ReportMetric(r.GFLOPS, "GFLOP/s")
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}
