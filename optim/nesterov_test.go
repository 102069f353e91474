package optim

import (
	"errors"
	"math"
	"testing"
)

func TestNesterovFirstTwoStepsMatchHandComputedValues(t *testing.T) {
	// lr 0.7, μ 0.9, p = 1.
	// Step 1, g = 0.5: buf = 0.5 (PyTorch's buf = g); p = 1 - 0.7·(0.5 + 0.45) = 0.335.
	// Step 2, g = -1: buf = 0.45 - 1 = -0.55; p = 0.335 - 0.7·(-1 - 0.495) = 1.3815.
	o, err := NewNesterov(2, DefaultNesterov())
	if err != nil {
		t.Fatal(err)
	}
	p := []float32{1, -3}
	for i, tc := range []struct {
		g, p, buf [2]float32
	}{
		{g: [2]float32{0.5, 0}, p: [2]float32{0.335, -3}, buf: [2]float32{0.5, 0}},
		{g: [2]float32{-1, 2}, p: [2]float32{1.3815, -3 - 0.7*(2+0.9*2)}, buf: [2]float32{-0.55, 2}},
	} {
		o.Step(p, tc.g[:])
		for j := range p {
			if math.Abs(float64(p[j]-tc.p[j])) > 1e-6 || math.Abs(float64(o.Momentum()[j]-tc.buf[j])) > 1e-6 {
				t.Errorf("step %d: p, buf = %v, %v, want %v, %v", i+1, p, o.Momentum(), tc.p, tc.buf)
				break
			}
		}
	}
}

func TestNesterovResumesFromRestoredMomentum(t *testing.T) {
	cfg := NesterovConfig{LR: 0.5, Momentum: 0.8}
	gs := [][]float32{{1, -2}, {0.5, 0.25}, {-1, 3}}
	a, _ := NewNesterov(2, cfg)
	pa := []float32{1, 2}
	a.Step(pa, gs[0])
	pb := append([]float32(nil), pa...)
	b, _ := NewNesterov(2, cfg)
	copy(b.Momentum(), a.Momentum()) // checkpoint = the buffer alone
	for _, g := range gs[1:] {
		a.Step(pa, g)
		b.Step(pb, g)
	}
	if pa[0] != pb[0] || pa[1] != pb[1] {
		t.Errorf("resumed p = %v, uninterrupted %v", pb, pa)
	}
}

func TestNesterovValidateNamesTheBadField(t *testing.T) {
	for _, tc := range []struct {
		cfg   NesterovConfig
		field string
	}{
		{NesterovConfig{LR: 0, Momentum: 0.9}, "lr"},
		{NesterovConfig{LR: -1, Momentum: 0.9}, "lr"},
		{NesterovConfig{LR: float32(math.Inf(1)), Momentum: 0.9}, "lr"},
		{NesterovConfig{LR: 0.7, Momentum: 1}, "momentum"},
		{NesterovConfig{LR: 0.7, Momentum: -0.1}, "momentum"},
		{NesterovConfig{LR: 0.7, Momentum: float32(math.NaN())}, "momentum"},
	} {
		var fe *FieldError
		if err := tc.cfg.Validate(); !errors.As(err, &fe) || fe.Field != tc.field {
			t.Errorf("Validate(%+v) = %v, want a FieldError for %s", tc.cfg, err, tc.field)
		}
		if _, err := NewNesterov(3, tc.cfg); err == nil {
			t.Errorf("NewNesterov accepted %+v", tc.cfg)
		}
	}
	if err := DefaultNesterov().Validate(); err != nil {
		t.Errorf("DefaultNesterov().Validate() = %v", err)
	}
}

func TestNesterovStepPanicsOnLengthMismatch(t *testing.T) {
	o, _ := NewNesterov(3, DefaultNesterov())
	defer func() {
		if recover() == nil {
			t.Error("Step with a short pseudo-gradient did not panic")
		}
	}()
	o.Step(make([]float32, 3), make([]float32, 2))
}

func BenchmarkNesterovStep(b *testing.B) {
	const n = 1 << 20
	o, _ := NewNesterov(n, DefaultNesterov())
	p, g := make([]float32, n), make([]float32, n)
	b.SetBytes(5 * 4 * n) // reads p, g, buf; writes p, buf
	for b.Loop() {
		o.Step(p, g)
	}
}

func TestNesterovStepAtStepsOnlyItsFragment(t *testing.T) {
	whole, _ := NewNesterov(4, DefaultNesterov())
	parts, _ := NewNesterov(4, DefaultNesterov())
	pw := []float32{1, 2, 3, 4}
	pp := append([]float32(nil), pw...)
	g := []float32{0.5, -1, 2, 0.25}
	whole.Step(pw, g)
	parts.StepAt(2, pp[2:], g[2:])
	if pp[0] != 1 || pp[1] != 2 || parts.Momentum()[0] != 0 || parts.Momentum()[1] != 0 {
		t.Errorf("StepAt(2) touched the first fragment: p %v, buf %v", pp, parts.Momentum())
	}
	parts.StepAt(0, pp[:2], g[:2])
	for i := range pw {
		if pw[i] != pp[i] || whole.Momentum()[i] != parts.Momentum()[i] {
			t.Fatalf("two fragments stepped apart give p %v buf %v, one step %v %v", pp, parts.Momentum(), pw, whole.Momentum())
		}
	}
}

func TestPlainMomentumStepsByTheBuffer(t *testing.T) {
	// lr 1, μ 0.5: step 1 g=1: buf 1, p = 1-1 = 0; step 2 g=1: buf 1.5, p = -1.5.
	o, _ := NewNesterov(1, NesterovConfig{LR: 1, Momentum: 0.5, Plain: true})
	p := []float32{1}
	o.Step(p, []float32{1})
	o.Step(p, []float32{1})
	if p[0] != -1.5 || o.Momentum()[0] != 1.5 {
		t.Errorf("p, buf = %v, %v, want -1.5, 1.5", p[0], o.Momentum()[0])
	}
}
