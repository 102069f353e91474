package core

import (
	"fmt"
	"time"
)

// EvalAt reports whether validation runs after step of a run of steps that
// evaluates every interval steps (0: after the last step only). The stages' cores and
// the single-process trainer both ask it.
func EvalAt(step, steps, interval int) bool {
	return step == steps || (interval > 0 && step%interval == 0)
}

// Checkpoints decides at which steps a stage writes a checkpoint during a run: every
// Interval steps, and at the steps its launcher ordered (the time rule, turned into a
// step by CheckpointClock). Every stage of a run decides alike, so they checkpoint the
// same steps and a resumed run always finds one that all of them hold. The last step is
// checkpointed when the run finishes, not here. A stage's Core keeps one; the
// single-process trainer keeps one with its own time rule (Every).
type Checkpoints struct {
	Interval int // 0: none by count
	Last     int // the run's last step
	// Every is the single-process trainer's time rule: a checkpoint once that long has
	// passed since the last one (DueAfter). 0: none by time.
	Every   time.Duration
	ordered map[int]bool
}

// DueAfter is Due with the time rule: since is how long ago the last checkpoint (or
// the run's start) was written.
func (c *Checkpoints) DueAfter(step int, since time.Duration) bool {
	return c.Due(step) || (c.Every > 0 && step > 0 && step < c.Last && since >= c.Every)
}

// Due reports whether step ends with a checkpoint.
func (c *Checkpoints) Due(step int) bool {
	if step <= 0 || step >= c.Last {
		return false
	}
	return (c.Interval > 0 && step%c.Interval == 0) || c.ordered[step]
}

// Order adds a checkpoint at step, which must be after done, the last step this stage
// has finished: a checkpoint ordered too late is refused (ErrStale), as every stage
// must take it or none.
func (c *Checkpoints) Order(step, done int) error {
	if step <= done {
		return fmt.Errorf("%w: checkpoint ordered at step %d, but step %d is done here", ErrStale, step, done)
	}
	if c.ordered == nil {
		c.ordered = map[int]bool{}
	}
	c.ordered[step] = true
	return nil
}

// CheckpointClock is a launcher's time rule: once Every has passed since the last
// checkpoint, it picks a step far enough ahead that every stage hears of it before it
// gets there, on an outer-step boundary (Align) with replicas, and not one a count rule
// (Interval) or the end of the run takes anyway.
type CheckpointClock struct {
	Every    time.Duration // 0: no time rule
	Interval int           // the count rule's interval, 0 if none
	Align    int           // checkpoint steps are multiples of it (≥ 1)
	Last     int           // the run's last step
	// Lead is how long the order must be ahead of the stages: a few of their round
	// trips to the launcher. It is turned into steps with the time a step takes.
	Lead time.Duration

	since   time.Duration // when the last checkpoint step was recorded
	pending int           // an ordered step not recorded yet
}

// Recorded takes the news that step was recorded at now (from the run's start), steps
// taking stepTime each lately; it returns a step to order every stage to checkpoint
// at, if one is due.
func (k *CheckpointClock) Recorded(step int, now, stepTime time.Duration) (int, bool) {
	align := max(1, k.Align)
	if (k.Interval > 0 && step%k.Interval == 0) || (k.pending > 0 && step >= k.pending) {
		k.since, k.pending = now, 0
	}
	if k.Every <= 0 || k.pending > 0 || now-k.since < k.Every {
		return 0, false
	}
	ahead := 2
	if stepTime > 0 {
		ahead += int(min(k.Lead/stepTime, 1000))
	}
	at := (step + ahead + align - 1) / align * align
	if at >= k.Last {
		return 0, false // the run's end is checkpointed anyway
	}
	if k.Interval > 0 && (step/k.Interval+1)*k.Interval <= at {
		return 0, false // the count rule checkpoints sooner
	}
	k.pending = at
	return at, true
}
