package reduce

import (
	"context"
	"testing"
	"testing/synctest"
	"time"

	"github.com/pipeswarm/pipeswarm/p2p/clock"
)

// A member that never starts the round is given up exactly at the deadline rule's
// time, arrive plus clock.Deadline's slack, on virtual time: the mock network runs
// inside a synctest bubble, so the group's waits cost nothing real.
func TestAbsentMemberIsGivenUpAtTheDeadlineRule(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const R, v = 3, 2
		c := spec(t, "bf16")
		cl := newCluster(t, R, c, nil)
		ys := randVecs(R, 4*PieceValues, 5)
		start := time.Now()
		out := cl.run(context.Background(), 1, ys, time.Hour, others(R, v))
		// The mock network has measured no round trip: the deadline is the
		// test cluster's Slack on top of arrive.
		if got, want := time.Since(start), time.Hour+clock.Deadline(0, 0, 2*time.Second); got != want {
			t.Errorf("given up after %v, want %v", got, want)
		}
		res := checkSurvivors(t, c, ys, out, others(R, v))
		if len(res.Missing) != 1 || res.Missing[0] != v {
			t.Errorf("missing %v, want [%d]", res.Missing, v)
		}
	})
}

// Every wait of a group is timed by its Clock: on a Manual clock the round with an
// absent member waits, however long the goroutines run, until the clock is moved to
// the deadline, and not a nanosecond less.
func TestGroupWaitsOnItsClock(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const R, v = 3, 2
		c := spec(t, "bf16")
		m := clock.NewManual(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
		cl := newCluster(t, R, c, func(_ int, cfg *GroupConfig) { cfg.Clock = m })
		ys := randVecs(R, 4*PieceValues, 5)
		done := make(chan []outcome, 1)
		go func() { done <- cl.run(context.Background(), 1, ys, time.Hour, others(R, v)) }()
		ended := func() bool {
			synctest.Wait()
			select {
			case <-done:
				return true
			default:
				return false
			}
		}
		if ended() {
			t.Fatal("the round ended before the clock moved")
		}
		m.Advance(time.Hour + 2*time.Second - time.Nanosecond)
		if ended() {
			t.Fatal("the round ended before its deadline")
		}
		m.Advance(time.Nanosecond)
		synctest.Wait()
		res := checkSurvivors(t, c, ys, <-done, others(R, v))
		if len(res.Missing) != 1 || res.Missing[0] != v {
			t.Errorf("missing %v, want [%d]", res.Missing, v)
		}
	})
}
