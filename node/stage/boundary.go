package stage

import (
	"bytes"
	"fmt"

	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/codec"
	"github.com/pipeswarm/pipeswarm/shard"
)

// Boundary carries the residual stream across one stage boundary exactly as the wire
// does: into the subspace (if the run has one), through the run's codec in a real
// p2p frame with the token ids, and back; and it counts the frames' bytes. The
// single-process trainer puts one between every pair of stages, so its losses are
// the pipeline's and its byte counts are what the network would carry.
type Boundary struct {
	sub      *shard.Subspace // nil: the full width crosses
	fwd, bwd codec.Spec
	ef       *codec.ErrorFeedback // the lossy gradient codec's carried error
	width    int

	// BytesFwd and BytesBwd count encoded training frames (evaluation excluded).
	BytesFwd, BytesBwd int64
	// LastBytes is the size of the last frame carried either way (evaluation too).
	LastBytes int64

	buf                bytes.Buffer
	c, outX, outG, grd []float32
}

// NewBoundary makes the boundary a spec's compression section describes; sub is the
// run's subspace or nil.
func NewBoundary(sp *spec.Spec, sub *shard.Subspace) (*Boundary, error) {
	fwd, err := codec.Parse(sp.Compression.Activations)
	if err != nil {
		return nil, fmt.Errorf("compression.activations: %w", err)
	}
	bwd, err := codec.Parse(sp.Compression.Gradients)
	if err != nil {
		return nil, fmt.Errorf("compression.gradients: %w", err)
	}
	b := &Boundary{sub: sub, fwd: fwd, bwd: bwd, width: sp.Model.DModel}
	if sub != nil {
		b.width = sub.K
	}
	return b, nil
}

// Width is how many numbers per token cross the boundary.
func (b *Boundary) Width() int { return b.width }

// Codecs are the forward and backward wire codecs.
func (b *Boundary) Codecs() (fwd, bwd codec.Spec) { return b.fwd, b.bwd }

func grow(s []float32, n int) []float32 {
	if cap(s) < n {
		return make([]float32, n)
	}
	return s[:n]
}

// Encode turns a stage's output x [B·T, d] into what crosses the boundary: the
// subspace coefficients (or x itself) as a frame's Data.
func (b *Boundary) Encode(x []float32, tokens []int32) []float32 {
	if b.sub == nil {
		return x
	}
	b.c = grow(b.c, len(tokens)*b.width)
	b.sub.Compress(b.c, x, tokens)
	return b.c
}

// Decode rebuilds the residual stream [B·T, d] from a received frame's Data.
func (b *Boundary) Decode(data []float32, tokens []int32) []float32 {
	if b.sub == nil {
		return data
	}
	b.outX = grow(b.outX, len(tokens)*b.sub.D)
	b.sub.Expand(b.outX, data, tokens)
	return b.outX
}

// EncodeGrad turns the gradient g [N, d] of a stage's input into a frame's Data,
// carrying the lossy codec's error into the next micro-batch (error feedback).
func (b *Boundary) EncodeGrad(g []float32, n int) []float32 {
	data := g
	if b.sub != nil {
		b.c = grow(b.c, n*b.width)
		b.sub.CompressGrad(b.c, g, n)
		data = b.c
	}
	if b.bwd.Kind == codec.F32 {
		return data
	}
	if b.ef == nil || len(data) != len(b.grd) {
		b.ef, b.grd = codec.NewErrorFeedback(b.bwd, len(data)), make([]float32, len(data))
	}
	b.ef.Quantize(b.grd, data)
	return b.grd
}

// DecodeGrad rebuilds the gradient [N, d] from a received frame's Data.
func (b *Boundary) DecodeGrad(data []float32, n int) []float32 {
	if b.sub == nil {
		return data
	}
	b.outG = grow(b.outG, n*b.sub.D)
	b.sub.ExpandGrad(b.outG, data, n)
	return b.outG
}

// Forward carries x across in a real frame and returns what the next stage receives.
func (b *Boundary) Forward(x []float32, tokens, targets []int32, batch, seq int, count bool) []float32 {
	f := &p2p.Frame{Kind: p2p.KindActivation, Run: 1, Shape: []uint32{uint32(batch), uint32(seq), uint32(b.width)},
		Codec: b.fwd, Tokens: tokens, Targets: targets, Data: b.Encode(x, tokens)}
	data, n := b.carry(f)
	if count {
		b.BytesFwd += n
	}
	b.LastBytes = n
	return b.Decode(data, tokens)
}

// Backward carries the input gradient g back across and returns what the previous
// stage receives.
func (b *Boundary) Backward(g []float32, batch, seq int) []float32 {
	n := batch * seq
	f := &p2p.Frame{Kind: p2p.KindGradient, Run: 1, Shape: []uint32{uint32(batch), uint32(seq), uint32(b.width)},
		Codec: b.bwd, Data: b.EncodeGrad(g, n)}
	data, size := b.carry(f)
	b.BytesBwd += size
	b.LastBytes = size
	return b.DecodeGrad(data, n)
}

// carry encodes f as the wire would and returns the values the receiver decodes and
// the frame's size. fp32 is lossless, so its values are f.Data itself and only the
// size needs the encoder; the training step then allocates nothing here.
func (b *Boundary) carry(f *p2p.Frame) ([]float32, int64) {
	if f.Codec.Kind == codec.F32 && !f.Codec.Zstd {
		var c countingWriter
		if err := p2p.WriteFrame(&c, f); err != nil {
			panic(fmt.Sprintf("stage: encoding a boundary frame: %v", err)) // our own frame: a bug
		}
		return f.Data, c.n
	}
	b.buf.Reset()
	if err := p2p.WriteFrame(&b.buf, f); err != nil {
		panic(fmt.Sprintf("stage: encoding a boundary frame: %v", err))
	}
	n := int64(b.buf.Len())
	got, err := p2p.ReadFrame(&b.buf, 0)
	if err != nil {
		panic(fmt.Sprintf("stage: decoding our own boundary frame: %v", err))
	}
	return got.Data, n
}

type countingWriter struct{ n int64 }

func (c *countingWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// Residual is the error the lossy gradient codec carries into the next micro-batch
// (nil before the first gradient, and for fp32). It aliases the boundary's state.
func (b *Boundary) Residual() []float32 {
	if b.ef == nil {
		return nil
	}
	return b.ef.Residual()
}

// SetResidual restores a Residual from a checkpoint.
func (b *Boundary) SetResidual(r []float32) {
	if b.bwd.Kind == codec.F32 || len(r) == 0 {
		return
	}
	b.ef, b.grd = codec.NewErrorFeedback(b.bwd, len(r)), make([]float32, len(r))
	copy(b.ef.Residual(), r)
}
