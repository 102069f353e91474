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
