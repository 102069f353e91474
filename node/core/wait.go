package core

import (
	"fmt"
	"time"

	"github.com/pipeswarm/pipeswarm/p2p/clock"
)

// Wait is what a stage is doing, or waiting for when it computes nothing.
type Wait int

const (
	Computing      Wait = iota // a compute action is out
	WaitActivation             // the previous stage's output (training or validation)
	WaitGradient               // the next stage's input gradient
	WaitNorm                   // the later stages' gradient norms, in flight (the exchange itself)
	WaitSync                   // the outer step with the other replicas
	// WaitBubble is the pipeline's drain: an earlier stage's norm, which it sends
	// when its own backward passes, run after this stage's, are done.
	WaitBubble
	Stopped // not started, or finished
	NumWaits
)

var waitNames = [NumWaits]string{"compute", "activation", "gradient", "norm", "sync", "bubble", "stopped"}

func (w Wait) String() string {
	if w < 0 || w >= NumWaits {
		return fmt.Sprintf("wait(%d)", int(w))
	}
	return waitNames[w]
}

// Waiting says what the stage is doing now: computing, or, idle, what it needs
// before it can compute again. Utilisation and the split of idle time come from it.
func (c *Core) Waiting() Wait {
	if c.busy {
		return Computing
	}
	switch c.phase {
	case training:
		if c.cfg.Async {
			if c.asyncNextIsForward() && !c.cfg.first() {
				return WaitActivation
			}
			return WaitGradient
		}
		if !c.cfg.first() && c.forwarded < c.cfg.MicroBatches && c.inFlight() < c.cfg.maxInFlight() && c.inFlight() == 0 {
			return WaitActivation
		}
		if c.cfg.last() || c.inFlight() > 0 {
			return WaitGradient
		}
		return WaitActivation
	case sharing:
		// An earlier stage's backward passes follow this one's, and its norm follows
		// them: waiting for it is waiting for the pipeline to drain.
		for s := range c.cfg.Stage {
			if !c.hasNorm(s) {
				return WaitBubble
			}
		}
		return WaitNorm
	case stepping:
		return WaitNorm
	case syncing:
		return WaitSync
	case evaluating:
		return WaitActivation
	}
	return Stopped
}

// Ledger adds up how long a stage spent in each Wait, and keeps the intervals that
// fall in a window of steps for a timeline. Times are offsets from the run's start,
// measured (a node) or virtual (the WAN bench's meter), so it is deterministic.
type Ledger struct {
	Total [NumWaits]time.Duration
	// Window, if Hi > 0, is the steps [Lo, Hi] whose intervals are kept in Spans.
	Window struct{ Lo, Hi int }
	Spans  []Span

	at      time.Duration
	cur     Wait
	step    int
	started bool
}

// Span is one interval of a stage's timeline.
type Span struct {
	Step       int
	Wait       Wait
	Start, End time.Duration
}

// Mark closes the interval since the last mark, in the state then current, and
// enters state w (of step) at time at.
func (l *Ledger) Mark(at time.Duration, w Wait, step int) {
	if d := at - l.at; d > 0 && l.started {
		l.Total[l.cur] += d
		if l.Window.Hi > 0 && l.step >= l.Window.Lo && l.step <= l.Window.Hi {
			if n := len(l.Spans); n > 0 && l.Spans[n-1].Wait == l.cur && l.Spans[n-1].End == l.at {
				l.Spans[n-1].End = at
			} else {
				l.Spans = append(l.Spans, Span{Step: l.step, Wait: l.cur, Start: l.at, End: at})
			}
		}
	}
	l.at, l.cur, l.step, l.started = at, w, step, true
}

// Deadline is how long the stage may wait idle for a neighbour now, by the deadline
// rule (clock.Deadline): what the step times measured lead one to expect
// (clock.Expect), or Config.StartTimeout before it has measured a step, plus round
// trips to the farthest neighbour and, once steps are measured, clock.Stall (a loaded
// machine pauses); 0 means no deadline. A slow but steady neighbour only lengthens the
// steps measured, and the deadline with them; one that stops is found within a few of
// its usual steps.
func (c *Core) Deadline() time.Duration {
	if c.stepN == 0 {
		if c.cfg.StartTimeout == 0 {
			return 0
		}
		return clock.Deadline(c.cfg.StartTimeout, c.rtt, 0)
	}
	d := clock.Deadline(clock.Expect(c.stepSum/time.Duration(c.stepN), c.stepMax), c.rtt, clock.Stall)
	// What a neighbour sends next may wait for its outer step: in the step after one,
	// and in the evaluation that follows one.
	if l := c.outer.last; l > 0 && ((c.phase == evaluating && l == c.step) || (c.phase != evaluating && l == c.step-1)) {
		d += c.outerWait
	}
	return d
}

// tick advances the core's time and reports a stall once: idle, waiting for a
// neighbour (not for its own compute, nor for an outer step, which the all-reduce
// times itself), for longer than the deadline since anything last happened.
func (c *Core) tick(t Tick) []Action {
	if t.Now > c.now {
		c.now = t.Now
	}
	c.rtt = max(c.rtt, t.RTT)
	c.outerWait = t.Outer
	if c.stalled || c.busy {
		return nil
	}
	switch c.phase {
	case training, sharing, evaluating:
	default:
		return nil
	}
	dl := c.Deadline()
	waited := c.now - c.lastEvent
	if dl == 0 || waited <= dl {
		return nil
	}
	c.stalled = true
	return []Action{Stalled{Step: c.step, Stage: c.waitedFor(), Wait: c.Waiting(), Waited: waited, Deadline: dl}}
}

// waitedFor is the stage whose silence holds this one up: the previous stage for an
// activation, the next for a gradient, the last stage whose norm is missing.
func (c *Core) waitedFor() int {
	switch c.Waiting() {
	case WaitActivation:
		if !c.cfg.first() {
			return c.cfg.Stage - 1
		}
	case WaitGradient:
		if !c.cfg.last() {
			return c.cfg.Stage + 1
		}
	case WaitNorm, WaitBubble:
		// A stage's norm follows its backward passes, which follow the next stage's:
		// every stage before a silent one waits on it too, and is missing its norm
		// as well. The last stage whose norm is missing is the one held up by no other.
		for s := c.cfg.Stages - 1; s >= 0; s-- {
			if _, ok := c.norms[c.step][s]; !ok {
				return s
			}
		}
	}
	return c.cfg.Stage
}
