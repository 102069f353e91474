package backend

import (
	"errors"
	"math"
	"math/rand/v2"
	"testing"
)

func randn(rng *rand.Rand, n int) []float32 {
	x := make([]float32, n)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	return x
}

// relL2 is ‖got − want‖ / ‖want‖.
func relL2(got, want []float32) float64 {
	var num, den float64
	for i := range want {
		d := float64(got[i]) - float64(want[i])
		num += d * d
		den += float64(want[i]) * float64(want[i])
	}
	return math.Sqrt(num / den)
}

func upload(be Backend, v []float32) Buf {
	b := be.Alloc(len(v))
	be.Upload(b, v)
	return b
}

func download(be Backend, b Buf) []float32 {
	v := make([]float32, b.Len())
	be.Download(v, b)
	return v
}

func TestOpenNamesWhatToInstallOrWorks(t *testing.T) {
	for _, name := range Names {
		be, err := Open(name)
		if err != nil {
			if !errors.Is(err, ErrUnavailable) {
				t.Fatalf("Open(%q): %v, want ErrUnavailable", name, err)
			}
			if !contains(err.Error(), "apt-get install") {
				t.Fatalf("Open(bf16) = %v: the error should name the package to install", err)
			}
			continue
		}
		if be.Name() != name {
			t.Fatalf("Open(%q).Name() = %q", name, be.Name())
		}
		t.Logf("%s: %s", name, be.Describe())
	}
	if _, err := Open("fp64"); !errors.Is(err, ErrUnknown) {
		t.Fatalf("Open(fp64) = %v, want ErrUnknown", err)
	}
}

func contains(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}

// The bf16 backend's GEMMs round their inputs to 8 mantissa bits and accumulate in
// float32: against cpu32, a product of unit Gaussians over k terms is off by about
// 2⁻⁸·√2 relative, so 1% in L2 is a generous bound that a float32 product would also
// pass and a wrong transpose or block would not.
func TestBF16LinearMatchesCPU32WithinBF16Rounding(t *testing.T) {
	be, err := Open("bf16")
	if err != nil {
		t.Skip(err)
	}
	ref := CPU32()
	rng := rand.New(rand.NewPCG(1, 1))
	for _, sh := range [][3]int{{3, 5, 7}, {2048, 768, 256}, {100, 300, 40}, {64, 1000, 16}} {
		n, in, out := sh[0], sh[1], sh[2]
		x, w, dy := randn(rng, n*in), randn(rng, out*in), randn(rng, n*out)
		dx0 := randn(rng, n*in)
		run := func(be Backend) (y, dx, dw []float32) {
			yb, dxb, dwb := be.Alloc(n*out), upload(be, dx0), be.Alloc(out*in)
			xb, wb, dyb := upload(be, x), upload(be, w), upload(be, dy)
			be.Linear(yb, xb, wb, n, in, out)
			be.LinearBackward(dxb, dwb, dyb, xb, wb, n, in, out, true)
			return download(be, yb), download(be, dxb), download(be, dwb)
		}
		y1, dx1, dw1 := run(ref)
		y2, dx2, dw2 := run(be)
		for _, c := range []struct {
			name      string
			got, want []float32
		}{{"y", y2, y1}, {"dx", dx2, dx1}, {"dW", dw2, dw1}} {
			e := relL2(c.got, c.want)
			if e > 1e-2 || e == 0 && n > 3 {
				t.Fatalf("shape %v: %s relative L2 error %.3g against cpu32, want (0, 1e-2]", sh, c.name, e)
			}
		}
	}
}
