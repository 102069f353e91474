package kernels

import (
	"math"
	"math/rand/v2"
	"testing"
)

// elemInputs covers the exponential's whole range and its edges: both clamps, the
// largest finite results, subnormal results, infinities and NaN, at every lane.
func elemInputs(rng *rand.Rand, n int) []float32 {
	edges := []float32{0, -0, 1, -1, 88.72, 88.7200001, 88.71, -87.33, -87.3300001, -87.32, 88.0, 88.5, -86.9,
		float32(math.Inf(1)), float32(math.Inf(-1)), float32(math.NaN()), 1e-30, -1e30, 1e30, 0.5 * math.Ln2, -0.5 * math.Ln2}
	x := make([]float32, n)
	for i := range x {
		switch {
		case i < len(edges):
			x[i] = edges[i]
		case i%3 == 0:
			x[i] = float32(rng.NormFloat64() * 4)
		default:
			x[i] = float32(rng.Float64()*190 - 95)
		}
	}
	rng.Shuffle(len(x), func(i, j int) { x[i], x[j] = x[j], x[i] })
	return x
}

func sameBits(t *testing.T, what string, got, want []float32, in ...[]float32) {
	t.Helper()
	for i := range want {
		if math.Float32bits(got[i]) != math.Float32bits(want[i]) && !(got[i] != got[i] && want[i] != want[i]) {
			var args []float32
			for _, s := range in {
				args = append(args, s[i])
			}
			t.Fatalf("%s[%d] of %v: vector %g (%#x), scalar %g (%#x)", what, i, args, got[i], math.Float32bits(got[i]), want[i], math.Float32bits(want[i]))
		}
	}
}

// withScalar runs f with the vector kernels off.
func withScalar(f func()) {
	old := vecAVX512
	vecAVX512 = false
	defer func() { vecAVX512 = old }()
	f()
}

func TestElementwiseVectorMatchesScalarBitForBit(t *testing.T) {
	if !vecAVX512 {
		t.Skip("no AVX-512 on this CPU: only the scalar loops run")
	}
	if fusedScalar {
		t.Skip("this build fuses the scalar loops' multiply-adds, so they round differently from the vector kernels")
	}
	rng := rand.New(rand.NewPCG(9, 10))
	for _, n := range []int{1, 15, 16, 17, 100, 4099} {
		x, y, z := elemInputs(rng, n), elemInputs(rng, n), elemInputs(rng, n)
		got, want := make([]float32, n), make([]float32, n)
		ExpTo(got, x)
		withScalar(func() { ExpTo(want, x) })
		sameBits(t, "exp", got, want, x)

		SwiGLU(got, x, y)
		withScalar(func() { SwiGLU(want, x, y) })
		sameBits(t, "swiglu", got, want, x, y)

		dg, du, wdg, wdu := make([]float32, n), make([]float32, n), make([]float32, n), make([]float32, n)
		SwiGLUBackward(dg, du, z, x, y)
		withScalar(func() { SwiGLUBackward(wdg, wdu, z, x, y) })
		sameBits(t, "swiglu dg", dg, wdg, z, x, y)
		sameBits(t, "swiglu du", du, wdu, z, x, y)
	}
}
