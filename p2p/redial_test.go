package p2p

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
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
