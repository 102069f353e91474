package train

import (
	"math"
	"time"

	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/stage"
)

// asyncState is what a model needs to run the async schedule in one process: the
// schedule and the delay handling (the units keep the past weight versions).
type asyncState struct {
	sched core.Async
	delay string
	// cur[s] keeps stage s's current weights while an older version is loaded.
	cur [][]float32
	// clip is each stage's own gradient-norm bound.
	clip float64
}

func newAsyncState(sp *spec.Spec, units []*stage.Unit) (*asyncState, error) {
	a := &asyncState{
		sched: AsyncSchedule(sp),
		delay: sp.Train.Delay,
		clip:  AsyncClip(sp),
	}
	for s, u := range units {
		if err := u.SetAsync(sp, a.sched.MaxDelay(s), a.sched.Delay(s)); err != nil {
			return nil, err
		}
		a.cur = append(a.cur, make([]float32, len(u.Stage.Params)))
	}
	return a, nil
}

// Stashed is the memory of the past weight versions stage s's unit keeps that a
// live stage would hold too: the versions its backwards run on with stash and
// nesterov; with none a live stage needs none (this process keeps them to run each
// forward on the version the schedule gives it).
func (a *asyncState) Stashed(u *stage.Unit) int64 {
	if a.delay == spec.DelayNone {
		return 0
	}
	return u.Kept()
}

// load makes unit s compute on the weights of version v, the current version being
// cur, and says whether restore must undo it.
func (a *asyncState) load(s int, u *stage.Unit, v, cur int) bool {
	age := cur - v
	if age == 0 {
		return false
	}
	copy(a.cur[s], u.Stage.Params)
	copy(u.Stage.Params, u.Past(age))
	return true
}

func (a *asyncState) restore(s int, u *stage.Unit) { copy(u.Stage.Params, a.cur[s]) }

// asyncStep runs update step of the async schedule: its m.micro micro-batches, each
// stage's forward on the weight version the schedule gives it and its backward on the
// same version (stash, nesterov) or the current one (none), then every stage's update
// with its own clipping. It returns the mean loss and the norm of the whole gradient
// before clipping, as step does.
func (m *model) asyncStep(step int, sampler *data.Sampler[int32], inputs, targets []int32, lr float32, tr tracer) (loss, norm float64) {
	a := m.async
	for _, s := range m.stages {
		s.ZeroGrads()
	}
	last := len(m.stages) - 1
	if len(m.fwd) != len(m.stages) {
		m.fwd, m.opt, m.fwdBytes = make([]time.Duration, len(m.stages)), make([]time.Duration, len(m.stages)), make([]int64, len(m.stages))
	}
	fwd, fwdBytes := m.fwd, m.fwdBytes
	cur := step - 1 // the version every stage holds during this update's micro-batches
	for micro := range m.micro {
		j := cur*m.micro + micro
		sampler.Next(inputs, targets)
		var x []float32
		for i, s := range m.stages {
			t0 := time.Now()
			if i > 0 {
				// The sender encodes, the receiver decodes: both on the sender's account.
				x = m.bounds[i-1].Forward(x, inputs, targets, m.tapes[i].B, m.tapes[i].T, true)
				fwd[i-1] += time.Since(t0)
				fwdBytes[i-1] = m.bounds[i-1].LastBytes
				t0 = time.Now()
			}
			loaded := a.load(i, m.units[i], a.sched.ForwardVersion(i, j), cur)
			x = s.Forward(m.tapes[i], inputs, x)
			if i == last {
				loss += s.Loss(m.tapes[last], targets, 1/float32(m.micro))
			}
			if loaded {
				a.restore(i, m.units[i])
			}
			fwd[i] = time.Since(t0)
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
			v := a.sched.BackwardVersion(j)
			if a.delay != spec.DelayNone {
				v = a.sched.ForwardVersion(i, j)
			}
			loaded := a.load(i, m.units[i], v, cur)
			g = m.stages[i].Backward(m.tapes[i], g)
			if loaded {
				a.restore(i, m.units[i])
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
	var ss float64
	for i, u := range m.units {
		t0 := time.Now()
		n := u.GradSumSquares()
		ss += n
		u.Update(math.Sqrt(n), a.clip, lr)
		if tr != nil {
			tr(OpOptimize, i, 0, time.Since(t0), 0)
		}
	}
	return loss / float64(m.micro), math.Sqrt(ss)
}
