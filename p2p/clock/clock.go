// Package clock is time as the swarm's code sees it: a Clock that is injected where
// time decides behaviour (deadlines, ticks, retries), so tests can drive it, and the
// one rule for how long to wait on a peer (Deadline).
//
// Real is the wall clock. Manual is a clock that moves only when a test says so; tests
// whose goroutines block only on channels and timers can instead run inside
// testing/synctest, where Real's time is already virtual. Log timestamps and measured
// durations that decide nothing may keep using the time package.
package clock

import "time"

// Clock is what code that waits asks for the time.
type Clock interface {
	Now() time.Time
	Since(t time.Time) time.Duration
	// After is time.After: a channel that receives once, d from now.
	After(d time.Duration) <-chan time.Time
	NewTimer(d time.Duration) Timer
	// AfterFunc calls f on its own goroutine d from now (Manual calls it from Advance).
	AfterFunc(d time.Duration, f func()) Timer
	NewTicker(d time.Duration) Ticker
}

// Timer is a *time.Timer. C is nil for a timer made by AfterFunc.
type Timer interface {
	C() <-chan time.Time
	Stop() bool
	Reset(d time.Duration) bool
}

// Ticker is a *time.Ticker.
type Ticker interface {
	C() <-chan time.Time
	Stop()
	Reset(d time.Duration)
}

// Real is the wall clock (the time package).
var Real Clock = real{}

// Or returns c, or Real if c is nil: options whose zero value means the wall clock.
func Or(c Clock) Clock {
	if c == nil {
		return Real
	}
	return c
}

type real struct{}

func (real) Now() time.Time                         { return time.Now() }
func (real) Since(t time.Time) time.Duration        { return time.Since(t) }
func (real) After(d time.Duration) <-chan time.Time { return time.After(d) }
func (real) NewTimer(d time.Duration) Timer         { return realTimer{time.NewTimer(d)} }
func (real) AfterFunc(d time.Duration, f func()) Timer {
	return realTimer{time.AfterFunc(d, f)}
}
func (real) NewTicker(d time.Duration) Ticker { return realTicker{time.NewTicker(d)} }

type realTimer struct{ t *time.Timer }

func (t realTimer) C() <-chan time.Time        { return t.t.C }
func (t realTimer) Stop() bool                 { return t.t.Stop() }
func (t realTimer) Reset(d time.Duration) bool { return t.t.Reset(d) }

type realTicker struct{ t *time.Ticker }

func (t realTicker) C() <-chan time.Time   { return t.t.C }
func (t realTicker) Stop()                 { t.t.Stop() }
func (t realTicker) Reset(d time.Duration) { t.t.Reset(d) }
