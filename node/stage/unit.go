// Package stage is the training state of one pipeline stage and the arithmetic that
// moves it: the stage's weights, its AdamW state, the codecs of its boundaries with
// their error-feedback residuals and, with replicas, its DiLoCo outer state; its
// optimiser step; and its checkpoint. The centralised trainer (node/train) holds one
// Unit per stage and replica, a swarm's worker holds one: both step, save and restore
// through the same code, so a launched run computes what `train` computes.
package stage

import (
	"fmt"

	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/optim"
	"github.com/pipeswarm/pipeswarm/shard"
	"github.com/pipeswarm/pipeswarm/shard/backend"
)

// Unit is the training state of stage Index of one replica pipeline. Its loop (a
// worker, or the trainer) runs Stage's forward and backward passes and carries
// frames through In and Out; the optimiser step, the outer step's arithmetic and the
// checkpoint are the Unit's.
type Unit struct {
	Index int
	Stage *shard.Stage
	In    *Boundary // with the previous stage; nil on the first
	Out   *Boundary // with the next stage; nil on the last
	Outer *Outer    // the DiLoCo state; nil without replicas

	opt rule
	// lrScale multiplies the learning rate Update is given (0: by 1): a delay-corrected
	// async stage's optim.DelayLR.
	lrScale float32

	// past[a-1] holds the weights as they were a updates ago, in an async run: the
	// versions the stage's forwards and backwards may still run on (SetAsync).
	past [][]float32

	// projected says GradSumSquares has projected the gradients since the last Update.
	projected bool

	// The boundaries' residuals as Mark kept them: a checkpoint's, of its step's end.
	markIn, markOut []float32
}

// New builds stage idx (holding layers) of sp's model, initialised from the run seed
// as every replica's is, in the run's subspace sub (RunSubspace(sp); passed in so the
// units of one process share it, nil when the model is dense).
func New(sp *spec.Spec, idx int, layers shard.Range, sub *shard.Subspace) (*Unit, error) {
	S := sp.Pipeline.Stages
	if idx < 0 || idx >= S {
		return nil, fmt.Errorf("stage: index %d outside the pipeline's %d stages", idx, S)
	}
	be, err := Backend(sp)
	if err != nil {
		return nil, err
	}
	st, err := shard.NewStage(ModelConfig(sp), layers, idx == 0, idx == S-1, shard.WithBackend(be), shard.WithRecompute(sp.Model.Recompute))
	if err != nil {
		return nil, err
	}
	st.Init(sp.Seed)
	if sub != nil {
		if err := st.SetSubspace(sub, sp.Compression.DenseTail); err != nil {
			return nil, err
		}
	}
	u := &Unit{Index: idx, Stage: st}
	if idx > 0 {
		if u.In, err = NewBoundary(sp, sub); err != nil {
			return nil, err
		}
	}
	if idx < S-1 {
		if u.Out, err = NewBoundary(sp, sub); err != nil {
			return nil, err
		}
	}
	if u.opt, err = optim.NewAdamW(len(st.Params), AdamWConfig(sp, st)); err != nil {
		return nil, err
	}
	if sp.Pipeline.Replicas > 1 {
		if u.Outer, err = NewOuter(sp, st); err != nil {
			return nil, err
		}
	}
	return u, nil
}

// rule is the update rule: AdamW, or NAdam for an async run's train.delay: nesterov.
type rule interface {
	Step(params, grads []float32, lr float32)
	Moments() (m, v []float32)
	StepCount() int
	SetState(t int, m, v []float32) error
}

// SetAsync readies the unit for the async schedule, before its first step: it keeps
// the weights of its last keep updates (the schedule's largest delay for this stage),
// which Past returns, and with train.delay: nesterov its update rule becomes NAdam
// with β1 raised from train.beta1 by delay, the stage's mean delay in updates
// (optim.DelayMomentum), at the learning rate scaled down by it (optim.DelayLR).
func (u *Unit) SetAsync(sp *spec.Spec, keep int, delay float64) error {
	if keep < 0 || delay < 0 {
		return fmt.Errorf("stage: async with %d past versions and a delay of %v", keep, delay)
	}
	u.past = u.past[:0]
	for range keep {
		u.past = append(u.past, make([]float32, len(u.Stage.Params)))
	}
	if sp.Train.Delay == spec.DelayNesterov {
		opt, err := optim.NewNAdam(len(u.Stage.Params), NAdamConfig(sp, u.Stage, delay))
		if err != nil {
			return err
		}
		u.opt = opt
		u.lrScale = optim.DelayLR(delay)
	}
	return nil
}

// FillPast makes the current weights stand for every past version the unit keeps:
// a stage that joins an async run in progress holds the weights it fetched and none
// older, and its schedule runs on those where it would reach further back
// (core.Config.Joined). A checkpoint it writes before its updates have pushed them out
// then holds what each forward and backward ran on, so a run resumed from it (which
// knows nothing of the join) continues exactly.
func (u *Unit) FillPast() {
	for _, p := range u.past {
		copy(p, u.Stage.Params)
	}
}

// Past returns the weights as they were age updates ago, 1 <= age <= keep (SetAsync),
// as the unit's own buffer: the caller does not change it.
func (u *Unit) Past(age int) []float32 { return u.past[age-1] }

// Kept is the memory of the past weight versions the unit holds.
func (u *Unit) Kept() int64 { return int64(len(u.past)) * int64(len(u.Stage.Params)) * 4 }

// GradSumSquares is the first half of the optimiser step: it projects the gradients
// into the run's subspace (a no-op without one), so that the norm is of what the
// optimiser sees, and returns their sum of squares, this stage's share of the global
// gradient norm. Update takes the step once every stage's share is summed.
func (u *Unit) GradSumSquares() float64 {
	u.Stage.ProjectGrads()
	u.projected = true
	return optim.SumSquares(u.Stage.Grads)
}

// Update is the second half of the optimiser step: it scales the gradients by the
// clip factor of the global norm against clip (0: no clipping), takes the update
// rule's step at learning rate lr, and puts the parameters back into the subspace.
// A run that does not clip needs no norm: Update then projects the gradients itself
// (norm is not read). The gradients are left as scaled; the caller zeroes them
// before the next step.
func (u *Unit) Update(norm, clip float64, lr float32) {
	st := u.Stage
	if !u.projected {
		st.ProjectGrads()
	}
	u.projected = false
	if f := optim.ClipFactor(norm, clip); f != 1 {
		optim.Scale(st.Grads, f)
	}
	if n := len(u.past); n > 0 { // the current weights become one update old
		last := u.past[n-1]
		copy(u.past[1:], u.past[:n-1])
		u.past[0] = last
		copy(last, st.Params)
	}
	if u.lrScale != 0 {
		lr *= u.lrScale
	}
	u.opt.Step(st.Params, st.Grads, lr)
	st.ProjectParams()
}

// Steps is how many optimiser steps the unit has taken (restored ones included).
func (u *Unit) Steps() int { return u.opt.StepCount() }

// Moments are the update rule's state, AdamW's first and second moments: what a
// replica rejoining a run fetches from a live one. They alias the unit's state.
func (u *Unit) Moments() (m, v []float32) { return u.opt.Moments() }

// SetMoments takes another replica's moments as of its step count steps.
func (u *Unit) SetMoments(steps int, m, v []float32) error { return u.opt.SetState(steps, m, v) }

// Mark keeps the boundaries' error-feedback residuals as they are now, which Save
// writes: call it at a step's end. A loop that checkpoints later (a worker whose
// first stage has begun the next step meanwhile) still saves the step's end.
func (u *Unit) Mark() {
	keep := func(dst []float32, b *Boundary) []float32 {
		if b == nil || b.Residual() == nil {
			return nil
		}
		return append(dst[:0], b.Residual()...)
	}
	u.markIn, u.markOut = keep(u.markIn, u.In), keep(u.markOut, u.Out)
}

// NAdamConfig is the delay-corrected update rule of stage s under sp, whose
// gradients arrive delay updates late on average: NAdam with AdamW's β2 and decoupled
// weight decay on matrices only, β1 raised from train.beta1 by the delay.
func NAdamConfig(sp *spec.Spec, s *shard.Stage, delay float64) optim.NAdamConfig {
	a := AdamWConfig(sp, s)
	c := optim.DefaultNAdam()
	c.Beta1, c.Beta2, c.WeightDecay, c.Decay = optim.DelayMomentum(sp.Train.Beta1, delay), a.Beta2, a.WeightDecay, a.Decay
	return c
}

// ModelConfig is the shard.Config a spec describes.
func ModelConfig(sp *spec.Spec) shard.Config {
	m := sp.Model
	return shard.Config{Vocab: m.Vocab, DModel: m.DModel, NLayers: m.NLayers, NHeads: m.NHeads,
		DFF: m.DFF, SeqLen: m.SeqLen, RopeTheta: m.RopeTheta, NormEps: float32(m.NormEps)}
}

// Backend opens the compute backend for the run's model.precision: cpu32 for fp32,
// bf16 for bf16. An error says why it cannot run here and what to install.
func Backend(sp *spec.Spec) (backend.Backend, error) {
	name, err := backend.ForPrecision(sp.Model.Precision)
	if err != nil {
		return nil, err
	}
	be, err := backend.Open(name)
	if err != nil {
		return nil, fmt.Errorf("model.precision %s: %w", sp.Model.Precision, err)
	}
	return be, nil
}

// RunSubspace is the residual subspace sp's compression section asks for, derived
// from the run seed; nil when the model is dense.
func RunSubspace(sp *spec.Spec) (*shard.Subspace, error) {
	if sp.Compression.Subspace == 0 {
		return nil, nil
	}
	return shard.NewSubspace(ModelConfig(sp), sp.Compression.Subspace, sp.Seed)
}

// AdamWConfig is the inner optimiser for stage s under sp: weight decay on matrices
// only.
func AdamWConfig(sp *spec.Spec, s *shard.Stage) optim.AdamWConfig {
	c := optim.DefaultAdamW()
	c.Beta1, c.Beta2 = float32(sp.Train.Beta1), float32(sp.Train.Beta2)
	c.WeightDecay = float32(sp.Train.WeightDecay)
	c.Decay = []optim.Segment{}
	for _, t := range s.Tensors() {
		if t.Decay {
			c.Decay = append(c.Decay, optim.Segment{Off: t.Off, Len: t.Len()})
		}
	}
	return c
}
