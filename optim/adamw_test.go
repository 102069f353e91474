package optim

import (
	"errors"
	"math"
	"math/rand/v2"
	"strings"
	"testing"
)

// refAdamW is an independent float64 AdamW written straight from the formula in
// the Step doc comment.
type refAdamW struct {
	b1, b2, eps, wd float64
	decay           []bool
	m, v            []float64
	t               int
}

func (r *refAdamW) step(p []float64, g []float32, lr float64) {
	r.t++
	for i := range p {
		if r.decay[i] {
			p[i] -= lr * r.wd * p[i]
		}
		gi := float64(g[i])
		r.m[i] = r.b1*r.m[i] + (1-r.b1)*gi
		r.v[i] = r.b2*r.v[i] + (1-r.b2)*gi*gi
		mhat := r.m[i] / (1 - math.Pow(r.b1, float64(r.t)))
		vhat := r.v[i] / (1 - math.Pow(r.b2, float64(r.t)))
		p[i] -= lr * mhat / (math.Sqrt(vhat) + r.eps)
	}
}

func closeRel(got, want, tol float64) bool {
	return math.Abs(got-want) <= tol*math.Max(1, math.Abs(want))
}

func TestAdamWMatchesFormulaForThreeSteps(t *testing.T) {
	cfg := AdamWConfig{Beta1: 0.9, Beta2: 0.95, Eps: 1e-8, WeightDecay: 0.1, Decay: []Segment{{Off: 1, Len: 2}}}
	p := []float32{1, -2, 0.5, 3, -0.25}
	grads := [][]float32{
		{0.5, -1, 2, 0, 1e-3},
		{-1, 0.3, 2, 0.7, -1e-3},
		{0.25, 0.3, -4, -0.7, 5},
	}
	lrs := []float32{0.1, 0.05, 0.01}

	o, err := NewAdamW(len(p), cfg)
	if err != nil {
		t.Fatal(err)
	}
	ref := &refAdamW{b1: 0.9, b2: 0.95, eps: 1e-8, wd: 0.1,
		decay: []bool{false, true, true, false, false},
		m:     make([]float64, len(p)), v: make([]float64, len(p))}
	want := make([]float64, len(p))
	for i, x := range p {
		want[i] = float64(x)
	}
	for s := range grads {
		o.Step(p, grads[s], lrs[s])
		// The reference runs in float64 from the float32 hyperparameters the
		// optimiser actually holds.
		ref.b1, ref.b2, ref.eps, ref.wd = float64(cfg.Beta1), float64(cfg.Beta2), float64(cfg.Eps), float64(cfg.WeightDecay)
		ref.step(want, grads[s], float64(lrs[s]))
		m, v := o.Moments()
		for i := range p {
			if !closeRel(float64(p[i]), want[i], 1e-6) {
				t.Errorf("step %d: p[%d] = %.9g, want %.9g", s+1, i, p[i], want[i])
			}
			if !closeRel(float64(m[i]), ref.m[i], 1e-6) || !closeRel(float64(v[i]), ref.v[i], 1e-6) {
				t.Errorf("step %d: m[%d], v[%d] = %g, %g, want %g, %g", s+1, i, i, m[i], v[i], ref.m[i], ref.v[i])
			}
		}
	}
	if o.StepCount() != 3 {
		t.Errorf("StepCount() = %d, want 3", o.StepCount())
	}
}

func TestAdamWFirstStepsMatchHandComputedValues(t *testing.T) {
	// p = 1, lr = 0.1, wd = 0.1, β = (0.9, 0.95).
	// Step 1, g = 0.5: decay gives 0.99; m̂ = 0.05/0.1 = 0.5, v̂ = 0.0125/0.05 = 0.25,
	// so the step is lr·0.5/0.5 = 0.1 (the first AdamW step is lr·sign(g)): p = 0.89.
	// Step 2, g = -1: decay gives 0.8811; m = 0.045-0.1 = -0.055, v = 0.011875+0.05 =
	// 0.061875; m̂ = -0.055/0.19, v̂ = 0.061875/0.0975; p = 0.8811 + 0.1·0.289474/0.796627
	// = 0.9174374.
	o, err := NewAdamW(1, DefaultAdamW())
	if err != nil {
		t.Fatal(err)
	}
	p := []float32{1}
	for i, tc := range []struct{ g, p, m, v float64 }{
		{g: 0.5, p: 0.89, m: 0.05, v: 0.0125},
		{g: -1, p: 0.9174374, m: -0.055, v: 0.061875},
	} {
		o.Step(p, []float32{float32(tc.g)}, 0.1)
		m, v := o.Moments()
		if !closeRel(float64(p[0]), tc.p, 1e-6) || !closeRel(float64(m[0]), tc.m, 1e-6) || !closeRel(float64(v[0]), tc.v, 1e-6) {
			t.Errorf("step %d: p, m, v = %.8g, %.8g, %.8g, want %.8g, %.8g, %.8g", i+1, p[0], m[0], v[0], tc.p, tc.m, tc.v)
		}
	}
}

func TestAdamWDecaysOnlyInsideDecaySegments(t *testing.T) {
	const lr, wd = 0.5, 0.1 // keep factor 1-lr·wd = 0.95
	for _, tc := range []struct {
		name  string
		decay []Segment
		want  []float32 // p after one step with zero gradient, from p = 1
	}{
		{"nil decays everything", nil, []float32{0.95, 0.95, 0.95, 0.95, 0.95, 0.95}},
		{"empty decays nothing", []Segment{}, []float32{1, 1, 1, 1, 1, 1}},
		{"middle", []Segment{{Off: 2, Len: 2}}, []float32{1, 1, 0.95, 0.95, 1, 1}},
		{"unsorted ends", []Segment{{Off: 5, Len: 1}, {Off: 0, Len: 1}}, []float32{0.95, 1, 1, 1, 1, 0.95}},
		{"adjacent and empty", []Segment{{Off: 1, Len: 1}, {Off: 3, Len: 0}, {Off: 2, Len: 1}}, []float32{1, 0.95, 0.95, 1, 1, 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o, err := NewAdamW(6, AdamWConfig{Beta1: 0.9, Beta2: 0.95, Eps: 1e-8, WeightDecay: wd, Decay: tc.decay})
			if err != nil {
				t.Fatal(err)
			}
			p := []float32{1, 1, 1, 1, 1, 1}
			// A zero gradient leaves m = v = 0, so the Adam part moves nothing and
			// only the decay shows.
			o.Step(p, make([]float32, 6), lr)
			for i := range p {
				if p[i] != tc.want[i] {
					t.Errorf("p = %v, want %v", p, tc.want)
					break
				}
			}
		})
	}
}

func TestAdamWConfigValidateNamesTheBadField(t *testing.T) {
	nan := float32(math.NaN())
	inf := float32(math.Inf(1))
	for _, tc := range []struct {
		field string
		edit  func(*AdamWConfig)
	}{
		{"beta1", func(c *AdamWConfig) { c.Beta1 = 1.2 }},
		{"beta1", func(c *AdamWConfig) { c.Beta1 = 1 }},
		{"beta1", func(c *AdamWConfig) { c.Beta1 = -0.1 }},
		{"beta1", func(c *AdamWConfig) { c.Beta1 = nan }},
		{"beta2", func(c *AdamWConfig) { c.Beta2 = 1 }},
		{"beta2", func(c *AdamWConfig) { c.Beta2 = nan }},
		{"eps", func(c *AdamWConfig) { c.Eps = 0 }},
		{"eps", func(c *AdamWConfig) { c.Eps = inf }},
		{"weight_decay", func(c *AdamWConfig) { c.WeightDecay = -0.1 }},
		{"weight_decay", func(c *AdamWConfig) { c.WeightDecay = nan }},
	} {
		c := DefaultAdamW()
		tc.edit(&c)
		err := c.Validate()
		var fe *FieldError
		if !errors.As(err, &fe) || fe.Field != tc.field || !errors.Is(err, ErrInvalid) {
			t.Errorf("Validate(%+v) = %v, want a FieldError for %s", c, err, tc.field)
			continue
		}
		if !strings.HasPrefix(err.Error(), "optim: "+tc.field+" = ") {
			t.Errorf("error %q does not start by naming %s", err, tc.field)
		}
	}
	if err := DefaultAdamW().Validate(); err != nil {
		t.Errorf("DefaultAdamW().Validate() = %v", err)
	}
	c := DefaultAdamW()
	c.Beta1 = 1.2
	if got, want := c.Validate().Error(), "optim: beta1 = 1.2, want 0 <= beta1 < 1"; got != want {
		t.Errorf("error = %q, want %q", got, want)
	}
}

func TestNewAdamWRejectsOverlappingOrOutOfRangeSegments(t *testing.T) {
	for _, tc := range []struct {
		name  string
		n     int
		decay []Segment
		field string
	}{
		{"negative n", -1, nil, "n"},
		{"negative offset", 10, []Segment{{Off: -1, Len: 2}}, "decay[0]"},
		{"negative length", 10, []Segment{{Off: 2, Len: -1}}, "decay[0]"},
		{"past the end", 10, []Segment{{Off: 0, Len: 4}, {Off: 8, Len: 3}}, "decay[1]"},
		{"huge length", 10, []Segment{{Off: 1, Len: math.MaxInt}}, "decay[0]"},
		{"overlap", 10, []Segment{{Off: 0, Len: 4}, {Off: 3, Len: 2}}, "decay[1]"},
		{"overlap unsorted", 10, []Segment{{Off: 6, Len: 2}, {Off: 2, Len: 3}, {Off: 4, Len: 3}}, "decay[2]"},
		{"duplicate", 10, []Segment{{Off: 2, Len: 3}, {Off: 2, Len: 3}}, "decay[1]"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := DefaultAdamW()
			cfg.Decay = tc.decay
			o, err := NewAdamW(tc.n, cfg)
			var fe *FieldError
			if !errors.As(err, &fe) || fe.Field != tc.field {
				t.Fatalf("NewAdamW(%d, decay %v) = %v, %v, want a FieldError for %s", tc.n, tc.decay, o, err, tc.field)
			}
		})
	}
	cfg := DefaultAdamW()
	cfg.Beta2 = 2
	if _, err := NewAdamW(4, cfg); err == nil {
		t.Error("NewAdamW accepted beta2 = 2")
	}
	cfg = DefaultAdamW()
	cfg.Decay = []Segment{{Off: 0, Len: 4}, {Off: 4, Len: 6}, {Off: 10, Len: 0}}
	if _, err := NewAdamW(10, cfg); err != nil {
		t.Errorf("NewAdamW rejected adjacent segments that tile the buffer: %v", err)
	}
}

func TestAdamWResumesBitForBitFromSetState(t *testing.T) {
	const n = 37
	rng := rand.New(rand.NewPCG(1, 2))
	grads := make([][]float32, 6)
	for s := range grads {
		grads[s] = randVec(rng, n)
	}
	cfg := DefaultAdamW()
	cfg.Decay = []Segment{{Off: 5, Len: 20}}
	p0 := randVec(rng, n)

	a, _ := NewAdamW(n, cfg)
	pa := append([]float32(nil), p0...)
	var ckT int
	var ckP, ckM, ckV []float32
	for s, g := range grads {
		if s == 3 {
			m, v := a.Moments()
			ckT, ckP, ckM, ckV = a.StepCount(), append([]float32(nil), pa...), append([]float32(nil), m...), append([]float32(nil), v...)
		}
		a.Step(pa, g, 1e-2)
	}

	b, _ := NewAdamW(n, cfg)
	if err := b.SetState(ckT, ckM, ckV); err != nil {
		t.Fatal(err)
	}
	ckM[0]++ // SetState copies: later changes to the checkpoint must not leak in.
	for _, g := range grads[3:] {
		b.Step(ckP, g, 1e-2)
	}
	for i := range pa {
		if pa[i] != ckP[i] {
			t.Fatalf("resumed p[%d] = %v, uninterrupted %v", i, ckP[i], pa[i])
		}
	}
	if a.StepCount() != b.StepCount() {
		t.Errorf("StepCount = %d, want %d", b.StepCount(), a.StepCount())
	}
}

func TestAdamWSetStateRejectsBadStateAndKeepsOld(t *testing.T) {
	o, _ := NewAdamW(3, DefaultAdamW())
	o.Step([]float32{1, 2, 3}, []float32{1, 1, 1}, 0.1)
	for _, tc := range []struct {
		t     int
		m, v  []float32
		field string
	}{
		{-1, make([]float32, 3), make([]float32, 3), "t"},
		{5, make([]float32, 2), make([]float32, 3), "len(m)"},
		{5, make([]float32, 3), make([]float32, 4), "len(v)"},
	} {
		err := o.SetState(tc.t, tc.m, tc.v)
		var fe *FieldError
		if !errors.As(err, &fe) || fe.Field != tc.field {
			t.Errorf("SetState(%d, len %d, len %d) = %v, want a FieldError for %s", tc.t, len(tc.m), len(tc.v), err, tc.field)
		}
	}
	if m, _ := o.Moments(); o.StepCount() != 1 || m[0] == 0 {
		t.Errorf("failed SetState changed the state: t = %d, m = %v", o.StepCount(), m)
	}
}

func TestAdamWStepPanicsOnLengthMismatch(t *testing.T) {
	o, _ := NewAdamW(4, DefaultAdamW())
	for _, tc := range []struct{ np, ng int }{{3, 4}, {4, 5}, {0, 0}} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("Step with len(params) = %d, len(grads) = %d did not panic", tc.np, tc.ng)
				}
			}()
			o.Step(make([]float32, tc.np), make([]float32, tc.ng), 0.1)
		}()
	}
}

func TestAdamWStepDoesNotAllocate(t *testing.T) {
	cfg := DefaultAdamW()
	cfg.Decay = []Segment{{Off: 10, Len: 100}, {Off: 500, Len: 100}}
	o, _ := NewAdamW(1000, cfg)
	p, g := make([]float32, 1000), make([]float32, 1000)
	if allocs := testing.AllocsPerRun(10, func() { o.Step(p, g, 1e-3) }); allocs != 0 {
		t.Errorf("Step allocates %v times, want 0", allocs)
	}
}

func randVec(rng *rand.Rand, n int) []float32 {
	x := make([]float32, n)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	return x
}

func BenchmarkAdamWStep(b *testing.B) {
	const n = 1 << 20
	rng := rand.New(rand.NewPCG(1, 2))
	p, g := randVec(rng, n), randVec(rng, n)
	cfg := DefaultAdamW()
	cfg.Decay = []Segment{{Off: 0, Len: n / 2}, {Off: n/2 + 1024, Len: n/2 - 1024}}
	o, err := NewAdamW(n, cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(7 * 4 * n) // reads p, g, m, v; writes p, m, v
	for b.Loop() {
		o.Step(p, g, 1e-4)
	}
}
