package p2p

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	ma "github.com/multiformats/go-multiaddr"
)

// newNATHost is newTestHost with options.
func newNATHost(t *testing.T, o HostOptions) *Host {
	t.Helper()
	o.Key = mustKey(t)
	o.Log = slog.New(slog.NewTextHandler(t.Output(), nil))
	h, err := NewHost(testCtx(t, 5*time.Second), o)
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

// waitReach waits for a Reachability that ok accepts.
func waitReach(t *testing.T, h *Host, d time.Duration, ok func(Reachability) bool) Reachability {
	t.Helper()
	ctx := testCtx(t, d)
	var last Reachability
	for r := range h.WatchReachability(ctx) {
		if last = r; ok(r) {
			return r
		}
	}
	t.Fatalf("no matching reachability within %v; last %+v", d, last)
	return last
}

func TestHostOptionsValidateNamesBadNATFields(t *testing.T) {
	k := mustKey(t)
	bad := DefaultRelayLimits()
	bad.Data = 0
	for _, c := range []struct {
		name string
		o    HostOptions
		want string
	}{
		{"announce with peer ID", HostOptions{Key: k, Announce: []string{"/ip4/1.2.3.4/tcp/4001/p2p/12D3KooWAkC88sNgQmYS6s3EBH4yw18uirscCMtJKXUhufsxoe7V"}}, "Announce[0]"},
		{"announce unparsable", HostOptions{Key: k, Announce: []string{"/ip4/1.2.3/tcp/1"}}, "Announce[0]"},
		{"relay without peer ID", HostOptions{Key: k, Relays: []string{"/ip4/1.2.3.4/tcp/4001"}}, "Relays[0]"},
		{"relay limits", HostOptions{Key: k, RelayService: &bad}, "RelayService.Data"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := c.o.Validate(); !errors.Is(err, ErrBadOptions) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want ErrBadOptions naming %s", err, c.want)
			}
		})
	}
}

func TestHostWithOnlyLoopbackAddressesKnowsAtOnceItIsNotReachable(t *testing.T) {
	start := time.Now()
	h := newNATHost(t, HostOptions{Listen: []string{tcpLoopback, quicLoopback}, Reachability: true})
	r := h.Reachability()
	if r.State != ReachPrivate || r.Reason != ReasonNoPublicAddr || !strings.Contains(r.Fix, "--announce /ip4/PUBLIC_IP/tcp/") {
		t.Fatalf("right after NewHost: %+v", r)
	}
	t.Logf("%s (known %v after start)", r.Line(), time.Since(start).Round(time.Millisecond))
}

func TestAutoNATv2PeerDialsBackAReachableAddress(t *testing.T) {
	server := newNATHost(t, HostOptions{Listen: []string{tcpLoopback}, Reachability: true, reachPrivate: true})
	client := newNATHost(t, HostOptions{Listen: []string{tcpLoopback}, Reachability: true, reachPrivate: true})
	connect(t, client, server)
	r := waitReach(t, client, 20*time.Second, func(r Reachability) bool { return r.State == ReachPublic })
	if len(r.Addrs) == 0 || !strings.HasPrefix(r.Addrs[0], "/ip4/127.0.0.1/tcp/") {
		t.Fatalf("reachable at %v, want the loopback listen address", r.Addrs)
	}
}

func TestAutoNATv2PeerFindsAnAnnouncedPortClosed(t *testing.T) {
	// Nothing listens on the announced address: the port is closed.
	closed := newTestHost(t, tcpLoopback)
	addr := strings.Split(closed.Addrs()[0], "/p2p/")[0]
	closed.Close()
	server := newNATHost(t, HostOptions{Listen: []string{tcpLoopback}, Reachability: true, reachPrivate: true})
	client := newNATHost(t, HostOptions{Listen: []string{}, Announce: []string{addr}, Reachability: true, reachPrivate: true})
	if _, err := client.Connect(testCtx(t, 5*time.Second), server.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	r := waitReach(t, client, 30*time.Second, func(r Reachability) bool { return r.State == ReachPrivate && r.Reason == ReasonPortClosed })
	t.Log(r.Line())
}

// TestRelayedStreamCarriesMoreThanLibp2pDefaultLimit reserves a slot on a
// relay, dials the reserved peer through it, and sends 1 MiB on a tensor
// stream: go-libp2p's default relay limit (128 KiB) would reset it. (On
// loopback autorelay advertises no circuit address, as it builds them from
// the relay's public addresses only; the netns test checks that part.)
func TestRelayedStreamCarriesMoreThanLibp2pDefaultLimit(t *testing.T) {
	limits := DefaultRelayLimits()
	relay := newNATHost(t, HostOptions{Listen: []string{tcpLoopback}, RelayService: &limits})
	private := newNATHost(t, HostOptions{Listen: []string{tcpLoopback}, Reachability: true, Relays: []string{relay.Addrs()[0]}, HolePunch: true})
	circuit := ma.StringCast(relay.Addrs()[0] + "/p2p-circuit/p2p/" + private.ID().String())

	const proto = protocol.ID("/pipeswarm/test-relayed/1")
	const size = 1 << 20
	got := make(chan int, 1)
	private.Handle(proto, func(s network.Stream) {
		n, _ := io.Copy(io.Discard, s)
		private.NoteStream(s)
		s.Close()
		got <- int(n)
	})
	dialer := newNATHost(t, HostOptions{Listen: []string{tcpLoopback}, HolePunch: true, HolePunchGrace: 500 * time.Millisecond})
	// Only the circuit address: the dialer must go through the relay.
	info, err := peer.AddrInfoFromP2pAddr(circuit)
	if err != nil {
		t.Fatal(err)
	}
	dialer.Peerstore().AddAddrs(info.ID, info.Addrs, time.Hour)
	// The dial fails until autorelay has reserved the slot.
	ctx := testCtx(t, 20*time.Second)
	var s network.Stream
	for {
		if s, err = dialer.OpenTensorStream(ctx, private.ID(), proto); err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("no stream through the relay: %v", err)
		}
		dialer.Network().(*swarm.Swarm).Backoff().Clear(private.ID())
		select {
		case <-time.After(100 * time.Millisecond):
		case <-ctx.Done():
		}
	}
	if !ConnRelayed(s.Conn()) {
		t.Fatalf("stream on %s, want a relayed connection", s.Conn().RemoteMultiaddr())
	}
	if _, err := io.Copy(s, bytes.NewReader(make([]byte, size))); err != nil {
		t.Fatalf("writing %d bytes through the relay: %v", size, err)
	}
	s.CloseWrite()
	select {
	case n := <-got:
		if n != size {
			t.Fatalf("received %d bytes, want %d", n, size)
		}
	case <-ctx.Done():
		t.Fatal("nothing received")
	}
	paths := dialer.StreamPaths()
	if len(paths) != 1 || !paths[0].Relayed || paths[0].Peer != private.ID().String() {
		t.Fatalf("dialer's stream paths %+v, want one relayed path to %s", paths, private.ID())
	}
	if p := private.StreamPaths(); len(p) != 1 || !p[0].Relayed {
		t.Fatalf("receiver's stream paths %+v", p)
	}
	if !Linked(dialer.Network(), private.ID()) || HasDirect(dialer.Network(), private.ID()) {
		t.Fatal("want a relayed connection only")
	}
}
