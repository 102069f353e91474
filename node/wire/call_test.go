package wire

import (
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/p2p/clock"
)

func TestCallDeadlinesComeFromTheCallsMeasured(t *testing.T) {
	c := NewCallClock(time.Minute, nil)
	if got := c.Deadline(MsgNorm, 0); got != time.Minute {
		t.Errorf("before any norm was answered: %s, want the staffing bound 1m", got)
	}
	for _, d := range []time.Duration{10 * time.Millisecond, 30 * time.Millisecond, 20 * time.Millisecond} {
		c.Took(MsgNorm, d)
	}
	// 4 × the 20 ms mean beats 2 × the 30 ms slowest; then 8 round trips and the margin.
	if got, want := c.Deadline(MsgNorm, 50*time.Millisecond), 80*time.Millisecond+400*time.Millisecond+clock.Busy; got != want {
		t.Errorf("after norms of 10, 30 and 20 ms over a 50 ms path: %s, want %s", got, want)
	}
	c.Took(MsgNorm, time.Second)
	if got, want := c.Deadline(MsgNorm, 0), 2*time.Second+clock.Busy; got != want {
		t.Errorf("after a 1 s norm: %s, want twice the slowest plus the margin, %s", got, want)
	}
	if got := c.Deadline(MsgAssign, 0); got != time.Minute {
		t.Errorf("assign, never measured: %s; each kind is timed on its own", got)
	}
}
