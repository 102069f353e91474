package codec

import (
	"fmt"
	"math"
)

// ErrorFeedback sends one stream of equally long tensors through a lossy
// codec without letting its rounding error accumulate (error feedback, as
// in EF-SGD): each tensor is sent with the error left over from the
// previous ones added, and what the codec loses of that sum is kept for
// the next. The sum of what the receiver decodes then tracks the sum of
// the inputs to within one tensor's rounding error, however long the
// stream, where plain rounding lets a bias grow with every tensor.
//
// That guarantee is about sums, so error feedback fits quantities that are
// summed, like gradients accumulated over micro-batches or pseudo-gradients
// averaged across replicas. Activations and activation-gradients differ
// from micro-batch to micro-batch, so there the error carried over lands
// on another sample: whether that helps training is for a benchmark to say.
//
// Lossless codecs (fp32) carry no residual: Encode is then Spec.Encode.
// An ErrorFeedback is not safe for concurrent use.
type ErrorFeedback struct {
	spec  Spec
	n     int
	resid []float32 // carried error; nil for a lossless codec
	sum   []float32 // scratch: input plus residual
}

// NewErrorFeedback returns error feedback for a stream of tensors of n
// values encoded with c. It panics if c is not valid or n is negative.
func NewErrorFeedback(c Spec, n int) *ErrorFeedback {
	c.mustBeValid()
	if n < 0 {
		panic(fmt.Sprintf("codec: NewErrorFeedback: negative length %d", n))
	}
	e := &ErrorFeedback{spec: c, n: n}
	if c.Kind != F32 {
		e.resid = make([]float32, n)
		e.sum = make([]float32, n)
	}
	return e
}

// Spec is the codec e encodes with.
func (e *ErrorFeedback) Spec() Spec { return e.spec }

// Encode appends the encoding of x plus the carried residual to dst, keeps
// what the encoding loses as the new residual, and returns the extended
// slice. x must have the stream's length; it is not modified.
func (e *ErrorFeedback) Encode(dst []byte, x []float32) []byte {
	e.checkLen("Encode", len(x))
	if e.resid == nil {
		return e.spec.Encode(dst, x)
	}
	y := e.add(x)
	dst = e.spec.Encode(dst, y)
	e.spec.roundTrip(e.resid, y)
	e.keep(y, e.resid)
	return dst
}

// Quantize sets dst to what the receiver would decode from Encode(x) and
// keeps the residual as Encode does. It suits p2p frames, which encode
// their Data themselves: put dst in Frame.Data with the same Spec. (Re-encoding
// such values gives them back exactly for bf16 and to within a float32
// rounding for int8 and int4, where the recomputed block scale may differ
// in its last bit.) dst and x must have the stream's length and may be the same
// slice.
func (e *ErrorFeedback) Quantize(dst, x []float32) {
	e.checkLen("Quantize", len(x))
	e.checkLen("Quantize", len(dst))
	if e.resid == nil {
		copy(dst, x)
		return
	}
	y := e.add(x)
	e.spec.roundTrip(dst, y)
	e.keep(y, dst)
}

// Residual is the error carried into the next tensor. It aliases e's
// state: read it, do not keep it. It is nil for a lossless codec.
func (e *ErrorFeedback) Residual() []float32 { return e.resid }

// Reset drops the carried residual, as when the stream starts over.
func (e *ErrorFeedback) Reset() { clear(e.resid) }

func (e *ErrorFeedback) checkLen(op string, n int) {
	if n != e.n {
		panic(fmt.Sprintf("codec: ErrorFeedback.%s: %d values, stream has %d", op, n, e.n))
	}
}

// add returns x plus the residual, in e's scratch.
func (e *ErrorFeedback) add(x []float32) []float32 {
	y := e.sum
	for i, v := range x {
		y[i] = v + e.resid[i]
	}
	return y
}

// keep sets the residual to y − sent. A value that is not finite (the
// input was, or the codec could not carry it) leaves no residual, so one
// bad tensor does not poison the stream.
func (e *ErrorFeedback) keep(y, sent []float32) {
	for i, v := range y {
		r := v - sent[i]
		if math.IsNaN(float64(r)) || math.IsInf(float64(r), 0) {
			r = 0
		}
		e.resid[i] = r
	}
}
