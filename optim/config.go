package optim

import (
	"errors"
	"fmt"
	"math"
)

// ErrInvalid is matched (errors.Is) by every configuration or state error the
// package returns.
var ErrInvalid = errors.New("optim: invalid configuration")

// FieldError reports a configuration field, or a piece of restored state, whose
// value is out of range.
type FieldError struct {
	Field string // name as in the run spec, e.g. "beta1" or "decay[2]"
	Value any
	Want  string // the condition the value breaks, e.g. "0 <= beta1 < 1"
}

func (e *FieldError) Error() string {
	return fmt.Sprintf("optim: %s = %v, want %s", e.Field, e.Value, e.Want)
}

// Is makes errors.Is(err, ErrInvalid) hold for every FieldError.
func (e *FieldError) Is(target error) bool { return target == ErrInvalid }

func fieldErr(field string, value any, want string) error {
	return &FieldError{Field: field, Value: value, Want: want}
}

// The checks below are written so that NaN fails them.

func inUnit(x float32) bool   { return x >= 0 && x < 1 } // [0, 1)
func positive(x float32) bool { return x > 0 && x <= math.MaxFloat32 }
func nonNeg(x float32) bool   { return x >= 0 && x <= math.MaxFloat32 }
