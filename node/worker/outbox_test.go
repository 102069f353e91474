package worker

import (
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
)

func natTestHost(t *testing.T, o p2p.HostOptions) *p2p.Host {
	t.Helper()
	k, err := p2p.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	o.Key, o.Log = k, slog.New(slog.NewTextHandler(t.Output(), nil))
	if o.Listen == nil {
		o.Listen = []string{"/ip4/127.0.0.1/tcp/0"}
	}
	h, err := p2p.NewHost(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

type arrival struct {
	step    uint32
	relayed bool
}

// TestOutboxMovesATensorStreamFromTheRelayToADirectConnection sends a frame
// through a relay, then opens a direct connection (as hole punching would) and
// sends another: the second must travel on the direct connection, after the
// first, on a new stream.
func TestOutboxMovesATensorStreamFromTheRelayToADirectConnection(t *testing.T) {
	limits := p2p.DefaultRelayLimits()
	relay := natTestHost(t, p2p.HostOptions{RelayService: &limits})
	recv := natTestHost(t, p2p.HostOptions{Reachability: true, HolePunch: true, Relays: []string{relay.Addrs()[0]}})
	send := natTestHost(t, p2p.HostOptions{HolePunch: true, HolePunchGrace: time.Millisecond})

	arrivals := make(chan arrival, 4)
	recv.Handle(p2p.ProtoActivation, func(s network.Stream) {
		for {
			f, err := p2p.ReadFrame(s, 1<<20)
			if err != nil {
				s.Close() // at EOF, as the daemon does: the sender learns all was read
				return
			}
			arrivals <- arrival{f.Step, p2p.ConnRelayed(s.Conn())}
		}
	})
	circuit, err := peer.AddrInfoFromP2pAddr(ma.StringCast(relay.Addrs()[0] + "/p2p-circuit/p2p/" + recv.ID().String()))
	if err != nil {
		t.Fatal(err)
	}
	send.Peerstore().AddAddrs(recv.ID(), circuit.Addrs, time.Hour)
	// Autorelay reserves the slot shortly after start; until then the dial fails.
	ctx := t.Context()
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := send.Host.Connect(p2p.AllowRelayed(ctx, "test"), peer.AddrInfo{ID: recv.ID()})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no relayed connection: %v", err)
		}
		send.Network().(*swarm.Swarm).Backoff().Clear(recv.ID())
		time.Sleep(100 * time.Millisecond)
	}

	failed := make(chan error, 1)
	o := newOutbox(send, slog.New(slog.NewTextHandler(t.Output(), nil)), &sentBytes{}, nil, wire.NewCallClock(10*time.Second, nil), func(err error) { failed <- err })
	t.Cleanup(o.close)
	frame := func(step uint32) *p2p.Frame {
		return &p2p.Frame{Kind: p2p.KindActivation, Run: 42, Step: step, Shape: []uint32{1, 2, 2}, Codec: p2p.CodecF32, Data: []float32{1, 2, 3, 4}}
	}
	next := func() arrival {
		select {
		case a := <-arrivals:
			return a
		case err := <-failed:
			t.Fatalf("send failed: %v", err)
		case <-time.After(20 * time.Second):
			t.Fatal("no frame arrived")
		}
		return arrival{}
	}
	o.send(recv.ID(), p2p.ProtoActivation, frame(1))
	if a := next(); a.step != 1 || !a.relayed {
		t.Fatalf("first frame %+v, want step 1 through the relay", a)
	}

	// A direct connection appears, as after a hole punch.
	direct := peer.AddrInfo{ID: recv.ID(), Addrs: recv.Host.Addrs()}
	if err := send.Host.Connect(network.WithForceDirectDial(ctx, "test"), direct); err != nil {
		t.Fatal(err)
	}
	if !p2p.HasDirect(send.Network(), recv.ID()) {
		t.Fatal("no direct connection")
	}
	o.send(recv.ID(), p2p.ProtoActivation, frame(2))
	if a := next(); a.step != 2 || a.relayed {
		t.Fatalf("second frame %+v, want step 2 on the direct connection", a)
	}
	paths := send.StreamPaths()
	if len(paths) != 1 || paths[0].Relayed {
		t.Fatalf("stream paths %+v, want the direct one last", paths)
	}
	select {
	case err := <-failed:
		t.Fatal(errors.Join(errors.New("send failed"), err))
	default:
	}
}
