package wire

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/traffic"
)

// CallClock gives control calls deadlines from what it has measured: for each
// message type, the time calls of it took to be answered (4 times their mean or
// twice the slowest, whichever is longer), plus 8 round trips to the peer and
// CallMargin. Until a type has been answered once, a call may take first (the run's
// staffing timeout: as long as a node may take to join at all).
type CallClock struct {
	first time.Duration
	mu    sync.Mutex
	seen  map[string]*callTimes
}

// CallMargin covers what a measured call time does not: a busy machine (a node's
// compute saturates its cores) can hold a reply back for seconds.
const CallMargin = 5 * time.Second

// Window is how long the end that answers a control call gives each of its two
// halves on the wire, reading the message and writing the reply: a control message
// is small, so round trips to the peer and the margin.
func Window(h *p2p.Host, p peer.ID) time.Duration {
	return CallMargin + 8*h.Peerstore().LatencyEWMA(p)
}

type callTimes struct {
	n         int
	sum, slow time.Duration
}

func NewCallClock(first time.Duration) *CallClock {
	return &CallClock{first: first, seen: map[string]*callTimes{}}
}

// Deadline is how long a call of typ to a peer rtt away may take.
func (c *CallClock) Deadline(typ string, rtt time.Duration) time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := c.seen[typ]
	if t == nil {
		return c.first
	}
	return max(4*t.sum/time.Duration(t.n), 2*t.slow) + 8*rtt + CallMargin
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
func Call(ctx context.Context, h *p2p.Host, clock *CallClock, meter *traffic.Meter, id peer.ID, m Msg) (*Reply, error) {
	began := time.Now()
	ctx, cancel := context.WithTimeout(ctx, clock.Deadline(m.Type, h.Peerstore().LatencyEWMA(id)))
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
	clock.Took(m.Type, time.Since(began))
	return &r, nil
}
