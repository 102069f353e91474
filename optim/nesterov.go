package optim

import "fmt"

// NesterovConfig holds the hyperparameters of the outer optimiser.
type NesterovConfig struct {
	LR, Momentum float32
	// Plain uses heavy-ball momentum (p -= lr·buf) instead of Nesterov's look-ahead.
	Plain bool
}

// DefaultNesterov returns the DiLoCo outer settings: learning rate 0.7, momentum 0.9.
func DefaultNesterov() NesterovConfig { return NesterovConfig{LR: 0.7, Momentum: 0.9} }

// Validate reports the first field out of range.
func (c NesterovConfig) Validate() error {
	switch {
	case !positive(c.LR):
		return fieldErr("lr", c.LR, "finite lr > 0")
	case !inUnit(c.Momentum):
		return fieldErr("momentum", c.Momentum, "0 <= momentum < 1")
	}
	return nil
}

// Nesterov is the DiLoCo outer optimiser: SGD with Nesterov momentum applied to a
// pseudo-gradient, with torch.optim.SGD(nesterov=True) semantics. It owns the
// momentum buffer.
type Nesterov struct {
	cfg NesterovConfig
	buf []float32
}

// NewNesterov returns a Nesterov optimiser for n parameters with zero momentum.
func NewNesterov(n int, cfg NesterovConfig) (*Nesterov, error) {
	if n < 0 {
		return nil, fieldErr("n", n, "n >= 0")
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Nesterov{cfg: cfg, buf: make([]float32, n)}, nil
}

// Step applies one outer update with pseudo-gradient g:
//
//	buf = μ·buf + g
//	p  -= lr·(g + μ·buf)
//
// PyTorch sets buf = g on the first step; starting from a zero buffer gives the
// same value, so there is no first-step flag and a checkpoint is the buffer alone.
// It panics if len(params) or len(pseudoGrad) is not n.
func (o *Nesterov) Step(params, pseudoGrad []float32) {
	n := len(o.buf)
	if len(params) != n || len(pseudoGrad) != n {
		panic(fmt.Sprintf("optim: Nesterov.Step: len(params) = %d, len(pseudoGrad) = %d, want %d", len(params), len(pseudoGrad), n))
	}
	o.StepAt(0, params, pseudoGrad)
}

// StepAt is Step on the part of the parameters that starts at offset off: params and
// pseudoGrad hold that part only, and the momentum of the rest is untouched. Streaming
// DiLoCo steps one fragment of a stage at a time this way. With Plain it takes a
// heavy-ball step instead (buf = μ·buf + g; p -= lr·buf). It panics if the part does not
// fit or the two lengths differ.
func (o *Nesterov) StepAt(off int, params, pseudoGrad []float32) {
	if off < 0 || len(params) != len(pseudoGrad) || off+len(params) > len(o.buf) {
		panic(fmt.Sprintf("optim: Nesterov.StepAt(%d): len(params) = %d, len(pseudoGrad) = %d, n = %d", off, len(params), len(pseudoGrad), len(o.buf)))
	}
	lr, mu := o.cfg.LR, o.cfg.Momentum
	buf := o.buf[off : off+len(params)]
	g := pseudoGrad[:len(params)]
	if o.cfg.Plain {
		for i := range params {
			b := mu*buf[i] + g[i]
			buf[i] = b
			params[i] -= lr * b
		}
		return
	}
	for i := range params {
		b := mu*buf[i] + g[i]
		buf[i] = b
		params[i] -= lr * (g[i] + mu*b)
	}
}

// Momentum returns the live momentum buffer, for checkpointing and restoring.
func (o *Nesterov) Momentum() []float32 { return o.buf }
