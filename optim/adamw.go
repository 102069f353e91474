package optim

import (
	"fmt"
	"math"
	"slices"
)

// Segment is a half-open range [Off, Off+Len) of a flat parameter buffer.
type Segment struct{ Off, Len int }

// AdamWConfig holds the hyperparameters of AdamW. The learning rate is not part of
// it: it changes every step and is passed to Step.
type AdamWConfig struct {
	Beta1, Beta2, Eps, WeightDecay float32
	// Decay lists the parameter ranges that get weight decay (matrices); nil means
	// every parameter, an empty non-nil slice means none.
	Decay []Segment
}

// DefaultAdamW returns the usual LLM pre-training settings: β1 0.9, β2 0.95,
// ε 1e-8, weight decay 0.1 on every parameter.
func DefaultAdamW() AdamWConfig {
	return AdamWConfig{Beta1: 0.9, Beta2: 0.95, Eps: 1e-8, WeightDecay: 0.1}
}

// Validate reports the first hyperparameter out of range. Decay segments are
// checked by NewAdamW, which knows the buffer size.
func (c AdamWConfig) Validate() error {
	return checkAdam(c.Beta1, c.Beta2, c.Eps, c.WeightDecay)
}

// checkAdam reports the first of the hyperparameters every Adam-family optimiser has
// that is out of range.
func checkAdam(beta1, beta2, eps, weightDecay float32) error {
	switch {
	case !inUnit(beta1):
		return fieldErr("beta1", beta1, "0 <= beta1 < 1")
	case !inUnit(beta2):
		return fieldErr("beta2", beta2, "0 <= beta2 < 1")
	case !positive(eps):
		return fieldErr("eps", eps, "finite eps > 0")
	case !nonNeg(weightDecay):
		return fieldErr("weight_decay", weightDecay, "finite weight_decay >= 0")
	}
	return nil
}

// span is a run of parameters that either all get weight decay or all do not.
type span struct {
	lo, hi int
	decay  bool
}

// AdamW is the AdamW optimiser (Loshchilov & Hutter) over one flat buffer of n
// parameters. It owns the first and second moment buffers m and v and the step
// count t; the parameters and gradients belong to the caller.
type AdamW struct {
	cfg AdamWConfig
	moments
	spans []span // covers [0, n) in order, so Step is one pass over the buffers
}

// NewAdamW returns an AdamW for n parameters with zero moments at step 0. It
// rejects an invalid cfg and Decay segments that leave [0, n) or overlap.
func NewAdamW(n int, cfg AdamWConfig) (*AdamW, error) {
	if n < 0 {
		return nil, fieldErr("n", n, "n >= 0")
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	spans, err := decaySpans(n, cfg.Decay)
	if err != nil {
		return nil, err
	}
	cfg.Decay = slices.Clone(cfg.Decay)
	return &AdamW{cfg: cfg, moments: newMoments(n), spans: spans}, nil
}

// decaySpans turns the Decay segments into an ordered partition of [0, n).
func decaySpans(n int, decay []Segment) ([]span, error) {
	if decay == nil {
		return []span{{0, n, true}}, nil
	}
	idx := make([]int, len(decay)) // sorted by offset (stably), keeping the caller's indices for errors
	for i, s := range decay {
		if s.Off < 0 || s.Len < 0 || s.Off > n-s.Len {
			return nil, fieldErr(fmt.Sprintf("decay[%d]", i), s, fmt.Sprintf("Off >= 0, Len >= 0, Off+Len <= %d", n))
		}
		idx[i] = i
	}
	slices.SortStableFunc(idx, func(a, b int) int { return decay[a].Off - decay[b].Off })
	var spans []span
	pos, prev := 0, -1
	for _, i := range idx {
		s := decay[i]
		if s.Len == 0 {
			continue
		}
		if s.Off < pos {
			p := decay[prev]
			return nil, fieldErr(fmt.Sprintf("decay[%d]", i), s, fmt.Sprintf("no overlap with decay[%d] = [%d, %d)", prev, p.Off, p.Off+p.Len))
		}
		if s.Off > pos {
			spans = append(spans, span{pos, s.Off, false})
		}
		spans = append(spans, span{s.Off, s.Off + s.Len, true})
		pos, prev = s.Off+s.Len, i
	}
	if pos < n || len(spans) == 0 {
		spans = append(spans, span{pos, n, false})
	}
	return spans, nil
}

// Step applies one AdamW update at learning rate lr, with PyTorch
// torch.optim.AdamW semantics:
//
//	p -= lr·wd·p                      (only inside Decay segments)
//	m  = β1·m + (1-β1)·g
//	v  = β2·v + (1-β2)·g²
//	p -= lr · m̂ / (√v̂ + ε),  m̂ = m/(1-β1ᵗ), v̂ = v/(1-β2ᵗ)
//
// It panics if len(params) or len(grads) is not n.
func (o *AdamW) Step(params, grads []float32, lr float32) {
	n := len(o.m)
	if len(params) != n || len(grads) != n {
		panic(fmt.Sprintf("optim: AdamW.Step: len(params) = %d, len(grads) = %d, want %d", len(params), len(grads), n))
	}
	o.t++
	c := &o.cfg
	// Bias corrections in float64, once per step, as PyTorch does; the per-element
	// work then is two multiply-adds, a sqrt and a division.
	t := float64(o.t)
	bc1 := 1 - math.Pow(float64(c.Beta1), t)
	bc2 := 1 - math.Pow(float64(c.Beta2), t)
	k := adamwStep{
		b1: c.Beta1, b2: c.Beta2, c1: 1 - c.Beta1, c2: 1 - c.Beta2,
		stepSize: float32(float64(lr) / bc1),
		invBC2:   float32(1 / math.Sqrt(bc2)),
		eps:      c.Eps,
	}
	keep := float32(1 - float64(lr)*float64(c.WeightDecay))
	// One goroutine: splitting the loop over two (tried at 64K and 1M params) was
	// no faster on the 2-vCPU machine BenchmarkAdamWStep ran on, and allocated.
	for _, s := range o.spans {
		f := float32(1)
		if s.decay {
			f = keep
		}
		k.run(params[s.lo:s.hi], grads[s.lo:s.hi], o.m[s.lo:s.hi], o.v[s.lo:s.hi], f)
	}
}

// adamwStep holds the per-step constants of the AdamW inner loop.
type adamwStep struct {
	b1, b2, c1, c2   float32 // β1, β2, 1-β1, 1-β2
	stepSize, invBC2 float32 // lr/(1-β1ᵗ), 1/√(1-β2ᵗ)
	eps              float32
}

// run updates one span; keep is 1-lr·wd inside Decay segments and 1 outside
// (multiplying by 1 is exact, so one loop serves both). Vector kernels (runVec) do
// the same operations on whole blocks of 16, the loop the rest.
func (k *adamwStep) run(p, g, m, v []float32, keep float32) {
	g, m, v = g[:len(p)], m[:len(p)], v[:len(p)] // lets the compiler drop bounds checks
	b1, b2, c1, c2 := k.b1, k.b2, k.c1, k.c2
	stepSize, invBC2, eps := k.stepSize, k.invBC2, k.eps
	for i := k.runVec(p, g, m, v, keep); i < len(p); i++ {
		gi := g[i]
		mi := b1*m[i] + c1*gi
		vi := b2*v[i] + c2*gi*gi
		m[i], v[i] = mi, vi
		// float32(math.Sqrt(float64(x))) compiles to a single-precision sqrt.
		p[i] = p[i]*keep - stepSize*(mi/(float32(math.Sqrt(float64(vi)))*invBC2+eps))
	}
}

// SetState restores a checkpoint: it sets the step count and copies m and v into
// the moment buffers. It returns an error, changing nothing, if t < 0 or a buffer
// length is not n.
func (o *AdamW) SetState(t int, m, v []float32) error { return o.set(t, m, v) }
