package simlink

import (
	"context"
	"crypto/rand"
	"log/slog"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/probe"
)

// newHost starts a p2p.Host on a new node of nw with link.
func newHost(t testing.TB, nw *Network, link Link) *p2p.Host {
	t.Helper()
	transports, listen, err := nw.Node(link)
	if err != nil {
		t.Fatalf("Node: %v", err)
	}
	return startHost(t, transports, listen)
}

// startHost starts a p2p.Host with the probe responder on transports and
// closes it when the test ends.
func startHost(t testing.TB, transports []libp2p.Option, listen []string) *p2p.Host {
	t.Helper()
	key, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	h, err := p2p.NewHost(ctx, p2p.HostOptions{
		Key:        key,
		Listen:     listen,
		Transports: transports,
		Log:        slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatalf("NewHost: %v", err)
	}
	t.Cleanup(func() { h.Close() })
	probe.Register(h.Host)
	return h
}

// pair starts two hosts on links a and b of a fresh network and connects
// the first to the second.
func pair(t testing.TB, a, b Link) (*Network, *p2p.Host, peer.ID) {
	t.Helper()
	nw := New(1)
	t.Cleanup(func() { nw.Close() })
	ha := newHost(t, nw, a)
	hb := newHost(t, nw, b)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	id, err := ha.Connect(ctx, hb.Addrs()[0])
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	return nw, ha, id
}

func TestExpHome(t *testing.T) {
	l, _ := Profile("home")
	nw, h, p := pair(t, l, l)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	r, err := probe.Measure(ctx, h.Host, p, 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%v in %v; %+v", r, time.Since(start), nw.Stats())
}
