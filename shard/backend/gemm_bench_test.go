package backend

import (
	"math/rand/v2"
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

func BenchmarkToBF16(b *testing.B) {
	rng := rand.New(rand.NewPCG(1, 2))
	x := randn(rng, 2048*256)
	d := make([]uint16, len(x))
	for b.Loop() {
		toBF16(d, x, 2048, 256, 256, false)
	}
	b.SetBytes(int64(len(x) * 4))
}
