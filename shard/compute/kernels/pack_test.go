package kernels

import (
	"math"
	"math/rand/v2"
	"testing"
)

// Every kernel's packing routines are copies: they must give the plain-Go packers'
// panels exactly, zero padding included, whatever was in the buffer before.
func TestPackersMatchThePlainGoOnes(t *testing.T) {
	rng := rand.New(rand.NewPCG(15, 16))
	for _, kern := range kernels() {
		for _, w := range []int{kern.mr, kern.nr} {
			for range 200 {
				n, kc := 1+rng.IntN(w), 1+rng.IntN(40)
				ld := kc + rng.IntN(5)
				src := randSlice(rng, n*ld)
				got, want := randSlice(rng, w*kc), randSlice(rng, w*kc)
				kern.packT(got, w, src, ld, n, kc)
				packTGo(want, w, src, ld, n, kc)
				samePanel(t, kern.isa+" packT", got, want, w, n, kc)

				n = 1 + rng.IntN(3*w)
				ld = n + rng.IntN(5)
				src = randSlice(rng, kc*ld)
				panels := (n + w - 1) / w
				got, want = randSlice(rng, panels*w*kc), randSlice(rng, panels*w*kc)
				kern.packRows(got, w, src, ld, n, kc)
				packRowsGo(want, w, src, ld, n, kc)
				samePanel(t, kern.isa+" packRows", got, want, w, n, kc)
			}
		}
	}
}

func samePanel(t *testing.T, what string, got, want []float32, w, n, kc int) {
	t.Helper()
	for i := range want {
		if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
			t.Fatalf("%s (w=%d n=%d kc=%d): [%d] = %g, want %g", what, w, n, kc, i, got[i], want[i])
		}
	}
}
