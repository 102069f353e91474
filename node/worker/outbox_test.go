package worker

import (
	"errors"
	"log/slog"
	"strings"
	"sync"
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
	o := newOutbox(send, slog.New(slog.NewTextHandler(t.Output(), nil)), nil, &sentBytes{}, nil, wire.NewCallClock(10*time.Second, nil), func(err error) { failed <- err })
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

// A peer that stops reading holds up only its own queue: with its stream's window
// full and more frames queued for it than the outbox keeps, every send returns at
// once, the frames beyond the queue are reported undeliverable (naming why), and a
// frame to another peer arrives.
func TestOutboxStalledPeerDoesNotBlockSendsToOthers(t *testing.T) {
	stalled := natTestHost(t, p2p.HostOptions{})
	healthy := natTestHost(t, p2p.HostOptions{})
	send := natTestHost(t, p2p.HostOptions{})
	release := make(chan struct{})
	var releaseOnce sync.Once
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })
	stalled.Handle(p2p.ProtoActivation, func(s network.Stream) {
		<-release // never reads: the stream's window fills and the sender's write blocks
		s.Reset()
	})
	arrivals := make(chan uint32, 1)
	healthy.Handle(p2p.ProtoActivation, func(s network.Stream) {
		for {
			f, err := p2p.ReadFrame(s, 1<<24)
			if err != nil {
				s.Close()
				return
			}
			arrivals <- f.Step
		}
	})
	for _, h := range []*p2p.Host{stalled, healthy} {
		if err := send.Host.Connect(t.Context(), peer.AddrInfo{ID: h.ID(), Addrs: h.Host.Addrs()}); err != nil {
			t.Fatal(err)
		}
	}
	failed := make(chan error, 2*maxQueued)
	o := newOutbox(send, slog.New(slog.NewTextHandler(t.Output(), nil)), nil, &sentBytes{}, nil, wire.NewCallClock(10*time.Second, nil), func(err error) {
		select {
		case failed <- err:
		default:
		}
	})
	t.Cleanup(func() {
		releaseOnce.Do(func() { close(release) })
		o.close()
	})
	// 1 MiB a frame: a few fill the stream's window, the rest queue.
	big := &p2p.Frame{Kind: p2p.KindActivation, Run: 42, Step: 1, Shape: []uint32{1, 512, 512}, Codec: p2p.CodecF32, Data: make([]float32, 512*512)}
	const extra = 10
	returned := make(chan struct{})
	go func() {
		defer close(returned)
		for range maxQueued + 8 + extra {
			o.send(stalled.ID(), p2p.ProtoActivation, big)
		}
	}()
	select {
	case <-returned:
	case <-time.After(30 * time.Second):
		t.Fatal("sends to a peer that stopped reading block the caller")
	}
	small := &p2p.Frame{Kind: p2p.KindActivation, Run: 42, Step: 7, Shape: []uint32{1, 2, 2}, Codec: p2p.CodecF32, Data: []float32{1, 2, 3, 4}}
	sent := make(chan struct{})
	go func() { o.send(healthy.ID(), p2p.ProtoActivation, small); close(sent) }()
	select {
	case <-sent:
	case <-time.After(30 * time.Second):
		t.Fatal("a send to a healthy peer blocked behind a stalled one")
	}
	select {
	case step := <-arrivals:
		if step != 7 {
			t.Fatalf("healthy peer got step %d, want 7", step)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the frame to the healthy peer never arrived")
	}
	// The queue is full only once the sender's write blocks, so at least the frames
	// sent on top of maxQueued + what the stream took are given up, each reported.
	select {
	case err := <-failed:
		if !strings.Contains(err.Error(), "stopped reading") || !strings.Contains(err.Error(), stalled.ID().String()) {
			t.Fatalf("undeliverable frame reported as %v; want its peer and that it stopped reading", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("frames beyond the stalled peer's queue were not reported undeliverable")
	}
}
