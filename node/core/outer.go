package core

import "fmt"

// The outer step, with replicas. After its optimiser step at step s a stage has
// outer-step work if an all-reduce it overlapped with step s (begun after s−1) waits to
// be applied, or if a fragment is due after s. In order, with compute otherwise idle:
//
//  1. the overlapped all-reduce from s−1 is waited for (ReduceDone) and applied
//     (ApplyOuter{s−1, Overlapped});
//  2. the fragments due after s are all-reduced (StartReduce{s}): overlapped (not the
//     last step) the stage goes on at once and applies the result after s+1; otherwise
//     it waits for ReduceDone{s} and applies it (ApplyOuter{s});
//  3. if anything was applied, the run took an outer step after s (OuterDone{s}).
//
// Then the step is done. This is the order the single-process trainer takes the same
// outer steps in (train's syncer), so replicas launched on nodes and trained in one
// process end on the same weights.

// reduction is an all-reduce begun after step (0: none).
type reduction struct {
	step int
	done bool
}

type outerState struct {
	pend    reduction // overlapped: begun after an earlier step, applied after the next one
	block   reduction // waited for in this outer step
	started bool      // this step's StartReduce is out (or nothing was due)
	applied bool      // an ApplyOuter ran in this step's outer step
	last    int       // the last step that had an outer step, for the deadline
}

// Begin is the outer-step work begun after step of a run of steps: the fragments due
// then, and whether their all-reduce overlaps the next step (Streaming DiLoCo, every
// step but the last) or is waited for. The single-process trainer asks it too.
func (o *Outer) Begin(step, steps int) (frags []int, overlap bool) {
	for f := range o.Fragments {
		if o.Due(f, step) {
			frags = append(frags, f)
		}
	}
	return frags, len(frags) > 0 && o.Overlap && step != steps
}

// Applied reports whether the run takes an outer step after step (OuterDone): one
// waited for is due then, or an overlapped one begun after the step before is
// applied then.
func (o *Outer) Applied(step, steps int) bool {
	if fs, overlap := o.Begin(step, steps); len(fs) > 0 && !overlap {
		return true
	}
	_, overlap := o.Begin(step-1, steps)
	return step > 1 && overlap
}

// resumeOuter begins again, on a resumed run's Start, the overlapped all-reduce that
// was under way when the step resumed from ended: its checkpoint holds the weights,
// global weights and residual as they were when it began, so the contributions are
// the same, and it is applied after the next step as it would have been.
func (c *Core) resumeOuter(out []Action) []Action {
	if c.cfg.Outer == nil || c.cfg.From == 0 || c.cfg.Async {
		return out
	}
	if fs, overlap := c.cfg.Outer.Begin(c.cfg.From, c.cfg.Steps); overlap {
		c.outer.pend = reduction{step: c.cfg.From}
		out = append(out, StartReduce{Step: c.cfg.From, Frags: fs, Overlap: true})
	}
	return out
}

// outerDue reports whether the step just optimised has outer-step work.
func (c *Core) outerDue() bool {
	if c.cfg.Outer == nil {
		return false
	}
	fs, _ := c.cfg.Outer.Begin(c.step, c.cfg.Steps)
	return c.outer.pend.step > 0 || len(fs) > 0
}

func (c *Core) beginOuter() {
	c.phase = syncing
	c.outer.started, c.outer.applied, c.outer.last = false, false, c.step
}

// nextOuter is the outer step's next action, nil while it waits for an all-reduce.
func (c *Core) nextOuter() []Action {
	o := &c.outer
	if p := o.pend; p.step > 0 && p.step < c.step {
		if !p.done {
			return nil
		}
		o.pend, o.applied = reduction{}, true
		c.busy, c.cur = true, pending{kind: kindApplyOuter}
		return []Action{ApplyOuter{Step: p.step, Overlapped: true}}
	}
	var out []Action
	if !o.started {
		o.started = true
		if fs, overlap := c.cfg.Outer.Begin(c.step, c.cfg.Steps); len(fs) > 0 {
			out = append(out, StartReduce{Step: c.step, Frags: fs, Overlap: overlap})
			if overlap {
				o.pend = reduction{step: c.step}
			} else {
				o.block = reduction{step: c.step}
			}
		}
	}
	if b := o.block; b.step > 0 {
		if !b.done {
			return out
		}
		o.block, o.applied = reduction{}, true
		c.busy, c.cur = true, pending{kind: kindApplyOuter}
		return append(out, ApplyOuter{Step: b.step})
	}
	if o.applied {
		o.applied = false
		out = append(out, OuterDone{Step: c.step})
	}
	return c.stepDone(out)
}

// reduceDone takes the news that the all-reduce begun after step is over.
func (c *Core) reduceDone(step int) error {
	o := &c.outer
	switch {
	case step > 0 && o.pend.step == step && !o.pend.done:
		o.pend.done = true
	case step > 0 && o.block.step == step && !o.block.done:
		o.block.done = true
	default:
		return fmt.Errorf("%w: all-reduce after step %d done, but none is under way", ErrProtocol, step)
	}
	return nil
}
