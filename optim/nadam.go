package optim

import (
	"fmt"
	"math"
	"slices"
)

// NAdamConfig holds the hyperparameters of NAdam with decoupled weight decay. As
// with AdamW, the learning rate is passed to Step.
type NAdamConfig struct {
	Beta1, Beta2, Eps, WeightDecay float32
	// MomentumDecay is ψ of the momentum schedule μₜ = β1·(1 − ½·0.96^(t·ψ)); 0.004
	// is PyTorch's default.
	MomentumDecay float32
	// Decay lists the parameter ranges that get weight decay, as AdamWConfig.Decay.
	Decay []Segment
}

// DefaultNAdam returns the settings of the delay-corrected runs: β1 0.9 (raised by
// DelayMomentum per stage), β2 0.95, ε 1e-8, weight decay 0.1, ψ 0.004.
func DefaultNAdam() NAdamConfig {
	return NAdamConfig{Beta1: 0.9, Beta2: 0.95, Eps: 1e-8, WeightDecay: 0.1, MomentumDecay: 0.004}
}

// Validate reports the first hyperparameter out of range.
func (c NAdamConfig) Validate() error {
	if err := checkAdam(c.Beta1, c.Beta2, c.Eps, c.WeightDecay); err != nil {
		return err
	}
	switch {
	case !nonNeg(c.MomentumDecay):
		return fieldErr("momentum_decay", c.MomentumDecay, "finite momentum_decay >= 0")
	}
	return nil
}

// DelayMomentum is the first-moment decay β1 of a stage whose gradients arrive delay
// updates late (a mean over the micro-batches of an update): the momentum's horizon
// 1/(1−β1) grows by the delay, 1 − (1−beta1)/(1+delay). The Nesterov look-ahead then
// weighs the momentum, which carries the direction the weights kept moving in while
// the gradient was on its way, more and the stale gradient less, in proportion to how
// stale it is; with no delay it is beta1.
func DelayMomentum(beta1, delay float64) float32 {
	if delay <= 0 {
		return float32(beta1)
	}
	return float32(1 - (1-beta1)/(1+delay))
}

// DelayLR is the factor on the learning rate of a stage whose gradients arrive delay
// updates late, 1/√(1+delay): a gradient of weights delay updates old points where the
// weights were, and the further the weights moved since, the smaller the step it can
// safely take (PipeMare found the same: an asynchronous stage's stable step size
// shrinks with its delay). With no delay it is 1.
func DelayLR(delay float64) float32 {
	if delay <= 0 {
		return 1
	}
	return float32(1 / math.Sqrt(1+delay))
}

// NAdam is Adam with Nesterov momentum (Dozat 2016) and decoupled weight decay, with
// PyTorch torch.optim.NAdam(decoupled_weight_decay=True) semantics, over one flat
// buffer of n parameters. It owns the moments m and v, the step count t and the
// product of the momentum schedule Πμ.
type NAdam struct {
	cfg NAdamConfig
	moments
	muProd float32 // Πμᵢ for i ≤ t, kept in float32 as PyTorch keeps it
	spans  []span
}

// NewNAdam returns a NAdam for n parameters at step 0, or an error for an invalid
// cfg or Decay segments that leave [0, n) or overlap.
func NewNAdam(n int, cfg NAdamConfig) (*NAdam, error) {
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
	return &NAdam{cfg: cfg, moments: newMoments(n), muProd: 1, spans: spans}, nil
}

// mu is the momentum schedule μₜ.
func (o *NAdam) mu(t int) float64 {
	return float64(o.cfg.Beta1) * (1 - 0.5*math.Pow(0.96, float64(t)*float64(o.cfg.MomentumDecay)))
}

// Step applies one NAdam update at learning rate lr:
//
//	p -= lr·wd·p                                   (only inside Decay segments)
//	m  = β1·m + (1−β1)·g,  v = β2·v + (1−β2)·g²
//	d  = √(v/(1−β2ᵗ)) + ε
//	p -= lr·(1−μₜ)/(1−Πᵢ≤ₜ μᵢ) · g/d + lr·μₜ₊₁/(1−Πᵢ≤ₜ₊₁ μᵢ) · m/d
//
// The second term is the Nesterov look-ahead: the momentum of the next step, taken
// now. It panics if len(params) or len(grads) is not n.
func (o *NAdam) Step(params, grads []float32, lr float32) {
	n := len(o.m)
	if len(params) != n || len(grads) != n {
		panic(fmt.Sprintf("optim: NAdam.Step: len(params) = %d, len(grads) = %d, want %d", len(params), len(grads), n))
	}
	o.t++
	c := &o.cfg
	mu, muNext := o.mu(o.t), o.mu(o.t+1)
	o.muProd = float32(float64(o.muProd) * mu)
	prodNext := float64(o.muProd) * muNext
	gCoef := float32(float64(lr) * (1 - mu) / (1 - float64(o.muProd)))
	mCoef := float32(float64(lr) * muNext / (1 - prodNext))
	invBC2 := float32(1 / (1 - math.Pow(float64(c.Beta2), float64(o.t))))
	keep := float32(1 - float64(lr)*float64(c.WeightDecay))
	b1, b2, c1, c2, eps := c.Beta1, c.Beta2, 1-c.Beta1, 1-c.Beta2, c.Eps
	for _, s := range o.spans {
		f := float32(1)
		if s.decay {
			f = keep
		}
		p, g, m, v := params[s.lo:s.hi], grads[s.lo:s.hi], o.m[s.lo:s.hi], o.v[s.lo:s.hi]
		g, m, v = g[:len(p)], m[:len(p)], v[:len(p)]
		for i := range p {
			gi := g[i]
			mi := b1*m[i] + c1*gi
			vi := b2*v[i] + c2*gi*gi
			m[i], v[i] = mi, vi
			d := float32(math.Sqrt(float64(vi*invBC2))) + eps
			p[i] = p[i]*f - (gCoef*gi+mCoef*mi)/d
		}
	}
}

// SetState restores a checkpoint: the step count, m and v; Πμ is recomputed from the
// step count by the same float32 products Step takes, so it is the value it was. It
// returns an error, changing nothing, if t < 0 or a buffer length is not n.
func (o *NAdam) SetState(t int, m, v []float32) error {
	if err := o.set(t, m, v); err != nil {
		return err
	}
	o.muProd = 1
	for i := 1; i <= t; i++ {
		o.muProd = float32(float64(o.muProd) * o.mu(i))
	}
	return nil
}
