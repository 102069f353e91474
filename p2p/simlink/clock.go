package simlink

import (
	"runtime"
	"sync"
	"time"
)

const (
	// coarse is how late a Go timer may fire: when the process is
	// otherwise idle the runtime waits in whole milliseconds, so a 100 µs
	// timer fires after about 1.1 ms. A sleeper due within coarse is woken
	// by sleepSlice-long precise sleeps instead.
	coarse = 2 * time.Millisecond
	// sleepSlice bounds one precise sleep, so that a sleeper that arrives
	// meanwhile with an earlier time waits at most this much extra.
	sleepSlice = 200 * time.Microsecond
)

// clock wakes readers at the times their packets are due, to within tens
// of microseconds where Go's timers are a millisecond late: that error,
// twice per round trip, would double a 1 ms LAN RTT. One goroutine serves
// a whole Network; it sleeps on a Go timer until a wake-up is within
// coarse, then in short precise sleeps (nanosleep on Linux).
type clock struct {
	mu       sync.Mutex
	sleepers wakeHeap
	kick     chan struct{} // cap 1: a sleeper arrived
	done     chan struct{}
	exited   chan struct{}
	stop     sync.Once
}

// wakeup asks for a send on ch at at.
type wakeup struct {
	at time.Time
	ch chan<- struct{}
}

func newClock() *clock {
	c := &clock{kick: make(chan struct{}, 1), done: make(chan struct{}), exited: make(chan struct{})}
	go c.run()
	return c
}

// wakeAt sends on ch (without blocking; give it room for one) at t.
func (c *clock) wakeAt(t time.Time, ch chan<- struct{}) {
	c.mu.Lock()
	c.sleepers.push(wakeup{t, ch})
	first := c.sleepers[0].ch == ch && c.sleepers[0].at.Equal(t)
	c.mu.Unlock()
	if first {
		select {
		case c.kick <- struct{}{}:
		default:
		}
	}
}

// close stops the clock; pending wake-ups are not sent.
func (c *clock) close() {
	c.stop.Do(func() { close(c.done) })
	<-c.exited
}

func (c *clock) run() {
	defer close(c.exited)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		now := time.Now()
		c.mu.Lock()
		woke := false
		for len(c.sleepers) > 0 && !c.sleepers[0].at.After(now) {
			w := c.sleepers.pop()
			select {
			case w.ch <- struct{}{}:
			default:
			}
			woke = true
		}
		var next time.Time
		if len(c.sleepers) > 0 {
			next = c.sleepers[0].at
		}
		c.mu.Unlock()
		if woke {
			// Let the woken readers run on this P now rather than wait
			// for another to steal them while we sleep in a syscall.
			runtime.Gosched()
			continue
		}
		switch d := next.Sub(now); {
		case next.IsZero():
			select {
			case <-c.kick:
			case <-c.done:
				return
			}
		case d > coarse:
			timer.Reset(d - coarse)
			select {
			case <-timer.C:
			case <-c.kick:
			case <-c.done:
				timer.Stop()
				return
			}
			timer.Stop()
		default:
			preciseSleep(min(d, sleepSlice))
			select {
			case <-c.done:
				return
			default:
			}
		}
	}
}

// wakeHeap orders wake-ups by time.
type wakeHeap []wakeup

func (h *wakeHeap) push(w wakeup) {
	*h = append(*h, w)
	s := *h
	for i := len(s) - 1; i > 0; {
		parent := (i - 1) / 2
		if !s[i].at.Before(s[parent].at) {
			break
		}
		s[i], s[parent] = s[parent], s[i]
		i = parent
	}
}

func (h *wakeHeap) pop() wakeup {
	s := *h
	w := s[0]
	last := len(s) - 1
	s[0] = s[last]
	s[last] = wakeup{}
	s = s[:last]
	*h = s
	for i := 0; ; {
		l := 2*i + 1
		if l >= len(s) {
			break
		}
		j := l
		if r := l + 1; r < len(s) && s[r].at.Before(s[l].at) {
			j = r
		}
		if !s[j].at.Before(s[i].at) {
			break
		}
		s[i], s[j] = s[j], s[i]
		i = j
	}
	return w
}
