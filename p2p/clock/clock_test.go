package clock

import (
	"slices"
	"testing"
	"testing/synctest"
	"time"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func TestManualFiresTimersInDeadlineOrderWithNowAtEach(t *testing.T) {
	m := NewManual(t0)
	var got []time.Duration
	record := func() { got = append(got, m.Since(t0)) }
	m.AfterFunc(3*time.Second, record)
	m.AfterFunc(time.Second, record)
	stopped := m.AfterFunc(2*time.Second, record)
	tm := m.NewTimer(2500 * time.Millisecond)
	if !stopped.Stop() || stopped.Stop() {
		t.Fatal("Stop: want true once, then false")
	}
	if m.Armed() != 3 {
		t.Fatalf("Armed = %d, want 3", m.Armed())
	}
	m.Advance(2 * time.Second)
	if want := []time.Duration{time.Second}; !slices.Equal(got, want) {
		t.Fatalf("after 2s fired at %v, want %v", got, want)
	}
	select {
	case <-tm.C():
		t.Fatal("timer due at 2.5s fired at 2s")
	default:
	}
	m.Advance(time.Hour)
	if want := []time.Duration{time.Second, 3 * time.Second}; !slices.Equal(got, want) {
		t.Fatalf("fired at %v, want %v", got, want)
	}
	if at := <-tm.C(); at != t0.Add(2500*time.Millisecond) {
		t.Fatalf("timer received %v, want its deadline", at)
	}
	if m.Now() != t0.Add(2*time.Second+time.Hour) || m.Armed() != 0 {
		t.Fatalf("Now = %v, Armed = %d", m.Now(), m.Armed())
	}
	if tm.Reset(time.Second) {
		t.Fatal("Reset of a fired timer: want false")
	}
	m.Advance(time.Second)
	<-tm.C()
}

func TestManualTickerTicksEveryPeriodAndDropsMissedTicks(t *testing.T) {
	m := NewManual(t0)
	k := m.NewTicker(time.Second)
	m.Advance(time.Second)
	if at := <-k.C(); at != t0.Add(time.Second) {
		t.Fatalf("first tick at %v", at)
	}
	m.Advance(5 * time.Second) // nobody reads: one tick kept, the rest dropped
	if at := <-k.C(); at != t0.Add(2*time.Second) {
		t.Fatalf("kept tick at %v, want the first missed one", at)
	}
	select {
	case at := <-k.C():
		t.Fatalf("a second missed tick was kept: %v", at)
	default:
	}
	k.Reset(10 * time.Second)
	m.Advance(9 * time.Second)
	select {
	case <-k.C():
		t.Fatal("ticked before the new period")
	default:
	}
	m.Advance(time.Second)
	<-k.C()
	k.Stop()
	if m.Armed() != 0 {
		t.Fatalf("stopped ticker still armed")
	}
}

func TestManualWaitArmedReturnsOnceCodeWaits(t *testing.T) {
	m := NewManual(t0)
	done := make(chan time.Time)
	go func() { done <- <-m.After(time.Minute) }()
	if !m.WaitArmed(1, nil) {
		t.Fatal("WaitArmed: false")
	}
	m.Advance(time.Minute)
	if at := <-done; at != t0.Add(time.Minute) {
		t.Fatalf("After received %v", at)
	}
	stop := make(chan struct{})
	close(stop)
	if m.WaitArmed(5, stop) {
		t.Fatal("WaitArmed with done closed and nothing armed: true")
	}
}

// Real is the time package, so inside a synctest bubble it reads virtual time: code
// that takes a Clock can be tested either way.
func TestRealRunsOnVirtualTimeInSynctest(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := Real.Now()
		fired := make(chan time.Duration, 1)
		Real.AfterFunc(time.Hour, func() { fired <- Real.Since(start) })
		if d := <-fired; d != time.Hour {
			t.Fatalf("AfterFunc after %v, want exactly an hour of virtual time", d)
		}
	})
}

func TestDeadlineRule(t *testing.T) {
	if got, want := Expect(time.Second, 3*time.Second), 6*time.Second; got != want {
		t.Fatalf("Expect(1s, 3s) = %v, want %v (twice the slowest)", got, want)
	}
	if got, want := Expect(2*time.Second, 3*time.Second), 8*time.Second; got != want {
		t.Fatalf("Expect(2s, 3s) = %v, want %v (four times the mean)", got, want)
	}
	if got, want := Deadline(8*time.Second, 50*time.Millisecond, Busy), 8*time.Second+400*time.Millisecond+5*time.Second; got != want {
		t.Fatalf("Deadline = %v, want %v", got, want)
	}
	if got, want := Outwait(time.Second, 5*time.Second), 15*time.Second; got != want {
		t.Fatalf("Outwait(1s, 5s) = %v, want %v (three times the slowest)", got, want)
	}
	// A stage's neighbour that hangs must be found stalled, and named, before a control
	// call to it (a gradient norm) runs out: equal measured times, a smaller slack.
	if Stall >= Busy {
		t.Fatalf("Stall %v is not below Busy %v", Stall, Busy)
	}
	if Or(nil) != Real {
		t.Fatal("Or(nil) is not Real")
	}
}
