package p2p

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	ma "github.com/multiformats/go-multiaddr"
)

// freeTCP returns a loopback TCP port nothing listens on now.
func freeTCP(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// hostAt starts a host with key's identity listening on listen, closed when the
// test ends.
func hostAt(t *testing.T, key crypto.PrivKey, listen string) *Host {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	h, err := NewHost(ctx, HostOptions{Key: key, Listen: []string{listen}, Log: slog.New(slog.NewTextHandler(t.Output(), nil))})
	if err != nil {
		t.Fatalf("NewHost: %v", err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// absentPeer makes an identity and a free loopback address for a peer not up yet,
// which a knows to dial there.
func absentPeer(t *testing.T, a *Host) (crypto.PrivKey, peer.ID, string) {
	t.Helper()
	key := mustKey(t)
	id, err := peer.IDFromPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	listen := fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", freeTCP(t))
	a.Peerstore().AddAddrs(id, []ma.Multiaddr{ma.StringCast(listen)}, peerstore.PermanentAddrTTL)
	return key, id, listen
}

func TestRedialReachesAPeerThatAFailedDialPutInBackoff(t *testing.T) {
	a := newTestHost(t, tcpLoopback)
	key, id, listen := absentPeer(t, a)

	// Nobody listens yet: the dial fails and libp2p backs off from the peer.
	if err := a.Host.Connect(testCtx(t, 5*time.Second), peer.AddrInfo{ID: id}); err == nil {
		t.Fatal("dial to a port nobody listens on succeeded")
	}
	hostAt(t, key, listen)
	// A plain dial is refused while the backoff lasts, though the peer is up now.
	if err := a.Host.Connect(testCtx(t, 5*time.Second), peer.AddrInfo{ID: id}); !errors.Is(err, swarm.ErrDialBackoff) {
		t.Fatalf("plain dial during backoff: got %v, want %v", err, swarm.ErrDialBackoff)
	}
	if err := a.Redial(testCtx(t, 5*time.Second), id); err != nil {
		t.Fatalf("Redial: %v", err)
	}
	if !Linked(a.Network(), id) {
		t.Fatal("Redial returned nil but the hosts are not connected")
	}
}

func TestReachKeepsDiallingUntilThePeerIsUp(t *testing.T) {
	a := newTestHost(t, tcpLoopback)
	key, id, listen := absentPeer(t, a)

	reached := make(chan error, 1)
	go func() { reached <- a.Reach(testCtx(t, 10*time.Second), id) }()
	time.Sleep(300 * time.Millisecond) // several dials fail meanwhile
	select {
	case err := <-reached:
		t.Fatalf("Reach returned before the peer was up: %v", err)
	default:
	}
	hostAt(t, key, listen)
	if err := <-reached; err != nil {
		t.Fatalf("Reach: %v", err)
	}
	if !Linked(a.Network(), id) {
		t.Fatal("Reach returned nil but the hosts are not connected")
	}

	// A peer that never comes: Reach gives up when ctx ends, with the dial's error.
	_, gone, _ := absentPeer(t, a)
	if err := a.Reach(testCtx(t, 300*time.Millisecond), gone); err == nil {
		t.Fatal("Reach to a peer that is not there returned nil")
	}
}

// goneHost starts a host listening on listen, notes its identity and addresses
// and closes it: a node that is down but still listed. a is told its addresses.
func goneHost(t *testing.T, a *Host, listen string) peer.ID {
	t.Helper()
	b := newTestHost(t, listen)
	id, addrs := b.ID(), b.Host.Addrs()
	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	a.Peerstore().AddAddrs(id, addrs, peerstore.PermanentAddrTTL)
	return id
}

// listener accepts TCP connections on loopback and hands each to serve; it
// reports its multiaddr. When the test ends it stops and closes every
// connection it accepted.
func listener(t *testing.T, serve func(net.Conn)) ma.Multiaddr {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() {
		l.Close()
		<-done
	})
	go func() {
		defer close(done)
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
			serve(c)
		}
	}()
	return ma.StringCast(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", l.Addr().(*net.TCPAddr).Port))
}

func TestReachUnlessRefusedGivesUpOnAPeerNobodyListensFor(t *testing.T) {
	a := newTestHost(t, tcpLoopback)
	id := goneHost(t, a, tcpLoopback)

	ctx := testCtx(t, time.Minute)
	err := a.ReachUnlessRefused(ctx, id)
	if !errors.Is(err, ErrRefused) {
		t.Fatalf("ReachUnlessRefused: got %v, want %v", err, ErrRefused)
	}
	if ctx.Err() != nil {
		t.Fatalf("ReachUnlessRefused gave up only when its ctx ended: %v", err)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("the error does not carry the dial's refusal: %v", err)
	}
}

func TestReachUnlessRefusedTakesAnAddressThatListens(t *testing.T) {
	a := newTestHost(t, tcpLoopback)
	b := newTestHost(t, tcpLoopback)
	a.Peerstore().AddAddrs(b.ID(), b.Host.Addrs(), peerstore.PermanentAddrTTL)
	a.Peerstore().AddAddr(b.ID(), ma.StringCast(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", freeTCP(t))), peerstore.PermanentAddrTTL)

	if err := a.ReachUnlessRefused(testCtx(t, time.Minute), b.ID()); err != nil {
		t.Fatalf("ReachUnlessRefused: %v", err)
	}
	if !Linked(a.Network(), b.ID()) {
		t.Fatal("ReachUnlessRefused returned nil but the hosts are not connected")
	}
}

// A peer with one address refused and another that fails otherwise may still be
// there: it is dialled until ctx ends.
func TestReachUnlessRefusedKeepsDiallingWhenAnAddressFailsOtherwise(t *testing.T) {
	t.Run("a QUIC address nobody listens on", func(t *testing.T) {
		a := newTestHost(t, tcpLoopback, quicLoopback)
		id := goneHost(t, a, quicLoopback)
		a.Peerstore().AddAddr(id, ma.StringCast(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", freeTCP(t))), peerstore.PermanentAddrTTL)

		ctx := testCtx(t, time.Second)
		err := a.ReachUnlessRefused(ctx, id)
		if err == nil || errors.Is(err, ErrRefused) || ctx.Err() == nil {
			t.Fatalf("ReachUnlessRefused: got %v with its ctx still on (%v), want a dial error once ctx ended", err, ctx.Err())
		}
	})
	t.Run("a TCP address that accepts and stays silent", func(t *testing.T) {
		a := newTestHost(t, tcpLoopback)
		_, id, _ := absentPeer(t, a)
		a.Peerstore().AddAddr(id, listener(t, func(net.Conn) {}), peerstore.PermanentAddrTTL)

		ctx := testCtx(t, time.Second)
		err := a.ReachUnlessRefused(ctx, id)
		if err == nil || errors.Is(err, ErrRefused) || ctx.Err() == nil {
			t.Fatalf("ReachUnlessRefused: got %v with its ctx still on (%v), want a dial error once ctx ended", err, ctx.Err())
		}
	})
	t.Run("a TCP address that hangs up at once", func(t *testing.T) {
		// As a handshake cut short does: the dial fails at once, but not refused.
		a := newTestHost(t, tcpLoopback)
		_, id, _ := absentPeer(t, a)
		const dials = 3
		hungUp := make(chan struct{}, dials)
		a.Peerstore().AddAddr(id, listener(t, func(c net.Conn) {
			c.Close()
			select {
			case hungUp <- struct{}{}:
			default:
			}
		}), peerstore.PermanentAddrTTL)

		ctx, cancel := context.WithCancel(testCtx(t, time.Minute))
		reached := make(chan error, 1)
		go func() { reached <- a.ReachUnlessRefused(ctx, id) }()
		for range dials {
			select {
			case <-hungUp:
			case err := <-reached:
				t.Fatalf("ReachUnlessRefused returned before it was cancelled: %v", err)
			}
		}
		cancel()
		if err := <-reached; err == nil || errors.Is(err, ErrRefused) {
			t.Fatalf("ReachUnlessRefused: got %v, want the last dial's error, not %v", err, ErrRefused)
		}
	})
}

func TestRefusedEverywhere(t *testing.T) {
	refused := &net.OpError{Op: "dial", Net: "tcp4", Err: &os.SyscallError{Syscall: "connect", Err: syscall.ECONNREFUSED}}
	tcp1, tcp2 := ma.StringCast("/ip4/127.0.0.1/tcp/1"), ma.StringCast("/ip6/::1/tcp/2")
	quicAddr := ma.StringCast("/ip4/127.0.0.1/udp/1/quic-v1")
	relayed := ma.StringCast("/ip4/127.0.0.1/tcp/3/p2p/12D3KooWGzBM5moyHTFXYsPDmFeZtcgU5W6vGsrdxN5jKFNTK1Xd/p2p-circuit")
	dialErr := func(cause error, skipped int, errs ...swarm.TransportError) error {
		return fmt.Errorf("failed to dial: %w", &swarm.DialError{Cause: cause, Skipped: skipped, DialErrors: errs})
	}
	for _, c := range []struct {
		name string
		err  error
		want bool
	}{
		{"every TCP address refused", dialErr(swarm.ErrAllDialsFailed, 0, swarm.TransportError{Address: tcp1, Cause: refused}, swarm.TransportError{Address: tcp2, Cause: refused}), true},
		{"one TCP address timed out", dialErr(swarm.ErrAllDialsFailed, 0, swarm.TransportError{Address: tcp1, Cause: refused}, swarm.TransportError{Address: tcp2, Cause: os.ErrDeadlineExceeded}), false},
		{"a QUIC address", dialErr(swarm.ErrAllDialsFailed, 0, swarm.TransportError{Address: tcp1, Cause: refused}, swarm.TransportError{Address: quicAddr, Cause: refused}), false},
		{"a relayed address", dialErr(swarm.ErrAllDialsFailed, 0, swarm.TransportError{Address: relayed, Cause: refused}), false},
		{"an address with no transport", dialErr(swarm.ErrAllDialsFailed, 0, swarm.TransportError{Address: tcp1, Cause: refused}, swarm.TransportError{Address: tcp2, Cause: swarm.ErrNoTransport}), false},
		{"errors left unrecorded", dialErr(swarm.ErrAllDialsFailed, 1, swarm.TransportError{Address: tcp1, Cause: refused}), false},
		{"no address tried", dialErr(swarm.ErrNoGoodAddresses, 0), false},
		{"ctx ended", dialErr(context.DeadlineExceeded, 0, swarm.TransportError{Address: tcp1, Cause: refused}), false},
		{"not a dial error", refused, false},
	} {
		if got := refusedEverywhere(c.err); got != c.want {
			t.Errorf("%s: refusedEverywhere = %v, want %v", c.name, got, c.want)
		}
	}
}
