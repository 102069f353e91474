//go:build amd64 && !amd64.v3 && !amd64.v4 && !purego

package optim

import (
	"math"
	"math/rand/v2"
	"testing"
)

// The vector AdamW does the scalar loop's float32 operations in the same order, so
// the two agree bit for bit. (From GOAMD64=v3 the compiler fuses the scalar loop's
// multiply-adds, which then rounds differently: the build tags leave that out.)
func TestAdamWVectorMatchesScalarBitForBit(t *testing.T) {
	if !vecAVX512 {
		t.Skip("no AVX-512 on this CPU: only the scalar loop runs")
	}
	const n = 1000 // spans below cross blocks of 16 at odd places
	decay := []Segment{{Off: 3, Len: 500}, {Off: 611, Len: 17}}
	cfg := DefaultAdamW()
	cfg.Decay = decay
	run := func(vec bool) (p, m, v []float32) {
		old := vecAVX512
		vecAVX512 = vec
		defer func() { vecAVX512 = old }()
		o, err := NewAdamW(n, cfg)
		if err != nil {
			t.Fatal(err)
		}
		r := rand.New(rand.NewPCG(1, 2))
		p = make([]float32, n)
		for i := range p {
			p[i] = float32(r.NormFloat64())
		}
		g := make([]float32, n)
		for range 5 {
			for i := range g {
				g[i] = float32(r.NormFloat64() * math.Pow(10, float64(r.IntN(9)-6)))
			}
			g[7], g[100] = 0, -0
			o.Step(p, g, 3e-3)
		}
		m, v = o.Moments()
		return p, m, v
	}
	vp, vm, vv := run(true)
	sp, sm, sv := run(false)
	for name, pair := range map[string][2][]float32{"params": {vp, sp}, "m": {vm, sm}, "v": {vv, sv}} {
		for i := range pair[0] {
			if math.Float32bits(pair[0][i]) != math.Float32bits(pair[1][i]) {
				t.Fatalf("%s[%d]: vector %g, scalar %g", name, i, pair[0][i], pair[1][i])
			}
		}
	}
}
