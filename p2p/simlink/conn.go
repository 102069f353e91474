package simlink

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"
)

// early is how far ahead of the clock the receive side runs: a packet due
// within it is read now rather than after a sleep that short. At 1 Gbit/s
// packets are 12 µs apart, too close to sleep between. It also offsets the
// clock's wake-ups, which come ~50 µs late: a 1 ms LAN RTT measured
// 1.10–1.14 ms with packets released at their time, 0.96–1.09 with early.
const early = 50 * time.Microsecond

// preciseBelow is the path latency under which packets are released on
// the network's clock rather than on Go timers. A Go timer can fire a
// millisecond late, which is 5% of 20 ms but most of a LAN's 0.5 ms; the
// clock's wake-ups cost CPU (at 100 Mbit/s, 25 ms, a pair of hosts used
// 0.43 cores with them for every packet and 0.10 without).
const preciseBelow = 20 * time.Millisecond

// packet is a datagram in flight. at is when its last bit reaches the
// receiver's downlink, then, once through it, when it can be read.
type packet struct {
	buf  *[MTU]byte
	n    int
	from *net.UDPAddr
	at   time.Time
	lat  time.Duration // path latency
	loss float64       // path loss, drawn at the receiver
	seq  uint64        // arrival order among equal at
}

var bufPool = sync.Pool{New: func() any { return new([MTU]byte) }}

// conn is a node's UDP endpoint: a net.PacketConn whose writes go out on
// the node's uplink and whose reads come in on its downlink.
//
// Time is computed, not slept: a write reserves the uplink until its
// packet has been serialised (the uplink's backlog is the queue), and the
// packet is handed to the receiver stamped with its arrival time. A read
// passes arrived packets through the downlink the same way and returns
// the first one whose time has come, sleeping until then. Timers that
// fire late (Go's are ~1 ms coarse when the process is idle) therefore
// delay a packet but never lower the rate: the link's clock does not lose
// the time a timer overslept.
type conn struct {
	net  *Network
	node *node
	addr netip.AddrPort
	udp  *net.UDPAddr

	upMu   sync.Mutex
	upFree time.Time // when the uplink has sent its backlog

	mu       sync.Mutex
	closed   bool
	inbound  packetHeap // sent to us, not yet through the downlink
	ready    []*packet  // through the downlink, in order of at
	buffered int        // bytes in inbound and ready
	downFree time.Time  // when the downlink has sent its backlog
	seq      uint64
	rng      *rand.Rand
	deadline time.Time     // read deadline
	wake     chan struct{} // a read should look again: new packet or deadline
	done     chan struct{} // closed by Close

	readMu sync.Mutex    // one reader at a time owns tick, tickAt and timer
	tick   chan struct{} // cap 1: the network's clock says a time has come
	tickAt time.Time     // the latest time tick was asked for
	timer  *time.Timer   // for waits that need no precision
}

func newConn(n *Network, nd *node, ap netip.AddrPort) *conn {
	t := time.NewTimer(time.Hour)
	t.Stop()
	return &conn{
		timer: t,
		net:   n,
		node:  nd,
		addr:  ap,
		udp:   net.UDPAddrFromAddrPort(ap),
		rng:   rand.New(rand.NewPCG(n.seed, uint64(nd.idx))),
		wake:  make(chan struct{}, 1),
		done:  make(chan struct{}),
		tick:  make(chan struct{}, 1),
	}
}

var _ net.PacketConn = (*conn)(nil)

// WriteTo sends p to addr. Like UDP it does not block and does not report
// loss: a packet that finds the uplink queue full, or no listener, is
// dropped and counted in Stats.
func (c *conn) WriteTo(p []byte, addr net.Addr) (int, error) {
	ua, ok := addr.(*net.UDPAddr)
	if !ok {
		return 0, &net.OpError{Op: "write", Net: "udp", Addr: addr, Err: fmt.Errorf("simlink: want a *net.UDPAddr, have %T", addr)}
	}
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	if closed {
		return 0, &net.OpError{Op: "write", Net: "udp", Addr: addr, Err: net.ErrClosed}
	}
	n := c.net
	n.sent.Add(1)
	wire := len(p) + headerBytes
	if wire > MTU {
		n.drop(dropMTU)
		return len(p), nil
	}
	ap := ua.AddrPort()
	dst := n.lookup(netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
	if dst == nil {
		n.drop(dropNoRoute)
		return len(p), nil
	}
	if n.muted(c.node.ip, dst.node.ip) {
		n.drop(dropSilent)
		return len(p), nil
	}

	now := time.Now()
	c.upMu.Lock()
	start := c.upFree
	if start.Before(now) {
		start = now
	}
	if start.Sub(now) > c.node.queue {
		c.upMu.Unlock()
		n.drop(dropQueue)
		return len(p), nil
	}
	c.upFree = start.Add(c.node.txTime(wire))
	sent := c.upFree
	c.upMu.Unlock()

	latency, loss := n.path(c.node, dst.node)
	pkt := &packet{buf: bufPool.Get().(*[MTU]byte), n: len(p), from: c.udp, at: sent.Add(latency), lat: latency, loss: loss}
	copy(pkt.buf[:], p)
	dst.arrive(pkt)
	return len(p), nil
}

// arrive queues pkt for the downlink.
func (c *conn) arrive(pkt *packet) {
	c.mu.Lock()
	if c.closed || c.buffered+pkt.n > recvBufferBytes {
		closed := c.closed
		c.mu.Unlock()
		if !closed {
			c.net.drop(dropBuffer)
		} else {
			c.net.drop(dropNoRoute)
		}
		bufPool.Put(pkt.buf)
		return
	}
	pkt.seq = c.seq
	c.seq++
	c.buffered += pkt.n
	c.inbound.push(pkt)
	first := c.inbound[0] == pkt
	c.mu.Unlock()
	if first {
		c.poke()
	}
}

// poke wakes a waiting reader.
func (c *conn) poke() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// advance passes every packet that has arrived by now through loss and
// the downlink. Packets are taken in order of arrival: one sent later
// cannot arrive before now, because its arrival is after its send.
// Caller holds c.mu.
func (c *conn) advance(now time.Time) {
	for len(c.inbound) > 0 && !c.inbound[0].at.After(now) {
		p := c.inbound.pop()
		if p.loss > 0 && c.rng.Float64() < p.loss {
			c.discard(p, dropLoss)
			continue
		}
		start := c.downFree
		if start.Before(p.at) {
			start = p.at
		}
		if start.Sub(p.at) > c.node.queue {
			c.discard(p, dropQueue)
			continue
		}
		c.downFree = start.Add(c.node.txTime(p.n + headerBytes))
		p.at = c.downFree
		c.ready = append(c.ready, p)
	}
}

// discard drops p from the receive side. Caller holds c.mu.
func (c *conn) discard(p *packet, r dropReason) {
	c.buffered -= p.n
	c.net.drop(r)
	bufPool.Put(p.buf)
}

// ReadFrom returns the next packet through the downlink, waiting for it
// until the read deadline.
func (c *conn) ReadFrom(b []byte) (int, net.Addr, error) {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return 0, nil, &net.OpError{Op: "read", Net: "udp", Addr: c.udp, Err: net.ErrClosed}
		}
		now := time.Now()
		soon := now.Add(early)
		c.advance(soon)
		if len(c.ready) > 0 && !c.ready[0].at.After(soon) {
			p := c.ready[0]
			c.ready[0] = nil
			c.ready = c.ready[1:]
			c.buffered -= p.n
			c.mu.Unlock()
			n := copy(b, p.buf[:p.n])
			bufPool.Put(p.buf)
			c.net.recvd.Add(1)
			return n, p.from, nil
		}
		if !c.deadline.IsZero() && !now.Before(c.deadline) {
			c.mu.Unlock()
			// os.ErrDeadlineExceeded, as from a real socket: quic-go
			// treats it as temporary and checks whether it is closing.
			return 0, nil, &net.OpError{Op: "read", Net: "udp", Addr: c.udp, Err: os.ErrDeadlineExceeded}
		}
		var wake time.Time // the next time something can change
		var precise bool   // whether a late wake-up would distort an RTT
		earliest := func(t time.Time, p bool) {
			if wake.IsZero() || t.Before(wake) {
				wake, precise = t, p
			}
		}
		if len(c.ready) > 0 {
			earliest(c.ready[0].at.Add(-early), c.ready[0].lat < preciseBelow)
		}
		if len(c.inbound) > 0 {
			earliest(c.inbound[0].at.Add(-early), c.inbound[0].lat < preciseBelow)
		}
		if !c.deadline.IsZero() {
			earliest(c.deadline, false)
		}
		c.mu.Unlock()
		c.wait(wake, now, precise)
	}
}

// wait sleeps until next (zero: no limit), a poke or Close, on the
// network's clock if precise, else on a Go timer. Caller holds c.readMu.
// A clock wake-up asked for earlier and not yet due serves if it is no
// later than next; an early or stale tick only makes ReadFrom look again.
func (c *conn) wait(next, now time.Time, precise bool) {
	var timeout <-chan time.Time
	switch {
	case next.IsZero():
	case precise:
		if !c.tickAt.After(now) || next.Before(c.tickAt) {
			c.net.clock.wakeAt(next, c.tick)
			c.tickAt = next
		}
	default:
		c.timer.Reset(next.Sub(now))
		defer c.timer.Stop()
		timeout = c.timer.C
	}
	select {
	case <-c.tick:
	case <-timeout:
	case <-c.wake:
	case <-c.done:
	}
}

// Close closes the endpoint and drops what waits in it.
func (c *conn) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	close(c.done)
	for _, p := range c.inbound {
		bufPool.Put(p.buf)
	}
	for _, p := range c.ready {
		bufPool.Put(p.buf)
	}
	c.inbound, c.ready, c.buffered = nil, nil, 0
	c.mu.Unlock()
	c.net.unregister(c)
	return nil
}

func (c *conn) LocalAddr() net.Addr { return c.udp }

func (c *conn) SetDeadline(t time.Time) error { return c.SetReadDeadline(t) }

func (c *conn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	c.deadline = t
	c.mu.Unlock()
	c.poke()
	return nil
}

// SetWriteDeadline does nothing: writes never block.
func (c *conn) SetWriteDeadline(time.Time) error { return nil }

// SetReadBuffer and SetWriteBuffer keep quic-go from warning that it
// cannot size the socket buffers; the receive buffer is recvBufferBytes.
func (c *conn) SetReadBuffer(int) error  { return nil }
func (c *conn) SetWriteBuffer(int) error { return nil }

// packetHeap orders packets by at, then seq.
type packetHeap []*packet

func (h packetHeap) less(i, j int) bool {
	if !h[i].at.Equal(h[j].at) {
		return h[i].at.Before(h[j].at)
	}
	return h[i].seq < h[j].seq
}

func (h *packetHeap) push(p *packet) {
	*h = append(*h, p)
	s := *h
	for i := len(s) - 1; i > 0; {
		parent := (i - 1) / 2
		if !s.less(i, parent) {
			break
		}
		s[i], s[parent] = s[parent], s[i]
		i = parent
	}
}

func (h *packetHeap) pop() *packet {
	s := *h
	p := s[0]
	last := len(s) - 1
	s[0] = s[last]
	s[last] = nil
	s = s[:last]
	*h = s
	for i := 0; ; {
		l := 2*i + 1
		if l >= len(s) {
			break
		}
		j := l
		if r := l + 1; r < len(s) && s.less(r, l) {
			j = r
		}
		if !s.less(j, i) {
			break
		}
		s[i], s[j] = s[j], s[i]
		i = j
	}
	return p
}
