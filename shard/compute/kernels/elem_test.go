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

		// Scores and gradients of a plausible size for the softmax kernels.
		sc, dsc := make([]float32, n), make([]float32, n)
		for i := range sc {
			sc[i], dsc[i] = float32(rng.NormFloat64()*3), float32(rng.NormFloat64())
		}
		copy(got, sc)
		Softmax(got)
		copy(want, sc)
		withScalar(func() { Softmax(want) })
		sameBits(t, "softmax", got, want, sc)

		p := append([]float32(nil), got...)
		copy(got, dsc)
		SoftmaxBackward(got, p, 0.125)
		copy(want, dsc)
		withScalar(func() { SoftmaxBackward(want, p, 0.125) })
		sameBits(t, "softmax backward", got, want, dsc, p)

		d := []float32{Dot(x, y)}
		withScalar(func() { d = append(d, Dot(x, y)) })
		sameBits(t, "dot", d[:1], d[1:])

		RMSScale(got, y, z, 0.37)
		withScalar(func() { RMSScale(want, y, z, 0.37) })
		sameBits(t, "rms scale", got, want, y, z)

		dx0, dw0 := make([]float32, n), make([]float32, n)
		for i := range dx0 {
			dx0[i], dw0[i] = float32(rng.NormFloat64()), float32(rng.NormFloat64())
		}
		gdx, gdw := append([]float32(nil), dx0...), append([]float32(nil), dw0...)
		wdx, wdw := append([]float32(nil), dx0...), append([]float32(nil), dw0...)
		RMSNormBackwardRow(gdx, gdw, dsc, sc, y, 0.8)
		withScalar(func() { RMSNormBackwardRow(wdx, wdw, dsc, sc, y, 0.8) })
		sameBits(t, "rmsnorm backward dx", gdx, wdx, dsc, sc, y)
		sameBits(t, "rmsnorm backward dw", gdw, wdw, dsc, sc, y)

		copy(got, x)
		Scale(got, -1.5)
		copy(want, x)
		withScalar(func() { Scale(want, -1.5) })
		sameBits(t, "scale", got, want, x)
	}
}

func TestSoftmaxMatchesFloat64(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	for _, n := range []int{1, 2, 16, 31, 128, 1000} {
		x := make([]float32, n)
		for i := range x {
			x[i] = float32(rng.NormFloat64() * 5)
		}
		mx := math.Inf(-1)
		for _, v := range x {
			mx = math.Max(mx, float64(v))
		}
		var sum float64
		for _, v := range x {
			sum += math.Exp(float64(v) - mx)
		}
		got := append([]float32(nil), x...)
		Softmax(got)
		for i, v := range x {
			want := math.Exp(float64(v)-mx) / sum
			if d := math.Abs(float64(got[i]) - want); d > 1e-6*want+1e-9 {
				t.Fatalf("n=%d: softmax[%d] = %g, want %g", n, i, got[i], want)
			}
		}
	}
}
