package optim

import (
	"fmt"
	"math"
)

// Cosine is a learning-rate schedule: linear warmup from 0 to Peak over Warmup
// steps, then cosine decay from Peak to Min at step Total, and Min from then on.
type Cosine struct {
	Peak, Min     float32
	Warmup, Total int
}

// Validate reports the first field out of range.
func (c Cosine) Validate() error {
	switch {
	case !positive(c.Peak):
		return fieldErr("peak", c.Peak, "finite peak > 0")
	case !(c.Min >= 0 && c.Min <= c.Peak):
		return fieldErr("min", c.Min, fmt.Sprintf("0 <= min <= peak (%v)", c.Peak))
	case c.Warmup < 0:
		return fieldErr("warmup", c.Warmup, "warmup >= 0")
	case c.Total < c.Warmup:
		return fieldErr("total", c.Total, fmt.Sprintf("total >= warmup (%d)", c.Warmup))
	}
	return nil
}

// At returns the learning rate for step (0-based). During warmup it is
// Peak·(step+1)/Warmup, so the first step already moves and step Warmup-1 reaches
// Peak; then Min + (Peak-Min)·(1+cos(π·(step-Warmup)/(Total-Warmup)))/2 until Total.
// It panics if step < 0.
func (c Cosine) At(step int) float32 {
	switch {
	case step < 0:
		panic(fmt.Sprintf("optim: Cosine.At: step = %d, want >= 0", step))
	case step < c.Warmup:
		return float32(float64(c.Peak) * float64(step+1) / float64(c.Warmup))
	case step >= c.Total:
		return c.Min
	}
	progress := float64(step-c.Warmup) / float64(c.Total-c.Warmup)
	lo, hi := float64(c.Min), float64(c.Peak)
	return float32(lo + (hi-lo)*0.5*(1+math.Cos(math.Pi*progress)))
}
