package optim

import (
	"math"
	"testing"
)

// objective is a test function with a known minimiser: grad writes ∇f(x) into g.
type objective struct {
	name string
	x0   []float32
	min  []float64
	grad func(g, x []float32)
}

// quadratic is f(x) = Σ a_i (x_i - c_i)², with curvatures spread over 20× so a
// single step size does not suit every coordinate.
func quadratic() objective {
	a := []float64{0.05, 0.1, 0.3, 0.5, 1}
	c := []float64{1, -2, 3, 0.5, -0.25}
	return objective{
		name: "quadratic",
		x0:   []float32{0, 0, 0, 0, 0},
		min:  c,
		grad: func(g, x []float32) {
			for i := range x {
				g[i] = float32(2 * a[i] * (float64(x[i]) - c[i]))
			}
		},
	}
}

// rosenbrock is f(x, y) = (1-x)² + 100(y-x²)², minimum at (1, 1), from the classic
// start (-1.2, 1).
func rosenbrock() objective {
	return objective{
		name: "rosenbrock",
		x0:   []float32{-1.2, 1},
		min:  []float64{1, 1},
		grad: func(g, p []float32) {
			x, y := float64(p[0]), float64(p[1])
			g[0] = float32(-2*(1-x) - 400*x*(y-x*x))
			g[1] = float32(200 * (y - x*x))
		},
	}
}

func maxErr(x []float32, want []float64) float64 {
	var e float64
	for i := range x {
		e = math.Max(e, math.Abs(float64(x[i])-want[i]))
	}
	return e
}

func TestAdamWConvergesToMinimum(t *testing.T) {
	for _, tc := range []struct {
		f     objective
		sched Cosine
		tol   float64
	}{
		{quadratic(), Cosine{Peak: 0.1, Min: 1e-4, Warmup: 10, Total: 2000}, 1e-4},
		{rosenbrock(), Cosine{Peak: 0.02, Min: 1e-5, Warmup: 50, Total: 20000}, 1e-4},
	} {
		t.Run(tc.f.name, func(t *testing.T) {
			cfg := DefaultAdamW()
			cfg.WeightDecay = 0 // decay would move the minimum towards 0
			x := append([]float32(nil), tc.f.x0...)
			g := make([]float32, len(x))
			o, err := NewAdamW(len(x), cfg)
			if err != nil {
				t.Fatal(err)
			}
			for s := range tc.sched.Total {
				tc.f.grad(g, x)
				o.Step(x, g, tc.sched.At(s))
			}
			if e := maxErr(x, tc.f.min); e > tc.tol {
				t.Errorf("after %d steps x = %v, want %v within %g (off by %g)", tc.sched.Total, x, tc.f.min, tc.tol, e)
			}
		})
	}
}

func TestNesterovConvergesToMinimum(t *testing.T) {
	for _, tc := range []struct {
		f     objective
		cfg   NesterovConfig
		steps int
		tol   float64
	}{
		{quadratic(), NesterovConfig{LR: 0.3, Momentum: 0.9}, 1000, 1e-5},
		{rosenbrock(), NesterovConfig{LR: 1e-3, Momentum: 0.9}, 20000, 1e-4},
	} {
		t.Run(tc.f.name, func(t *testing.T) {
			x := append([]float32(nil), tc.f.x0...)
			g := make([]float32, len(x))
			o, err := NewNesterov(len(x), tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			for range tc.steps {
				tc.f.grad(g, x)
				o.Step(x, g)
			}
			if e := maxErr(x, tc.f.min); e > tc.tol {
				t.Errorf("after %d steps x = %v, want %v within %g (off by %g)", tc.steps, x, tc.f.min, tc.tol, e)
			}
		})
	}
}
