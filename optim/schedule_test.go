package optim

import (
	"errors"
	"math"
	"testing"
)

func TestCosineWarmsUpPeaksDecaysAndHoldsMin(t *testing.T) {
	c := Cosine{Peak: 1e-3, Min: 1e-4, Warmup: 10, Total: 110}
	for _, tc := range []struct {
		name string
		step int
		want float64
	}{
		{"first warmup step", 0, 1e-4},
		{"mid warmup", 4, 5e-4},
		{"end of warmup is peak", 9, 1e-3},
		{"decay starts at peak", 10, 1e-3},
		{"quarter of decay", 35, 1e-4 + 9e-4*(1+math.Sqrt2/2)/2},
		{"midpoint of decay", 60, 5.5e-4},
		{"total is min", 110, 1e-4},
		{"after total stays min", 10_000, 1e-4},
	} {
		if got := c.At(tc.step); !closeRel(float64(got), tc.want, 1e-6) {
			t.Errorf("%s: At(%d) = %.7g, want %.7g", tc.name, tc.step, got, tc.want)
		}
	}
	// Monotone: up through warmup, down through decay.
	for s := 1; s < 120; s++ {
		prev, cur := c.At(s-1), c.At(s)
		if (s < 10 && cur <= prev) || (s >= 10 && cur > prev) {
			t.Fatalf("At(%d) = %v after At(%d) = %v breaks the shape", s, cur, s-1, prev)
		}
	}
}

func TestCosineWithoutWarmupStartsAtPeak(t *testing.T) {
	c := Cosine{Peak: 2, Min: 0, Warmup: 0, Total: 4}
	want := []float32{2, 1 + float32(math.Sqrt2/2), 1, 1 - float32(math.Sqrt2/2), 0, 0}
	for s, w := range want {
		if got := c.At(s); math.Abs(float64(got-w)) > 1e-6 {
			t.Errorf("At(%d) = %v, want %v", s, got, w)
		}
	}
	flat := Cosine{Peak: 1, Min: 0.5, Warmup: 2, Total: 2} // warmup straight to min
	if got := []float32{flat.At(0), flat.At(1), flat.At(2)}; got[0] != 0.5 || got[1] != 1 || got[2] != 0.5 {
		t.Errorf("Warmup == Total: At(0..2) = %v, want [0.5 1 0.5]", got)
	}
}

func TestCosineValidateNamesTheBadField(t *testing.T) {
	ok := Cosine{Peak: 1e-3, Min: 1e-4, Warmup: 10, Total: 100}
	if err := ok.Validate(); err != nil {
		t.Fatalf("Validate(%+v) = %v", ok, err)
	}
	for _, tc := range []struct {
		field string
		edit  func(*Cosine)
	}{
		{"peak", func(c *Cosine) { c.Peak = 0 }},
		{"peak", func(c *Cosine) { c.Peak = float32(math.NaN()) }},
		{"min", func(c *Cosine) { c.Min = -1e-4 }},
		{"min", func(c *Cosine) { c.Min = 2e-3 }},
		{"warmup", func(c *Cosine) { c.Warmup = -1 }},
		{"total", func(c *Cosine) { c.Total = 9 }},
	} {
		c := ok
		tc.edit(&c)
		var fe *FieldError
		if err := c.Validate(); !errors.As(err, &fe) || fe.Field != tc.field {
			t.Errorf("Validate(%+v) = %v, want a FieldError for %s", c, err, tc.field)
		}
	}
}

func TestCosineAtPanicsOnNegativeStep(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Error("At(-1) did not panic")
		}
	}()
	Cosine{Peak: 1, Warmup: 1, Total: 2}.At(-1)
}
