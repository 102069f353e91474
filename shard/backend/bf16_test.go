package backend

import (
	"math/rand/v2"
	"strings"
	"testing"
)

// Every GEMM shape a block uses (the projections both ways, the per-head attention
// products) gets one of oneDNN's optimised kernels, not its reference loops, which
// are correct but orders of magnitude slower.
func TestOneDNNPicksAnOptimisedKernelForEveryBlockGEMM(t *testing.T) {
	bf, err := OpenWith("bf16", "onednn")
	if err != nil {
		t.Skipf("oneDNN absent (apt-get install libdnnl2): %v", err)
	}
	f32, err := OpenWith("cpu32", "onednn")
	if err != nil {
		t.Fatal(err)
	}
	b, seq, heads, hd, d, f := 4, 64, 4, 32, 128, 344
	n := b * seq
	rng := rand.New(rand.NewPCG(1, 1))
	for _, be := range []Backend{f32, bf} {
		qkv, att, p := upload(be, randn(rng, n*3*d)), be.Alloc(n*d), be.Alloc(b*heads*seq*seq)
		be.Attention(att, p, qkv, b, seq, heads, hd)
		be.AttentionBackward(be.Alloc(n*3*d), upload(be, randn(rng, n*d)), p, qkv, b, seq, heads, hd)
		for _, sh := range [][2]int{{d, 3 * d}, {d, d}, {d, 2 * f}, {f, d}} {
			x, w, y := upload(be, randn(rng, n*sh[0])), upload(be, randn(rng, sh[0]*sh[1])), be.Alloc(n*sh[1])
			be.Linear(y, x, w, n, sh[0], sh[1])
			be.LinearBackward(be.Alloc(n*sh[0]), be.Alloc(sh[0]*sh[1]), y, x, w, n, sh[0], sh[1], false)
		}
	}
	for k, m := range bf.GEMM().dnnl.Matmuls() {
		if strings.HasPrefix(m.Impl, "ref") || m.Impl == "" {
			t.Errorf("matmul %+v runs on %q", k, m.Impl)
		} else {
			t.Logf("bf16=%v %dx%dx%d tA=%v tB=%v: %s", k.BF16, k.M, k.N, k.K, k.TransA, k.TransB, m.Impl)
		}
	}
}
