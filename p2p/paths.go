package p2p

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/host/eventbus"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	"github.com/libp2p/go-libp2p/p2p/protocol/holepunch"
	ma "github.com/multiformats/go-multiaddr"
)

// DefaultHolePunchGrace is how long a tensor stream waits for hole punching
// to replace a relayed connection younger than this before it settles for the
// relay. DCUtR starts as soon as identify completes on the relayed connection
// and takes a few round trips, three times over if attempts fail.
const DefaultHolePunchGrace = 10 * time.Second

// Linked reports whether n has a connection to p, direct or through a relay.
func Linked(n network.Network, p peer.ID) bool {
	c := n.Connectedness(p)
	return c == network.Connected || c == network.Limited
}

// HasDirect reports whether n has a connection to p that is not relayed.
func HasDirect(n network.Network, p peer.ID) bool {
	for _, c := range n.ConnsToPeer(p) {
		if !c.IsClosed() && !ConnRelayed(c) {
			return true
		}
	}
	return false
}

// ConnRelayed reports whether c runs through a relay (and so is limited).
func ConnRelayed(c network.Conn) bool { return c.Stat().Limited || isRelayed(c) }

// Redial connects to p (relayed will do) even if a dial to it failed a moment
// ago: libp2p would otherwise refuse to dial p again for seconds (dial backoff),
// though a dial that fails at once, two peers dialling each other in the same
// instant, a handshake cut short, says little about whether p is there.
func (h *Host) Redial(ctx context.Context, p peer.ID) error {
	if s, ok := h.Network().(*swarm.Swarm); ok {
		s.Backoff().Clear(p)
	}
	return h.Host.Connect(AllowRelayed(ctx, "redial"), peer.AddrInfo{ID: p})
}

// ErrRefused is ReachUnlessRefused's error for a peer every address of which
// refused the connection: nothing listens where the peer said it would.
var ErrRefused = errors.New("p2p: every address of the peer refused the connection")

// Reach redials p until a connection is up or ctx ends, pausing a little
// longer after each failure, whatever it was (a refusal too: p may not be
// listening yet); it returns the last dial's error. A peer with no known
// address is not dialled again: nothing would change by waiting.
func (h *Host) Reach(ctx context.Context, p peer.ID) error { return h.redialUntil(ctx, p, false) }

// ReachUnlessRefused is Reach for a peer that should be up now: it also gives up,
// with an error wrapping ErrRefused, as soon as a dial fails because every
// address of p refused the connection (see refusedEverywhere). A peer that
// should be listening and is not is down, and redialling it would only hold the
// caller up until ctx ends; any other failure (a timeout, a handshake cut short
// by both ends dialling at once, a resource limit) is dialled again as by Reach.
func (h *Host) ReachUnlessRefused(ctx context.Context, p peer.ID) error {
	return h.redialUntil(ctx, p, true)
}

func (h *Host) redialUntil(ctx context.Context, p peer.ID, giveUpRefused bool) error {
	for pause := 20 * time.Millisecond; ; pause = min(2*pause, 500*time.Millisecond) {
		err := h.Redial(ctx, p)
		if err == nil || errors.Is(err, swarm.ErrNoAddresses) {
			return err
		}
		if giveUpRefused && refusedEverywhere(err) {
			return fmt.Errorf("%w: %w", ErrRefused, err)
		}
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
	}
}

// refusedEverywhere reports whether err is a dial that failed on every address
// it tried, and on each because the address refused the connection.
//
// Only a direct TCP address can say so: a refused TCP dial (ECONNREFUSED, a
// reset answering the SYN) means nothing listens at that port, or a firewall
// rejects it, and either way no redial gets through there; it says so at once.
// (Windows names the refusal by a code of its own, not ECONNREFUSED: there a
// peer is dialled until ctx ends, as by Reach.) QUIC cannot: the ICMP "port
// unreachable" that answers a UDP port nobody listens on is not seen by
// libp2p's shared, unconnected UDP socket, so the dial waits out its ctx as if
// packets were lost. A peer with a QUIC address (every node listening as by
// default) is therefore never refused everywhere, and neither is one with a
// relayed address: the relay's failure is not the peer's. Addresses libp2p left
// undialled (no transport for them, a black hole, a gater) are not refusals
// either, and a dial cut short by its ctx is no answer at all.
func refusedEverywhere(err error) bool {
	var de *swarm.DialError
	if !errors.As(err, &de) || !errors.Is(de.Cause, swarm.ErrAllDialsFailed) || de.Skipped > 0 || len(de.DialErrors) == 0 {
		return false
	}
	for _, te := range de.DialErrors {
		if !directTCP(te.Address) || !errors.Is(te.Cause, syscall.ECONNREFUSED) {
			return false
		}
	}
	return true
}

// directTCP reports whether a is a plain TCP address: no relay, no QUIC, no
// websocket on top.
func directTCP(a ma.Multiaddr) bool {
	tcp := false
	for _, c := range a {
		switch c.Protocol().Code {
		case ma.P_TCP:
			tcp = true
		case ma.P_IP4, ma.P_IP6, ma.P_DNS, ma.P_DNS4, ma.P_DNS6, ma.P_P2P:
		default:
			return false
		}
	}
	return tcp
}

// AllowRelayed marks ctx so that streams opened with it may run on relayed
// (limited) connections; libp2p otherwise waits for a direct one.
func AllowRelayed(ctx context.Context, reason string) context.Context {
	return network.WithAllowLimitedConn(ctx, reason)
}

// OpenTensorStream opens a stream for tensor frames to p on the best
// connection: a direct one if there is one. On a relayed connection younger
// than HostOptions.HolePunchGrace it first waits that long for hole punching to add a
// direct one. The path it takes is recorded (NoteStream).
func (h *Host) OpenTensorStream(ctx context.Context, p peer.ID, proto protocol.ID) (network.Stream, error) {
	ctx = AllowRelayed(ctx, "tensor")
	if !HasDirect(h.Network(), p) {
		// Connect first and open the stream only once the path is chosen: a
		// stream left unused while waiting would time out its negotiation.
		if err := h.Host.Connect(ctx, peer.AddrInfo{ID: p}); err != nil {
			return nil, err
		}
		var youngest time.Time
		for _, c := range h.Network().ConnsToPeer(p) {
			if o := c.Stat().Opened; ConnRelayed(c) && o.After(youngest) {
				youngest = o
			}
		}
		if until := youngest.Add(h.holePunchGrace); time.Now().Before(until) {
			h.waitDirect(ctx, p, until)
		}
	}
	s, err := h.NewStream(ctx, p, proto)
	if err != nil {
		return nil, err
	}
	h.NoteStream(s)
	return s, nil
}

// waitDirect waits until h has a direct connection to p, until, or ctx ends.
func (h *Host) waitDirect(ctx context.Context, p peer.ID, until time.Time) bool {
	sub, err := h.EventBus().Subscribe(new(event.EvtPeerConnectednessChanged), eventbus.Name("pipeswarm direct wait"))
	if err != nil {
		return false
	}
	defer sub.Close()
	if HasDirect(h.Network(), p) {
		return true
	}
	t := time.NewTimer(time.Until(until))
	defer t.Stop()
	for {
		select {
		case e := <-sub.Out():
			if ev := e.(event.EvtPeerConnectednessChanged); ev.Peer == p && ev.Connectedness == network.Connected {
				return true
			}
		case <-t.C:
			return false
		case <-ctx.Done():
			return false
		}
	}
}

// StreamPath says which connection a peer's tensor streams last ran on.
type StreamPath struct {
	Peer    string    `json:"peer"`
	Relayed bool      `json:"relayed"` // through a relay: slow, and the run should know
	Remote  string    `json:"remote"`  // the connection's remote address
	Since   time.Time `json:"since"`   // when the streams moved to this kind of path
}

// paths records the path of each peer's tensor streams.
type paths struct {
	log *slog.Logger
	mu  sync.Mutex
	m   map[peer.ID]StreamPath
}

// NoteStream records the connection a tensor stream to or from s's peer runs
// on, and logs it the first time and whenever it changes between relayed and
// direct: a relayed path as a warning, since a run on a relay is slow.
func (h *Host) NoteStream(s network.Stream) {
	c := s.Conn()
	p, relayed := c.RemotePeer(), ConnRelayed(c)
	h.paths.mu.Lock()
	prev, seen := h.paths.m[p]
	changed := !seen || prev.Relayed != relayed
	if changed {
		h.paths.m[p] = StreamPath{Peer: p.String(), Relayed: relayed, Remote: c.RemoteMultiaddr().String(), Since: time.Now()}
	}
	h.paths.mu.Unlock()
	switch {
	case changed && relayed:
		h.paths.log.Warn("tensor stream path", "peer", p, "relayed", true, "protocol", s.Protocol(), "via", c.RemoteMultiaddr(),
			"note", "through a relay: slow; hole punching has not given a direct connection (yet)")
	case changed:
		h.paths.log.Info("tensor stream path", "peer", p, "relayed", false, "protocol", s.Protocol(), "addr", c.RemoteMultiaddr())
	}
}

// StreamPaths returns the last path of each peer's tensor streams, by peer.
func (h *Host) StreamPaths() []StreamPath {
	h.paths.mu.Lock()
	defer h.paths.mu.Unlock()
	out := make([]StreamPath, 0, len(h.paths.m))
	for _, p := range h.paths.m {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b StreamPath) int { return strings.Compare(a.Peer, b.Peer) })
	return out
}

// HolePunch is the last DCUtR attempt with a peer.
type HolePunch struct {
	Peer    string    `json:"peer"`
	Success bool      `json:"success"`
	Direct  bool      `json:"direct"` // a plain dial worked (the peer was reachable), no punch needed
	TookS   float64   `json:"took_s"` // the successful or last failed attempt
	Error   string    `json:"error,omitempty"`
	At      time.Time `json:"at"`
}

// punches records DCUtR's trace (holepunch.EventTracer).
type punches struct {
	log *slog.Logger
	mu  sync.Mutex
	m   map[peer.ID]HolePunch
}

func (t *punches) Trace(e *holepunch.Event) {
	var hp HolePunch
	switch ev := e.Evt.(type) {
	case *holepunch.EndHolePunchEvt:
		hp = HolePunch{Success: ev.Success, TookS: ev.EllapsedTime.Seconds(), Error: ev.Error}
	case *holepunch.DirectDialEvt:
		if !ev.Success {
			return // a hole punch follows
		}
		hp = HolePunch{Success: true, Direct: true, TookS: ev.EllapsedTime.Seconds()}
	case *holepunch.ProtocolErrorEvt:
		hp = HolePunch{Error: "protocol: " + ev.Error}
	default:
		return
	}
	hp.Peer, hp.At = e.Remote.String(), time.Unix(0, e.Timestamp)
	t.mu.Lock()
	t.m[e.Remote] = hp
	t.mu.Unlock()
	switch {
	case hp.Success:
		t.log.Info("hole punch: direct connection", "peer", e.Remote, "took", fmt.Sprintf("%.3fs", hp.TookS), "plain_dial", hp.Direct)
	default:
		t.log.Warn("hole punch attempt failed", "peer", e.Remote, "err", hp.Error)
	}
}

// HolePunches returns the last hole punching attempt with each peer, by peer.
func (h *Host) HolePunches() []HolePunch {
	h.punches.mu.Lock()
	defer h.punches.mu.Unlock()
	out := make([]HolePunch, 0, len(h.punches.m))
	for _, p := range h.punches.m {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b HolePunch) int { return strings.Compare(a.Peer, b.Peer) })
	return out
}
