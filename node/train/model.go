package train

import (
	"math"
	"time"

	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/stage"
	"github.com/pipeswarm/pipeswarm/optim"
	"github.com/pipeswarm/pipeswarm/shard"
)

// model is every stage of a run with its optimiser, stepped in one process.
type model struct {
	units  []*stage.Unit
	stages []*shard.Stage    // the units' stages, in order
	bounds []*stage.Boundary // between stage i and i+1: unit i+1's In, which carries its residual
	tapes  []*shard.Tape     // one per stage, reused by every micro-batch
	// per-stage scratch for step's timings, allocated once
	fwd, opt []time.Duration
	fwdBytes []int64
	micro    int
	sched    optim.Cosine
	// async, when the pipeline runs the async schedule, says which weight version
	// each forward and backward runs on.
	async *asyncState
}

func newModel(sp *spec.Spec) (*model, error) {
	cfg := ModelConfig(sp)
	ranges, err := shard.SplitLayers(cfg.NLayers, sp.Pipeline.Stages)
	if err != nil {
		return nil, err
	}
	m := &model{micro: sp.Pipeline.MicroBatches}
	m.sched = optim.Cosine{Peak: float32(sp.Train.LR), Min: float32(sp.Train.MinLR), Warmup: sp.Train.Warmup, Total: sp.Train.Steps}
	if err := m.sched.Validate(); err != nil {
		return nil, err
	}
	mb := sp.Train.BatchSize / m.micro
	sub, err := stage.RunSubspace(sp)
	if err != nil {
		return nil, err
	}
	for i, r := range ranges {
		u, err := stage.New(sp, i, r, sub)
		if err != nil {
			return nil, err
		}
		m.units = append(m.units, u)
		m.stages = append(m.stages, u.Stage)
		if i > 0 {
			m.bounds = append(m.bounds, u.In)
		}
		m.tapes = append(m.tapes, u.Stage.NewTape(mb, cfg.SeqLen))
	}
	if sp.Pipeline.Async() {
		if m.async, err = newAsyncState(sp, m.units); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// ModelConfig is the shard.Config a spec describes; Backend opens the compute
// backend of its model.precision (see node/stage, which builds every stage from them).
var (
	ModelConfig = stage.ModelConfig
	Backend     = stage.Backend
)

func (m *model) numParams() int {
	n := 0
	for _, s := range m.stages {
		n += len(s.Params)
	}
	return n
}

// tracer sees each piece of compute step did, as stage stage of a pipeline would do
// it: its duration here and the bytes of the frame it sends on.
type tracer func(kind OpKind, stage, item int, d time.Duration, bytes int64)

// step runs one optimiser step over m.micro micro-batches and returns the mean loss
// and the gradient norm before clipping. tr, if set, sees every stage's compute timed.
func (m *model) step(sampler *data.Sampler[int32], inputs, targets []int32, lr float32, clip float64, tr tracer) (loss, norm float64) {
	loss = m.microBatches(sampler, inputs, targets, tr, nil)
	opt := m.opt
	clear(opt)
	var ss float64
	for i, u := range m.units {
		t0 := time.Now()
		ss += u.GradSumSquares()
		opt[i] += time.Since(t0)
	}
	norm = math.Sqrt(ss)
	for i, u := range m.units {
		t0 := time.Now()
		u.Update(norm, clip, lr)
		opt[i] += time.Since(t0)
		if tr != nil {
			tr(OpOptimize, i, 0, opt[i], 0)
		}
	}
	return loss, norm
}

// onVersion, if set, puts the weights stage i computes micro-batch micro's forward
// (backward false) or backward on in place before it runs, and returns what puts the
// current weights back after it (nil when they did not change).
type onVersion func(i, micro int, backward bool) (restore func())

// microBatches zeroes the gradients and runs m.micro micro-batches forward and back
// through every stage, accumulating the gradients; it returns their mean loss. The
// sync and the async schedules both run through it, the async one with weights
// swapped per stage by at.
func (m *model) microBatches(sampler *data.Sampler[int32], inputs, targets []int32, tr tracer, at onVersion) (loss float64) {
	for _, s := range m.stages {
		s.ZeroGrads()
	}
	last := len(m.stages) - 1
	if len(m.fwd) != len(m.stages) {
		m.fwd, m.opt, m.fwdBytes = make([]time.Duration, len(m.stages)), make([]time.Duration, len(m.stages)), make([]int64, len(m.stages))
	}
	fwd, fwdBytes := m.fwd, m.fwdBytes
	swap := func(i, micro int, backward bool) func() {
		if at == nil {
			return nil
		}
		return at(i, micro, backward)
	}
	for micro := range m.micro {
		sampler.Next(inputs, targets)
		var x []float32
		clear(fwd)
		for i, s := range m.stages {
			t0 := time.Now()
			if i > 0 {
				// The sender encodes, the receiver decodes: both are on the sender's
				// account, with the frame's size.
				x = m.bounds[i-1].Forward(x, inputs, targets, m.tapes[i].B, m.tapes[i].T, true)
				fwd[i-1] += time.Since(t0)
				fwdBytes[i-1] = m.bounds[i-1].LastBytes
				t0 = time.Now()
			}
			restore := swap(i, micro, false)
			x = s.Forward(m.tapes[i], inputs, x)
			if i == last {
				loss += s.Loss(m.tapes[last], targets, 1/float32(m.micro))
			}
			if restore != nil {
				restore()
			}
			fwd[i] += time.Since(t0)
		}
		if tr != nil {
			for i := range m.stages {
				tr(OpForward, i, micro, fwd[i], fwdBytes[i])
			}
		}
		var g []float32
		for i := last; i >= 0; i-- {
			t0 := time.Now()
			var sent int64
			restore := swap(i, micro, true)
			g = m.stages[i].Backward(m.tapes[i], g)
			if restore != nil {
				restore()
			}
			if i > 0 {
				g = m.bounds[i-1].Backward(g, m.tapes[i].B, m.tapes[i].T)
				sent = m.bounds[i-1].LastBytes
			}
			if tr != nil {
				tr(OpBackward, i, micro, time.Since(t0), sent)
			}
		}
	}
	return loss / float64(m.micro)
}
