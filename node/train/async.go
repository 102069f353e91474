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

// Stashed is the memory of the past weight versions stage s's unit keeps, as a live
// stage keeps them whatever train.delay (the backwards of stash and nesterov run on
// them, and a resumed run runs the forwards in flight at its checkpoint again on
// them) and staffing counts them (assign.Memory.Stashed).
func (a *asyncState) Stashed(u *stage.Unit) int64 { return u.Kept() }

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
	cur := step - 1 // the version every stage holds during this update's micro-batches
	loss = m.microBatches(sampler, inputs, targets, tr, func(i, micro int, backward bool) func() {
		j := cur*m.micro + micro
		v := a.sched.ForwardVersion(i, j)
		if backward && a.delay == spec.DelayNone {
			v = a.sched.BackwardVersion(j)
		}
		if !a.load(i, m.units[i], v, cur) {
			return nil
		}
		return func() { a.restore(i, m.units[i]) }
	})
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
	return loss, math.Sqrt(ss)
}
