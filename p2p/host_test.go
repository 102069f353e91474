package p2p

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

const (
	tcpLoopback  = "/ip4/127.0.0.1/tcp/0"
	quicLoopback = "/ip4/127.0.0.1/udp/0/quic-v1"
)

// newTestHost starts a host listening on listen (nil = DefaultListen) and
// closes it when the test ends. Its logs go to the test's output.
func newTestHost(t *testing.T, listen ...string) *Host {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	h, err := NewHost(ctx, HostOptions{Key: mustKey(t), Listen: listen, Log: slog.New(slog.NewTextHandler(t.Output(), nil))})
	if err != nil {
		t.Fatalf("NewHost: %v", err)
	}
	t.Cleanup(func() {
		if err := h.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return h
}

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// connect dials b from a using b's first advertised address.
func connect(t *testing.T, a, b *Host) {
	t.Helper()
	id, err := a.Connect(testCtx(t, 5*time.Second), b.Addrs()[0])
	if err != nil {
		t.Fatal(err)
	}
	if id != b.ID() {
		t.Fatalf("Connect returned %s, want %s", id, b.ID())
	}
}

func TestHostOptionsValidateNamesTheBadField(t *testing.T) {
	k := mustKey(t)
	for _, c := range []struct {
		name string
		o    HostOptions
		want string
	}{
		{"missing key", HostOptions{}, "Key: missing"},
		{"unparsable listen", HostOptions{Key: k, Listen: []string{tcpLoopback, "/ip4/1.2.3/tcp/0"}}, `Listen[1] "/ip4/1.2.3/tcp/0"`},
		{"unsupported transport", HostOptions{Key: k, Listen: []string{"/ip4/0.0.0.0/tcp/0/ws"}}, `Listen[0] "/ip4/0.0.0.0/tcp/0/ws": want`},
		{"udp without quic", HostOptions{Key: k, Listen: []string{"/ip4/0.0.0.0/udp/0"}}, "Listen[0]"},
		{"negative memory", HostOptions{Key: k, MemoryLimit: -1}, "MemoryLimit: -1"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := c.o.Validate()
			if !errors.Is(err, ErrBadOptions) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want ErrBadOptions saying %q", err, c.want)
			}
			if _, err := NewHost(t.Context(), c.o); !errors.Is(err, ErrBadOptions) {
				t.Fatalf("NewHost: got %v, want ErrBadOptions", err)
			}
		})
	}
	if err := (HostOptions{Key: k}).Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	if err := (HostOptions{Key: k, Listen: []string{"/ip6/::/tcp/4001", quicLoopback}}).Validate(); err != nil {
		t.Fatalf("ip6 tcp and quic: %v", err)
	}
}

func TestAddrsExpandsUnspecifiedAddressesLoopbackFirst(t *testing.T) {
	h := newTestHost(t) // DefaultListen: 0.0.0.0, TCP and QUIC
	addrs := h.Addrs()
	if len(addrs) < 2 {
		t.Fatalf("Addrs %v: want a TCP and a QUIC address at least", addrs)
	}
	var tcp, quic bool
	seenOther := false
	for _, s := range addrs {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			t.Fatalf("%q: %v", s, err)
		}
		if !strings.HasSuffix(s, "/p2p/"+h.ID().String()) {
			t.Errorf("%s does not end in /p2p/<id>", s)
		}
		if manet.IsIPUnspecified(a) {
			t.Errorf("%s is unspecified", s)
		}
		if manet.IsIPLoopback(a) && seenOther {
			t.Errorf("loopback %s after a non-loopback address in %v", s, addrs)
		}
		seenOther = seenOther || !manet.IsIPLoopback(a)
		tcp = tcp || strings.Contains(s, "/tcp/")
		quic = quic || strings.Contains(s, "/quic-v1/")
	}
	if !tcp || !quic {
		t.Errorf("Addrs %v: want both TCP and QUIC", addrs)
	}
	if a, _ := ma.NewMultiaddr(addrs[0]); !manet.IsIPLoopback(a) {
		t.Errorf("first address %s is not loopback", addrs[0])
	}
}

// TestHostsExchangeARealisticFrame connects two hosts over each transport
// and sends a 16×128×128 activation with tokens and targets.
func TestHostsExchangeARealisticFrame(t *testing.T) {
	for _, c := range []struct{ name, listen, want string }{
		{"tcp", tcpLoopback, "/tcp/"},
		{"quic", quicLoopback, "/quic-v1"},
	} {
		t.Run(c.name, func(t *testing.T) {
			a, b := newTestHost(t, c.listen), newTestHost(t, c.listen)
			sent := realisticFrame()
			expect := Expect{Run: sent.Run, Kind: KindActivation, Shape: sent.Shape, Tokens: true, Vocab: 50257, Codec: CodecF32}

			type result struct {
				f    *Frame
				from peer.ID
				err  error
			}
			got := make(chan result, 1)
			b.Handle(ProtoActivation, func(s network.Stream) {
				defer s.Close()
				f, err := ReadFrame(s, expect.MaxBytes())
				if err == nil {
					err = f.Check(expect)
				}
				got <- result{f, s.Conn().RemotePeer(), err}
			})

			connect(t, a, b)
			conns := a.Network().ConnsToPeer(b.ID())
			if len(conns) == 0 || !strings.Contains(conns[0].RemoteMultiaddr().String(), c.want) {
				t.Fatalf("connections %v, want one over %s", conns, c.want)
			}
			ctx := testCtx(t, 5*time.Second)
			s, err := a.NewStream(ctx, b.ID(), ProtoActivation)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if err := WriteFrame(s, sent); err != nil {
				t.Fatal(err)
			}
			if err := s.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			select {
			case r := <-got:
				if r.err != nil {
					t.Fatalf("receiver: %v", r.err)
				}
				if r.from != a.ID() {
					t.Errorf("frame from %s, want %s", r.from, a.ID())
				}
				if !framesEqual(r.f, sent) {
					t.Fatal("received frame differs from the sent one")
				}
			case <-ctx.Done():
				t.Fatal("no frame received")
			}
		})
	}
}

func TestConnectNamesTheAddressItCouldNotUse(t *testing.T) {
	h := newTestHost(t, tcpLoopback)
	other, _ := PeerID(mustKey(t))
	for _, addr := range []string{
		"not a multiaddr",
		"/ip4/127.0.0.1/tcp/1",                        // no /p2p/
		"/ip4/127.0.0.1/tcp/1/p2p/" + other.String(),  // nobody there
		"/ip4/127.0.0.1/tcp/1/p2p/" + h.ID().String(), // ourselves
	} {
		_, err := h.Connect(testCtx(t, 2*time.Second), addr)
		if err == nil || !strings.Contains(err.Error(), addr) {
			t.Errorf("Connect(%q): got %v, want an error naming the address", addr, err)
		}
	}
}

func TestHostsExchangeGossipOnTheHeartbeatTopic(t *testing.T) {
	a, b := newTestHost(t, tcpLoopback), newTestHost(t, tcpLoopback)
	connect(t, a, b)
	ctx := testCtx(t, 5*time.Second)

	ta, err := a.PubSub.Join(TopicHeartbeats)
	if err != nil {
		t.Fatal(err)
	}
	events, err := ta.EventHandler()
	if err != nil {
		t.Fatal(err)
	}
	defer events.Cancel()
	tb, err := b.PubSub.Join(TopicHeartbeats)
	if err != nil {
		t.Fatal(err)
	}
	sub, err := tb.Subscribe()
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Cancel()

	// Publish once a knows b is subscribed: gossipsub publishes to the
	// topic peers it knows of (flood publishing is on by default), so this
	// needs no mesh heartbeat and no polling.
	for {
		ev, err := events.NextPeerEvent(ctx)
		if err != nil {
			t.Fatalf("b never joined the topic as seen by a: %v", err)
		}
		if ev.Type == pubsub.PeerJoin && ev.Peer == b.ID() {
			break
		}
	}
	if err := ta.Publish(ctx, []byte("alive")); err != nil {
		t.Fatal(err)
	}
	msg, err := sub.Next(ctx)
	if err != nil {
		t.Fatalf("no heartbeat received: %v", err)
	}
	if string(msg.Data) != "alive" || msg.GetFrom() != a.ID() {
		t.Fatalf("got %q from %s", msg.Data, msg.GetFrom())
	}
}

// logCount counts the log lines that contain a string.
type logCount struct {
	mu   sync.Mutex
	sub  string
	n    int
	next io.Writer
}

func (c *logCount) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.n += bytes.Count(p, []byte(c.sub))
	c.mu.Unlock()
	return c.next.Write(p)
}

func (c *logCount) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

func TestHandleResetsStreamsFromABannedPeerAndTheGaterRefusesItsNewConnectionsUntilTheBanEnds(t *testing.T) {
	a := newTestHost(t, tcpLoopback)
	clock := newFakeClock()
	refusals := &logCount{sub: "refusing streams from banned peer", next: t.Output()}
	b, err := NewHost(testCtx(t, 5*time.Second), HostOptions{Key: mustKey(t), Listen: []string{tcpLoopback},
		Log: slog.New(slog.NewTextHandler(refusals, nil)), Penalties: PenaltyOptions{BanFor: time.Hour, Now: clock.Now}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	handled := make(chan struct{}, 10)
	b.Handle(ProtoControl, func(s network.Stream) {
		defer s.Close()
		handled <- struct{}{}
		var m testMsg
		if err := ReadMsg(s, &m, 0); err == nil {
			WriteMsg(s, m)
		}
	})
	connect(t, a, b)
	ctx := testCtx(t, 5*time.Second)
	call := func() error {
		s, err := a.NewStream(ctx, b.ID(), ProtoControl)
		if err != nil {
			return err
		}
		defer s.Close()
		if err := WriteMsg(s, testMsg{Type: "ping"}); err != nil {
			return err
		}
		var m testMsg
		return ReadMsg(s, &m, 0)
	}
	if err := call(); err != nil {
		t.Fatalf("before the ban: %v", err)
	}
	<-handled

	ban := func() {
		for i := 1; ; i++ {
			if _, banned := b.Penalties().Add(a.ID(), "bad frame"); banned {
				if i != DefaultPenaltyLimit {
					t.Fatalf("banned after %d offences, want %d", i, DefaultPenaltyLimit)
				}
				return
			}
		}
	}
	refused := func(ban int) {
		t.Helper()
		for range 2 { // refused every time, logged once per ban
			if err := call(); err == nil {
				t.Fatal("a banned peer's stream was served")
			} else if !errors.Is(err, network.ErrReset) && !strings.Contains(err.Error(), "reset") {
				t.Fatalf("got %v, want a reset stream", err)
			}
		}
		select {
		case <-handled:
			t.Fatal("the handler ran for a banned peer")
		default:
		}
		if n := refusals.count(); n != ban {
			t.Fatalf("%d refusals logged after ban %d, want one per ban", n, ban)
		}
	}
	ban()
	refused(1)

	// Handle refused streams on the existing connection; the gater refuses
	// new connections: b will not dial a, and drops a's dials once they
	// are authenticated.
	if err := errors.Join(a.Network().ClosePeer(b.ID()), b.Network().ClosePeer(a.ID())); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Connect(ctx, a.Addrs()[0]); err == nil {
		t.Fatal("the host dialled a banned peer")
	}
	dropped := make(chan struct{}, 1)
	a.Network().Notify(&network.NotifyBundle{DisconnectedF: func(_ network.Network, c network.Conn) {
		if c.RemotePeer() == b.ID() {
			select { // later disconnections are no news
			case dropped <- struct{}{}:
			default:
			}
		}
	}})
	if _, err := a.Connect(ctx, b.Addrs()[0]); err == nil {
		// The dialler may finish its handshake before b refuses; then the
		// connection must drop at once.
		select {
		case <-dropped:
		case <-ctx.Done():
			t.Fatal("a banned peer's new connection stayed up")
		}
	}

	// When the ban ends the peer is a peer like any other: its connections and
	// streams are accepted, and b dials it.
	clock.Advance(time.Hour)
	if b.Penalties().Banned(a.ID()) {
		t.Fatal("still banned after BanFor")
	}
	if _, err := a.Connect(ctx, b.Addrs()[0]); err != nil {
		t.Fatalf("connecting after the ban ended: %v", err)
	}
	if err := call(); err != nil {
		t.Fatalf("a stream after the ban ended: %v", err)
	}
	<-handled
	if err := errors.Join(a.Network().ClosePeer(b.ID()), b.Network().ClosePeer(a.ID())); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Connect(ctx, a.Addrs()[0]); err != nil {
		t.Fatalf("dialling the peer after its ban ended: %v", err)
	}
	// A second ban is refused and logged afresh.
	ban()
	refused(2)
}

func TestMDNSFoundPeersAreConnectedAndCloseIsIdempotent(t *testing.T) {
	ctx := testCtx(t, 5*time.Second)
	a, err := NewHost(ctx, HostOptions{Key: mustKey(t), Listen: []string{tcpLoopback}, MDNS: true, Log: slog.New(slog.NewTextHandler(t.Output(), nil))})
	if err != nil {
		t.Fatalf("NewHost with mDNS: %v", err)
	}
	defer a.Close()
	b := newTestHost(t, tcpLoopback)

	// Multicast may not leave this machine's sandbox, so hand the notifee
	// what mDNS would report rather than waiting for a real announcement.
	found := make(chan struct{})
	a.Network().Notify(&network.NotifyBundle{ConnectedF: func(_ network.Network, c network.Conn) {
		if c.RemotePeer() == b.ID() {
			close(found)
		}
	}})
	mdnsNotifee{a}.HandlePeerFound(peer.AddrInfo{ID: a.ID(), Addrs: a.Host.Addrs()}) // itself: ignored
	mdnsNotifee{a}.HandlePeerFound(peer.AddrInfo{ID: b.ID(), Addrs: b.Host.Addrs()})
	select {
	case <-found:
	case <-ctx.Done():
		t.Fatal("a peer found by mDNS was not connected")
	}

	if err := a.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := a.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	mdnsNotifee{a}.HandlePeerFound(peer.AddrInfo{ID: b.ID(), Addrs: b.Host.Addrs()}) // after Close: no dial, no panic
}

// A gated protocol's streams from peers the gate refuses are reset before the
// handler runs; the others reach it; lifting the gate lets everyone in.
func TestGateRefusesStreamsBeforeTheHandlerRuns(t *testing.T) {
	srv, friend, stranger := newTestHost(t, tcpLoopback), newTestHost(t, tcpLoopback), newTestHost(t, tcpLoopback)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	const proto = "/pipeswarm/test-gate/1"
	var handled atomic.Int64
	srv.Handle(proto, func(s network.Stream) {
		handled.Add(1)
		_, _ = s.Write([]byte("y"))
		s.Close()
	})
	srv.Gate(proto, func(p peer.ID) bool { return p == friend.ID() })
	open := func(h *Host) error {
		if _, err := h.Connect(ctx, srv.Addrs()[0]); err != nil {
			t.Fatal(err)
		}
		s, err := h.NewStream(ctx, srv.ID(), proto)
		if err != nil {
			return err
		}
		defer s.Close()
		_, err = io.ReadAll(s)
		return err
	}
	if err := open(stranger); err == nil {
		t.Fatal("a stranger's stream was served")
	}
	if err := open(friend); err != nil {
		t.Fatalf("the friend's stream: %v", err)
	}
	if handled.Load() != 1 || srv.GateRefusals() != 1 {
		t.Fatalf("handled %d, refused %d; want 1 and 1", handled.Load(), srv.GateRefusals())
	}
	srv.Gate(proto, nil)
	if err := open(stranger); err != nil {
		t.Fatalf("with the gate lifted: %v", err)
	}
}
