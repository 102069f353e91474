package simlink

import (
	ma "github.com/multiformats/go-multiaddr"

	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p"
)

const (
	// MTU is the largest packet a link carries, in bytes on the wire with
	// the IPv4 and UDP headers; larger datagrams are dropped, as with the
	// don't-fragment bit that QUIC sets.
	MTU = 1500
	// Port is the UDP port every node listens on.
	Port = 4242

	// headerBytes is the IPv4 and UDP header each datagram carries on the
	// wire: the link's rate is spent on it too, as on a real link.
	headerBytes = 28
	// minQueue is the shortest drop-tail queue, in time to drain it.
	// quic-go paces in bursts of up to 2 ms of data (its pacer's minimum
	// delay plus timer granularity) and Go timers add up to 1 ms more, so a
	// LAN link whose queue holds only its 1 ms BDP drops those bursts:
	// 384 Mbit/s of 1000 with a 64-packet queue, ~950 with 6 ms.
	minQueue = 6 * time.Millisecond
	// recvBufferBytes bounds what waits for a reader on one endpoint, like
	// a socket's receive buffer; only a reader starved of CPU fills it.
	recvBufferBytes = 16 << 20
)

// ErrBadLink is wrapped by errors about a Link that cannot be simulated.
var ErrBadLink = errors.New("simlink: bad link")

// Link is a node's access link, the same each way.
type Link struct {
	Mbps    float64       // bandwidth each way, counting IP and UDP headers
	Latency time.Duration // one way; see Network for how two links combine
	Loss    float64       // fraction of packets dropped, 0 ≤ Loss < 1
}

// Validate reports the first field that cannot be simulated.
func (l Link) Validate() error {
	switch {
	case !(l.Mbps > 0) || math.IsInf(l.Mbps, 1):
		return fmt.Errorf("%w: Mbps %v: want a finite rate > 0", ErrBadLink, l.Mbps)
	case l.Latency < 0:
		return fmt.Errorf("%w: Latency %v is negative", ErrBadLink, l.Latency)
	case !(l.Loss >= 0 && l.Loss < 1):
		return fmt.Errorf("%w: Loss %v: want 0 ≤ Loss < 1", ErrBadLink, l.Loss)
	}
	return nil
}

func (l Link) String() string {
	s := fmt.Sprintf("%g Mbit/s, %v one way", l.Mbps, l.Latency)
	if l.Loss > 0 {
		s += fmt.Sprintf(", %g%% loss", 100*l.Loss)
	}
	return s
}

// ErrClosed is returned by Node after Close.
var ErrClosed = errors.New("simlink: network closed")

// Network is a simulated internet: every node has its own access link.
// Packets from A to B are serialised on A's uplink at A's rate, travel for
// the path latency, are dropped with the path loss, then serialised on B's
// downlink at B's rate, so a path's bandwidth is min(A, B). Each uplink and
// downlink has a drop-tail queue of one bandwidth-delay product of its own
// link (rate × 2×Latency), at least 6 ms of it; the package doc says why.
//
// Each link contributes half its latency and half its loss to a path: two
// nodes on the same profile see RTT = 2×Latency and the profile's loss, a
// 25 ms node and a 75 ms node see 50 ms one way. SetLatency overrides a
// pair's latency.
//
// Time is computed rather than slept (see conn), so the rates are exact
// however late the process wakes. A Network runs one goroutine, its clock;
// Close stops it.
type Network struct {
	seed  uint64
	clock *clock

	mu      sync.RWMutex
	closed  bool
	nodes   []*node
	open    map[netip.AddrPort]*conn
	latency map[[2]int]time.Duration // by node indices, lower first
	silent  map[netip.Addr]bool      // nodes whose packets, either way, are dropped (Silence)

	drops [numDropReasons]atomic.Int64
	sent  atomic.Int64
	recvd atomic.Int64
}

// New returns an empty network; seed fixes the loss pattern of each link.
// Close it to stop its goroutine.
func New(seed int64) *Network {
	return &Network{
		seed:    uint64(seed),
		clock:   newClock(),
		open:    make(map[netip.AddrPort]*conn),
		latency: make(map[[2]int]time.Duration),
		silent:  make(map[netip.Addr]bool),
	}
}

// node is one registered node: its address and link.
type node struct {
	idx       int
	ip        netip.Addr
	link      Link
	nsPerByte float64       // serialisation time of one byte
	queue     time.Duration // drop-tail limit of its uplink and downlink
}

func (nd *node) txTime(wireBytes int) time.Duration {
	return time.Duration(float64(wireBytes) * nd.nsPerByte)
}

// Node registers a node with link and returns what p2p.HostOptions needs:
// the QUIC transport over this network, and the address to listen on
// (/ip4/10.9.x.y/udp/4242/quic-v1, x.y counting from the first node).
// Nodes are numbered 0, 1, … in the order Node is called. A host closed
// and started again on the same transports gets its endpoint back; while
// none listens, packets to the node are dropped.
func (n *Network) Node(link Link) (transports []libp2p.Option, listen []string, err error) {
	nd, err := n.addNode(link)
	if err != nil {
		return nil, nil, err
	}
	return n.transports(nd), []string{fmt.Sprintf("/ip4/%s/udp/%d/quic-v1", nd.ip, Port)}, nil
}

func (n *Network) addNode(link Link) (*node, error) {
	if err := link.Validate(); err != nil {
		return nil, err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, ErrClosed
	}
	idx := len(n.nodes)
	if idx >= 254*256 {
		return nil, fmt.Errorf("simlink: node %d: the 10.9.0.0/16 range is full", idx)
	}
	nsPerByte := 8e3 / link.Mbps
	queue := max(2*link.Latency, minQueue)
	nd := &node{
		idx:       idx,
		ip:        netip.AddrFrom4([4]byte{10, 9, byte(idx / 254), byte(idx%254 + 1)}),
		link:      link,
		nsPerByte: nsPerByte,
		queue:     queue,
	}
	n.nodes = append(n.nodes, nd)
	return nd, nil
}

// SetLatency sets the one-way latency between nodes a and b (indices in
// the order of Node calls), both ways, in place of the half-and-half rule.
func (n *Network) SetLatency(a, b int, oneWay time.Duration) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if a < 0 || b < 0 || a >= len(n.nodes) || b >= len(n.nodes) || a == b {
		return fmt.Errorf("%w: SetLatency(%d, %d): want two distinct nodes of %d", ErrBadLink, a, b, len(n.nodes))
	}
	if oneWay < 0 {
		return fmt.Errorf("%w: SetLatency(%d, %d): latency %v is negative", ErrBadLink, a, b, oneWay)
	}
	n.latency[[2]int{min(a, b), max(a, b)}] = oneWay
	return nil
}

// path returns the latency and loss from a to b.
func (n *Network) path(a, b *node) (time.Duration, float64) {
	loss := (a.link.Loss + b.link.Loss) / 2
	n.mu.RLock()
	lat, ok := n.latency[[2]int{min(a.idx, b.idx), max(a.idx, b.idx)}]
	n.mu.RUnlock()
	if !ok {
		lat = (a.link.Latency + b.link.Latency) / 2
	}
	return lat, loss
}

// Close closes every endpoint, whose hosts see their sockets close, and
// stops the clock. Close the hosts first to let them say goodbye.
func (n *Network) Close() error {
	n.mu.Lock()
	n.closed = true
	conns := make([]*conn, 0, len(n.open))
	for _, c := range n.open {
		conns = append(conns, c)
	}
	n.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
	n.clock.close()
	return nil
}

// listen opens nd's endpoint on addr, which must be nd's address (or the
// unspecified address) and a free port; port 0 picks one.
func (n *Network) listen(nd *node, addr *net.UDPAddr) (*conn, error) {
	ip, ok := netip.AddrFromSlice(addr.IP)
	if !ok && addr.IP != nil {
		return nil, fmt.Errorf("simlink: listen %v: bad IP", addr)
	}
	ip = ip.Unmap()
	if ip.IsValid() && !ip.IsUnspecified() && ip != nd.ip {
		return nil, fmt.Errorf("simlink: node %d listens on %v, not %v", nd.idx, nd.ip, ip)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, ErrClosed
	}
	port := addr.Port
	if port == 0 {
		for port = 49152; port < 65536 && n.open[netip.AddrPortFrom(nd.ip, uint16(port))] != nil; port++ {
		}
	}
	ap := netip.AddrPortFrom(nd.ip, uint16(port))
	if port <= 0 || port >= 65536 || n.open[ap] != nil {
		return nil, fmt.Errorf("simlink: listen %v: address in use or out of ports", ap)
	}
	c := newConn(n, nd, ap)
	n.open[ap] = c
	return c, nil
}

func (n *Network) lookup(ap netip.AddrPort) *conn {
	n.mu.RLock()
	defer n.mu.RUnlock()
	return n.open[ap]
}

// muted says whether a packet between the nodes at a and b is dropped by Silence.
func (n *Network) muted(a, b netip.Addr) bool {
	n.mu.RLock()
	defer n.mu.RUnlock()
	return n.silent[a] || n.silent[b]
}

func (n *Network) unregister(c *conn) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.open[c.addr] == c {
		delete(n.open, c.addr)
	}
}

// dropReason says where a packet was lost.
type dropReason int

const (
	dropQueue   dropReason = iota // a drop-tail queue was full
	dropLoss                      // random loss on the path
	dropNoRoute                   // nobody listens on the destination
	dropMTU                       // larger than MTU
	dropBuffer                    // the receiver's buffer was full (a reader starved of CPU)
	dropSilent                    // to or from a node silenced by Silence
	numDropReasons
)

// Stats counts packets since New.
type Stats struct {
	Sent      int64 // datagrams written
	Delivered int64 // datagrams read
	// Drops by cause: a full drop-tail queue (congestion), random loss,
	// no listener, over MTU, a full receive buffer (the reader did not
	// keep up: the machine is short of CPU for the simulated rate), to or
	// from a silenced node.
	QueueDrops, LossDrops, NoRouteDrops, MTUDrops, BufferDrops, SilentDrops int64
}

// Stats returns the packet counters.
func (n *Network) Stats() Stats {
	return Stats{
		Sent:         n.sent.Load(),
		Delivered:    n.recvd.Load(),
		QueueDrops:   n.drops[dropQueue].Load(),
		LossDrops:    n.drops[dropLoss].Load(),
		NoRouteDrops: n.drops[dropNoRoute].Load(),
		MTUDrops:     n.drops[dropMTU].Load(),
		BufferDrops:  n.drops[dropBuffer].Load(),
		SilentDrops:  n.drops[dropSilent].Load(),
	}
}

func (n *Network) drop(r dropReason) { n.drops[r].Add(1) }

// Silence drops every packet to or from the node that listens on listen (as Node
// returned it) while on is true, without closing anything: the node's sockets keep
// working and it can still send, but nothing arrives either way, as from a process
// stopped with SIGSTOP or a link that went dead. Its peers find out by their own
// timeouts. Silence(listen, false) lets packets through again.
func (n *Network) Silence(listen string, on bool) error {
	ip, err := listenIP(listen)
	if err != nil {
		return fmt.Errorf("simlink: silence %q: %w", listen, err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if on {
		n.silent[ip] = true
	} else {
		delete(n.silent, ip)
	}
	return nil
}

// listenIP is the IPv4 address of a listen address Node returned.
func listenIP(listen string) (netip.Addr, error) {
	a, err := ma.NewMultiaddr(listen)
	if err != nil {
		return netip.Addr{}, err
	}
	ipStr, err := a.ValueForProtocol(ma.P_IP4)
	if err != nil {
		return netip.Addr{}, err
	}
	return netip.ParseAddr(ipStr)
}

// Cut closes every endpoint of the node that listens on listen (as Node returned it)
// at once, dropping what waits in them: the host sees its sockets fail and can send
// nothing more, not even a goodbye, as a process killed with SIGKILL on a network that
// sends no resets (UDP). Peers find out by their own timeouts. The node may listen
// again afterwards.
func (n *Network) Cut(listen string) error {
	ip, err := listenIP(listen)
	if err != nil {
		return fmt.Errorf("simlink: cut %q: %w", listen, err)
	}
	n.mu.RLock()
	var conns []*conn
	for ap, c := range n.open {
		if ap.Addr() == ip {
			conns = append(conns, c)
		}
	}
	n.mu.RUnlock()
	for _, c := range conns {
		c.Close()
	}
	return nil
}
