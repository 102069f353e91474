package optim

import "fmt"

// moments are the state Adam-family optimisers keep per parameter (first and second
// moments) and the step count of their bias corrections.
type moments struct {
	m, v []float32
	t    int
}

func newMoments(n int) moments { return moments{m: make([]float32, n), v: make([]float32, n)} }

// Moments returns the live first and second moment buffers, for checkpointing.
func (o *moments) Moments() (m, v []float32) { return o.m, o.v }

// StepCount returns the number of steps taken, t in the bias corrections.
func (o *moments) StepCount() int { return o.t }

// set restores a checkpoint's step count and moments, changing nothing if t < 0 or
// a buffer's length is not the optimiser's.
func (o *moments) set(t int, m, v []float32) error {
	n := len(o.m)
	switch {
	case t < 0:
		return fieldErr("t", t, "t >= 0")
	case len(m) != n:
		return fieldErr("len(m)", len(m), fmt.Sprint(n))
	case len(v) != n:
		return fieldErr("len(v)", len(v), fmt.Sprint(n))
	}
	o.t = t
	copy(o.m, m)
	copy(o.v, v)
	return nil
}
