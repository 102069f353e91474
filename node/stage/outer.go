package stage

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math"

	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/optim"
	"github.com/pipeswarm/pipeswarm/p2p/codec"
	"github.com/pipeswarm/pipeswarm/shard"
)

// Span is a half-open range [Lo, Hi) of a stage's flat parameter buffer.
type Span struct{ Lo, Hi int }

// Len is Hi − Lo.
func (s Span) Len() int { return s.Hi - s.Lo }

// Outer is one replica's DiLoCo state for one stage: the global weights the replicas
// of the stage last agreed on, the outer momentum, and the error-feedback residual of
// what this replica sends. Every replica of a stage holds its own Outer; the all-reduce
// keeps their Global and momentum bit-identical.
//
// An outer step on fragment f is: y = Global − local + residual (Contribution), an
// all-reduce of y among the replicas that returns the decoded average and this
// replica's decoded contribution, then Apply: residual = y − own, an outer SGD step on
// Global with the average as gradient, and local = Global.
type Outer struct {
	Codec  codec.Spec
	Global []float32
	Frags  []Span
	Rounds int // outer steps taken (a step on any fragment counts once per inner step)

	opt   *optim.Nesterov
	resid []float32 // nil for fp32, which loses nothing
	y     []float32
	base  []float32 // local weights when an overlapped outer step began
}

// NewOuter starts the DiLoCo state of stage st from its current parameters, which
// every replica starts with (the same seed initialises them all).
func NewOuter(sp *spec.Spec, st *shard.Stage) (*Outer, error) {
	c, err := codec.Parse(sp.DiLoCo.Sync)
	if err != nil {
		return nil, fmt.Errorf("diloco.sync: %w", err)
	}
	frags, err := Fragments(st, sp.DiLoCo.Fragments)
	if err != nil {
		return nil, err
	}
	n := len(st.Params)
	opt, err := optim.NewNesterov(n, optim.NesterovConfig{LR: float32(sp.DiLoCo.OuterLR),
		Momentum: float32(sp.DiLoCo.OuterMomentum), Plain: !sp.DiLoCo.Nesterov})
	if err != nil {
		return nil, fmt.Errorf("diloco: %w", err)
	}
	o := &Outer{Codec: c, Global: append([]float32(nil), st.Params...), Frags: frags, opt: opt, y: make([]float32, n), base: make([]float32, n)}
	if c.Kind != codec.F32 {
		o.resid = make([]float32, n)
	}
	return o, nil
}

// Fragments cuts a stage's parameters into f parts at tensor boundaries, each about
// 1/f of the whole. Tensor boundaries keep a fragment's subspace projection
// independent of the other fragments, so replicas agree on it.
func Fragments(st *shard.Stage, f int) ([]Span, error) {
	ts := st.Tensors()
	if f < 1 || f > len(ts) {
		return nil, fmt.Errorf("diloco.fragments: %d is outside [1, %d]: a stage of layers %d-%d holds %d tensors",
			f, len(ts), st.Layers.Lo, st.Layers.Hi, len(ts))
	}
	n := len(st.Params)
	out := make([]Span, 0, f)
	lo := 0
	for i, t := range ts {
		end := t.Off + t.Len()
		left := len(ts) - 1 - i  // tensors after this one
		need := f - len(out) - 1 // fragments still to start after this one closes
		if len(out) < f-1 && (end >= (len(out)+1)*n/f || left == need) {
			out = append(out, Span{lo, end})
			lo = end
		}
	}
	return append(out, Span{lo, n}), nil
}

// Contribution returns what this replica sends for fragment f: Global − local plus the
// carried residual, over the fragment. The slice is the Outer's scratch, valid until
// the next call.
func (o *Outer) Contribution(f int, local []float32) []float32 {
	s := o.Frags[f]
	y := o.y[s.Lo:s.Hi]
	g, l := o.Global[s.Lo:s.Hi], local[s.Lo:s.Hi]
	for i := range y {
		y[i] = g[i] - l[i]
	}
	if o.resid != nil {
		r := o.resid[s.Lo:s.Hi]
		for i := range y {
			y[i] += r[i]
		}
	}
	return y
}

// Begin is Contribution for an outer step whose all-reduce overlaps the next inner
// step (Streaming DiLoCo): it also keeps the fragment's local weights as they are now,
// so that Apply(..., overlapped) can keep what that inner step adds.
func (o *Outer) Begin(f int, local []float32) []float32 {
	s := o.Frags[f]
	copy(o.base[s.Lo:s.Hi], local[s.Lo:s.Hi])
	return o.Contribution(f, local)
}

// Apply finishes the outer step on fragment f: y is what Contribution (or Begin)
// returned, own its decoded form as the all-reduce carried it, avg the decoded
// average. It steps Global and projects it into the run's subspace through the stage
// (a no-op without one). The stage's parameters of the fragment become Global, or,
// overlapped (the step began with Begin, an inner step ago), Global plus what the
// inner steps since Begin changed locally.
func (o *Outer) Apply(f int, y, own, avg []float32, st *shard.Stage, overlapped bool) {
	s := o.Frags[f]
	if len(y) != s.Len() || len(own) != s.Len() || len(avg) != s.Len() {
		panic(fmt.Sprintf("stage: Outer.Apply: fragment %d has %d values, got y %d own %d avg %d", f, s.Len(), len(y), len(own), len(avg)))
	}
	if o.resid != nil {
		r := o.resid[s.Lo:s.Hi]
		for i := range r {
			v := y[i] - own[i]
			if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
				v = 0
			}
			r[i] = v
		}
	}
	g, local := o.Global[s.Lo:s.Hi], st.Params[s.Lo:s.Hi]
	var delta []float32
	if overlapped {
		delta = o.base[s.Lo:s.Hi] // reused in place: base becomes local − base
		for i, v := range local {
			delta[i] = v - delta[i]
		}
	}
	o.opt.StepAt(s.Lo, g, avg)
	copy(local, g)
	st.ProjectParams()
	copy(g, local)
	for i, v := range delta {
		local[i] += v
	}
}

// Momentum is the outer momentum buffer (for checkpoints and state transfer).
func (o *Outer) Momentum() []float32 { return o.opt.Momentum() }

// Base is the local weights kept by Begin (for checkpoints: an overlapped outer step
// in progress at a checkpoint is begun again on resume from the same state).
func (o *Outer) Base() []float32 { return o.base }

// Residual is the error-feedback residual; nil for fp32.
func (o *Outer) Residual() []float32 { return o.resid }

// Hash identifies the global weights: the first 16 hex digits of the sha256 of their
// float32 bits. Replicas of a stage that agree report the same.
func (o *Outer) Hash() string { return WeightsHash(o.Global) }

// WeightsHash is Outer.Hash of a parameter buffer.
func WeightsHash(w []float32) string {
	h := sha256.New()
	var buf [4096]byte
	for i := 0; i < len(w); i += len(buf) / 4 {
		chunk := w[i:min(i+len(buf)/4, len(w))]
		for j, v := range chunk {
			binary.LittleEndian.PutUint32(buf[4*j:], math.Float32bits(v))
		}
		h.Write(buf[:4*len(chunk)])
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}
