package backend

import (
	"math/rand/v2"
	"runtime"
	"testing"

	"github.com/pipeswarm/pipeswarm/shard/compute"
)

// BenchmarkGemmProjection times the block benchmark's largest projection (gate|up:
// 2048 tokens × 256 → 1376) on one goroutine with each GEMM provider available here,
// float32, and oneDNN's bf16 matmul.
func BenchmarkGemmProjection(b *testing.B) {
	const m, n, k = 2048, 1376, 256
	rng := rand.New(rand.NewPCG(1, 2))
	x, w, c := randn(rng, m*k), randn(rng, n*k), make([]float32, m*n)
	compute.SetWorkers(1)
	defer compute.SetWorkers(0)
	report := func(b *testing.B) {
		b.ReportMetric(2*m*n*k/(b.Elapsed().Seconds()/float64(b.N))/1e9, "GFLOP/s")
	}
	for _, p := range providers {
		b.Run(p.name+"-fp32", func(b *testing.B) {
			g, err := OpenGEMM(p.name)
			if err != nil {
				b.Skip(err)
			}
			for b.Loop() {
				compute.GemmWith(g.sgemm, false, true, m, n, k, 1, x, k, w, k, 0, c, n)
			}
			report(b)
		})
	}
	b.Run("onednn-bf16", func(b *testing.B) {
		be, err := OpenWith("bf16", "onednn")
		if err != nil {
			b.Skip(err)
		}
		for b.Loop() {
			be.(*bf16).gemm(true, false, true, m, n, k, 1, x, k, w, k, 0, c, n)
		}
		report(b)
	})
}

// BenchmarkGemmBlockShapes times, on one goroutine, the block's three float32
// products of its widest projection (d_model 256, gate|up 1376, 2048 tokens) with each
// GEMM provider available here: the forward y = x·Wᵀ, the weight gradient
// dW += dyᵀ·x and the input gradient dx = dy·W, each cut into compute.Blocks's blocks
// as a training step cuts it. GFLOP/cpu-s counts the thread's CPU time instead of the
// wall time, for busy machines.
func BenchmarkGemmBlockShapes(b *testing.B) {
	const tokens, in, out = 2048, 256, 1376
	rng := rand.New(rand.NewPCG(1, 2))
	x, w, dy := randn(rng, tokens*in), randn(rng, out*in), randn(rng, tokens*out)
	y, dw, dx := make([]float32, tokens*out), make([]float32, out*in), make([]float32, tokens*in)
	compute.SetWorkers(1)
	defer compute.SetWorkers(0)
	shapes := []struct {
		name string
		run  func(g compute.SgemmFunc)
	}{
		{"forward", func(g compute.SgemmFunc) {
			compute.GemmWith(g, false, true, tokens, out, in, 1, x, in, w, in, 0, y, out)
		}},
		{"dW", func(g compute.SgemmFunc) {
			compute.GemmWith(g, true, false, out, in, tokens, 1, dy, out, x, in, 1, dw, in)
		}},
		{"dx", func(g compute.SgemmFunc) {
			compute.GemmWith(g, false, false, tokens, in, out, 1, dy, out, w, in, 0, dx, in)
		}},
	}
	for _, sh := range shapes {
		for _, p := range providers {
			b.Run(sh.name+"/"+p.name, func(b *testing.B) {
				g, err := OpenGEMM(p.name)
				if err != nil {
					b.Skip(err)
				}
				// One OS thread does all the work (one worker), so its CPU time is the
				// product's.
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
				cpu0, cpuOK := threadCPUTime()
				for b.Loop() {
					sh.run(g.sgemm)
				}
				b.ReportMetric(2*tokens*in*out/(b.Elapsed().Seconds()/float64(b.N))/1e9, "GFLOP/s")
				if cpu1, ok := threadCPUTime(); ok && cpuOK && cpu1 > cpu0 {
					b.ReportMetric(2*tokens*in*out/((cpu1-cpu0).Seconds()/float64(b.N))/1e9, "GFLOP/cpu-s")
				}
			})
		}
	}
}

func BenchmarkToBF16(b *testing.B) {
	rng := rand.New(rand.NewPCG(1, 2))
	x := randn(rng, 2048*256)
	d := make([]uint16, len(x))
	for b.Loop() {
		toBF16(d, x, 2048, 256, 256, false)
	}
	b.SetBytes(int64(len(x) * 4))
}
