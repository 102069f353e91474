package clock

import (
	"slices"
	"sync"
	"time"
)

// Manual is a Clock that moves only by Advance: a test arms what the code under test
// waits for, then moves time past it and sees what the code did. Timers fire in the
// order of their deadlines, each with Now at its deadline; AfterFunc's f runs on the
// goroutine that called Advance, so when Advance returns every f due has returned.
// Safe for concurrent use.
type Manual struct {
	mu      sync.Mutex
	now     time.Time
	seq     uint64
	waiting []*manualTimer // armed, in no order
	armed   chan struct{}  // closed and replaced whenever a timer is armed
}

// NewManual returns a Manual clock reading start.
func NewManual(start time.Time) *Manual {
	return &Manual{now: start, armed: make(chan struct{})}
}

// Now returns the clock's time.
func (m *Manual) Now() time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.now
}

// Since returns Now() − t.
func (m *Manual) Since(t time.Time) time.Duration { return m.Now().Sub(t) }

// After returns a channel that receives Now once the clock has moved d.
func (m *Manual) After(d time.Duration) <-chan time.Time { return m.NewTimer(d).C() }

// NewTimer returns a timer whose channel receives once the clock has moved d.
func (m *Manual) NewTimer(d time.Duration) Timer {
	t := &manualTimer{m: m, c: make(chan time.Time, 1)}
	t.Reset(d)
	return t
}

// AfterFunc calls f from the Advance that moves the clock d from now.
func (m *Manual) AfterFunc(d time.Duration, f func()) Timer {
	t := &manualTimer{m: m, f: f}
	t.Reset(d)
	return t
}

// NewTicker returns a ticker whose channel receives every d the clock moves, dropping
// ticks a slow reader misses, as time.Ticker does.
func (m *Manual) NewTicker(d time.Duration) Ticker {
	if d <= 0 {
		panic("clock: non-positive interval for NewTicker")
	}
	t := &manualTimer{m: m, c: make(chan time.Time, 1), period: d}
	t.Reset(d)
	return manualTicker{t}
}

// Armed returns how many timers and tickers are waiting for the clock to move.
func (m *Manual) Armed() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.waiting)
}

// WaitArmed blocks until at least n timers and tickers are waiting, or done is
// closed (then it returns false): a test calls it before Advance so that the code
// under test has armed what it will wait on.
func (m *Manual) WaitArmed(n int, done <-chan struct{}) bool {
	for {
		m.mu.Lock()
		k, armed := len(m.waiting), m.armed
		m.mu.Unlock()
		if k >= n {
			return true
		}
		select {
		case <-armed:
		case <-done:
			return false
		}
	}
}

// Advance moves the clock d forward, firing every timer due on the way in the order
// of its deadline (ties in the order they were armed).
func (m *Manual) Advance(d time.Duration) {
	m.mu.Lock()
	end := m.now.Add(d)
	m.mu.Unlock()
	for {
		m.mu.Lock()
		i := m.next(end)
		if i < 0 {
			m.now = end
			m.mu.Unlock()
			return
		}
		t := m.waiting[i]
		m.now = t.when
		if t.period > 0 {
			t.when = t.when.Add(t.period)
			m.seq++
			t.seq = m.seq
		} else {
			m.waiting = slices.Delete(m.waiting, i, i+1)
			t.armed = false
		}
		now, f, c := m.now, t.f, t.c
		m.mu.Unlock()
		if f != nil {
			f()
		} else {
			select {
			case c <- now:
			default:
			}
		}
	}
}

// next is the index of the armed timer due first by end, or −1.
func (m *Manual) next(end time.Time) int {
	best := -1
	for i, t := range m.waiting {
		if t.when.After(end) {
			continue
		}
		if best < 0 {
			best = i
			continue
		}
		if b := m.waiting[best]; t.when.Before(b.when) || (t.when.Equal(b.when) && t.seq < b.seq) {
			best = i
		}
	}
	return best
}

type manualTimer struct {
	m      *Manual
	c      chan time.Time
	f      func()
	period time.Duration
	when   time.Time
	seq    uint64
	armed  bool
}

func (t *manualTimer) C() <-chan time.Time { return t.c }

// drain drops a value sent but not received: after Stop or Reset no stale time is
// received, as with time.Timer since Go 1.23.
func (t *manualTimer) drain() {
	select {
	case <-t.c:
	default:
	}
}

func (t *manualTimer) Stop() bool {
	m := t.m
	m.mu.Lock()
	defer m.mu.Unlock()
	was := t.armed
	t.drain()
	if was {
		m.waiting = slices.DeleteFunc(m.waiting, func(u *manualTimer) bool { return u == t })
		t.armed = false
	}
	return was
}

// Reset rearms the timer d from now; a ticker's period becomes d.
func (t *manualTimer) Reset(d time.Duration) bool {
	m := t.m
	m.mu.Lock()
	defer m.mu.Unlock()
	was := t.armed
	t.drain()
	if t.period > 0 {
		if d <= 0 {
			panic("clock: non-positive interval for Ticker.Reset")
		}
		t.period = d
	}
	m.seq++
	t.when, t.seq = m.now.Add(d), m.seq
	if !was {
		t.armed = true
		m.waiting = append(m.waiting, t)
	}
	close(m.armed)
	m.armed = make(chan struct{})
	return was
}

type manualTicker struct{ t *manualTimer }

func (k manualTicker) C() <-chan time.Time   { return k.t.c }
func (k manualTicker) Stop()                 { k.t.Stop() }
func (k manualTicker) Reset(d time.Duration) { k.t.Reset(d) }
