package wire

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/clock"
	"github.com/pipeswarm/pipeswarm/p2p/traffic"
)

// CallClock gives control calls deadlines from what it has measured, by the deadline
// rule (clock.Deadline): for each message type, clock.Expect of the time calls of it
// took to be answered, plus round trips to the peer and clock.Busy. Until a type has
// been answered once, a call may take first (the run's staffing timeout: as long as a
// node may take to join at all).
type CallClock struct {
	first time.Duration
	clock clock.Clock
	mu    sync.Mutex
	seen  map[string]*callTimes
}

// Window is how long the end that answers a control call gives each of its two
// halves on the wire, reading the message and writing the reply: a control message
// is small, so the deadline rule with no work expected.
func Window(h *p2p.Host, p peer.ID) time.Duration {
	return clock.Deadline(0, h.Peerstore().LatencyEWMA(p), clock.Busy)
}

type callTimes struct {
	n         int
	sum, slow time.Duration
}

// NewCallClock returns a CallClock that measures calls on clk (nil: clock.Real).
func NewCallClock(first time.Duration, clk clock.Clock) *CallClock {
	return &CallClock{first: first, clock: clock.Or(clk), seen: map[string]*callTimes{}}
}

// Deadline is how long a call of typ to a peer rtt away may take.
func (c *CallClock) Deadline(typ string, rtt time.Duration) time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := c.seen[typ]
	if t == nil {
		return c.first
	}
	return clock.Deadline(clock.Expect(t.sum/time.Duration(t.n), t.slow), rtt, clock.Busy)
}

// Took records a call of typ answered after d.
func (c *CallClock) Took(typ string, d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := c.seen[typ]
	if t == nil {
		t = &callTimes{}
		c.seen[typ] = t
	}
	t.n++
	t.sum += d
	t.slow = max(t.slow, d)
}

// Call sends one control message to id and waits for the reply, within the deadline
// clock gives (and ctx's, if sooner), counting both on meter (which may be nil).
func Call(ctx context.Context, h *p2p.Host, calls *CallClock, meter *traffic.Meter, id peer.ID, m Msg) (*Reply, error) {
	began := calls.clock.Now()
	ctx, cancel := context.WithTimeout(ctx, calls.Deadline(m.Type, h.Peerstore().LatencyEWMA(id)))
	defer cancel()
	s, err := h.NewStream(p2p.AllowRelayed(ctx, "control"), id, p2p.ProtoControl)
	if err != nil {
		return nil, fmt.Errorf("%s to %s: %w", m.Type, id, err)
	}
	defer s.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = s.SetDeadline(dl)
	}
	cw := &traffic.CountingWriter{W: s}
	if err := p2p.WriteMsg(cw, m); err != nil {
		s.Reset()
		return nil, fmt.Errorf("%s to %s: %w", m.Type, id, err)
	}
	meter.Out(cw.N)
	var r Reply
	cr := &traffic.CountingReader{R: s}
	if err := p2p.ReadMsg(cr, &r, p2p.MaxMsgBytes); err != nil {
		s.Reset()
		return nil, fmt.Errorf("%s to %s: no reply: %w", m.Type, id, err)
	}
	meter.In(cr.N)
	calls.Took(m.Type, calls.clock.Since(began))
	return &r, nil
}
