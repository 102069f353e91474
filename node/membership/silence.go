package membership

import (
	"time"

	"github.com/pipeswarm/pipeswarm/p2p/clock"
)

// silenceClock measures the time between the reports a launcher gets, and says when
// silence has lasted far longer than that, by the deadline rule (clock.Deadline): the
// gaps measured stretched by clock.Outwait (the longest gap includes evaluations; the
// stages judge each other by the narrower clock.Expect, so they report a stall first),
// plus clock.Busy, and no round trips (the gaps measured include the reports' way
// here); before two steps are measured, or while an evaluation is under way, at least
// the staffing timeout.
type silenceClock struct {
	staff          time.Duration
	last, lastStep time.Time
	sum, longest   time.Duration
	steps          int
	// With replicas, an outer step may wait for a replica that is gone: three times
	// the time between outer steps (the all-reduce's own rule), plus what syncs took.
	lastOuter         time.Time
	outerGap, syncMax time.Duration
}

// outer notes an outer step of stage 0 reported.
func (c *silenceClock) outer(now time.Time, sync time.Duration) {
	if !c.lastOuter.IsZero() {
		c.outerGap = max(c.outerGap, now.Sub(c.lastOuter))
	}
	c.lastOuter = now
	c.syncMax = max(c.syncMax, sync)
}

func (c *silenceClock) heard(now time.Time, step bool) {
	if step {
		if !c.lastStep.IsZero() {
			d := now.Sub(c.lastStep)
			c.sum += d
			c.longest = max(c.longest, d)
			c.steps++
		}
		c.lastStep = now
	}
	c.last = now
}

// overdue returns how long it has been silent, if that is past the deadline (also
// returned); 0 otherwise.
func (c *silenceClock) overdue(now time.Time, evaluating bool) (quiet, deadline time.Duration) {
	deadline = 2 * c.staff
	if c.steps >= 2 {
		deadline = clock.Deadline(clock.Outwait(c.sum/time.Duration(c.steps), c.longest)+3*c.outerGap+4*c.syncMax, 0, clock.Busy)
		if evaluating {
			deadline = max(deadline, c.staff)
		}
	}
	if q := now.Sub(c.last); q > deadline {
		return q, deadline
	}
	return 0, deadline
}
