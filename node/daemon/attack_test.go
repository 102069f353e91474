package daemon

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/protocol"

	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/reduce"
)

// refusedAtOnce reports whether s is reset by the node without it waiting for
// anything the opener sends.
func refusedAtOnce(s network.Stream) bool {
	_ = s.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := s.Read(make([]byte, 1))
	return err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, context.DeadlineExceeded) && !strings.Contains(err.Error(), "deadline")
}

// Peers with no run here are refused the tensor and reduce protocols at the
// stream's open, idle or not: many such streams leave the protocols' shared
// limits to the run's own peers, and cost the strangers nothing but a refusal.
func TestStreamsFromPeersOfNoRunHereAreRefusedAtOnce(t *testing.T) {
	d := testDaemon(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	protos := []protocol.ID{p2p.ProtoActivation, p2p.ProtoGradient, reduce.Proto}
	const ids, per = 3, 22
	var wg sync.WaitGroup
	var mu sync.Mutex
	var open []string
	for range ids {
		h := testHost(t)
		if _, err := h.Connect(ctx, d.Addrs()[0]); err != nil {
			t.Fatal(err)
		}
		for _, proto := range protos {
			for range per {
				wg.Add(1)
				go func() {
					defer wg.Done()
					s, err := h.NewStream(ctx, d.ID(), proto)
					if err != nil {
						return // refused during negotiation: as good
					}
					if !refusedAtOnce(s) {
						mu.Lock()
						open = append(open, string(proto))
						mu.Unlock()
					}
				}()
			}
		}
	}
	wg.Wait()
	if len(open) > 0 {
		t.Fatalf("%d idle streams of peers with no run here stayed open (%v...)", len(open), open[0])
	}
	if got, want := d.host.GateRefusals(), int64(ids*len(protos)*per); got != want {
		t.Errorf("the gates refused %d streams, want %d", got, want)
	}
	if n := d.host.Penalties().Stats().Offences; n != 0 {
		t.Errorf("refused streams counted %d violations, want none", n)
	}
	// The launcher of a run held here is one of its peers: its streams are read.
	k, _ := p2p.GenerateKey()
	l := testHostWith(t, k)
	if _, err := l.Connect(ctx, d.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	if err := d.accept(l.ID(), signedPlanBy(t, d, k, 9, time.Now().Add(time.Minute))); err != nil {
		t.Fatal(err)
	}
	s, err := l.NewStream(ctx, d.ID(), p2p.ProtoActivation)
	if err != nil {
		t.Fatal(err)
	}
	_ = s.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := s.Read(make([]byte, 1)); err == nil || !strings.Contains(err.Error(), "deadline") {
		t.Fatalf("a run's peer's stream: %v, want it open (read deadline)", err)
	}
	// When the run ends here, its peers' idle streams are closed.
	w := d.run(9)
	w.Stop(ErrShutdown)
	w.Start()
	if !refusedAtOnce(s) {
		t.Fatal("a peer's idle tensor stream stayed open after its run ended here")
	}
}

// ctlStream opens a control stream from h and writes a length prefix declaring
// n bytes, then sent bytes of the body.
func ctlStream(ctx context.Context, t *testing.T, h *p2p.Host, d *Daemon, n uint32, sent int) network.Stream {
	t.Helper()
	s, err := h.NewStream(ctx, d.ID(), p2p.ProtoControl)
	if err != nil {
		t.Fatal(err)
	}
	var p [4]byte
	binary.BigEndian.PutUint32(p[:], n)
	_, _ = s.Write(append(p[:], make([]byte, sent)...))
	return s
}

// A peer with no run here and no trust gets a small control message, a few
// streams at a time (per identity and per address); one that never finishes
// its message is penalised when the read deadline passes, and an unknown message
// type is a violation.
func TestControlStreamsOfStrangersAreBoundedAndTheirStallsCount(t *testing.T) {
	d := testDaemon(t)
	d.cfg.Open = false
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	h := testHost(t)
	if _, err := h.Connect(ctx, d.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	// A declared length over a stranger's limit is refused at the prefix.
	s := ctlStream(ctx, t, h, d, p2p.MaxMsgBytes, 0)
	if !refusedAtOnce(s) || d.host.Penalties().Offences(h.ID()) != 1 {
		t.Fatalf("a stranger's 4 MiB control message: not refused at its prefix with a penalty (%d)", d.host.Penalties().Offences(h.ID()))
	}
	// ctlPerPeer streams stall part-way through a message; more are refused at once.
	var stalled []network.Stream
	for range ctlPerPeer {
		stalled = append(stalled, ctlStream(ctx, t, h, d, maxStrangerMsg, 1000))
	}
	time.Sleep(200 * time.Millisecond) // the node has taken them up
	for i := range 4 {
		if s := ctlStream(ctx, t, h, d, maxStrangerMsg, 1000); !refusedAtOnce(s) {
			t.Fatalf("control stream %d past the per-peer limit was served", ctlPerPeer+i+1)
		}
	}
	// Another identity from the same address gets the rest of the address's share.
	h2 := testHost(t)
	if _, err := h2.Connect(ctx, d.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	for range ctlPerIP - ctlPerPeer {
		stalled = append(stalled, ctlStream(ctx, t, h2, d, maxStrangerMsg, 1000))
	}
	time.Sleep(200 * time.Millisecond)
	h3 := testHost(t)
	if _, err := h3.Connect(ctx, d.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	if s := ctlStream(ctx, t, h3, d, maxStrangerMsg, 1000); !refusedAtOnce(s) {
		t.Fatalf("a control stream past the address's %d was served", ctlPerIP)
	}
	// The stalled ones are reset at the deadline and each counts against its sender.
	for i, s := range stalled {
		_ = s.SetReadDeadline(time.Now().Add(wire.Window(d.host, h.ID()) + 5*time.Second))
		if _, err := s.Read(make([]byte, 1)); err == nil || errors.Is(err, io.EOF) || strings.Contains(err.Error(), "deadline") {
			t.Fatalf("stalled control stream %d: %v, want a reset", i, err)
		}
	}
	if n := d.host.Penalties().Offences(h.ID()); n != 1+ctlPerPeer {
		t.Fatalf("after %d stalled messages the stranger has %d violations, want %d", ctlPerPeer, n, 1+ctlPerPeer)
	}
	if n := d.host.Penalties().Offences(h2.ID()); n != ctlPerIP-ctlPerPeer {
		t.Fatalf("the second stranger has %d violations, want %d", n, ctlPerIP-ctlPerPeer)
	}
	// An offer to a key this node does not trust says nothing of the node.
	r, err := wire.Call(ctx, h, wire.NewCallClock(10*time.Second, nil), nil, d.ID(), wire.Msg{Type: wire.MsgOffer})
	if err != nil || r.OK || r.Offer != nil || !strings.Contains(r.Error, "does not trust") {
		t.Fatalf("offer to an untrusted key: %+v, %v; want a refusal and nothing else", r, err)
	}
	// An unknown message type is a violation, whatever run it names; the tenth
	// violation in quick succession bans.
	for i := 1 + ctlPerPeer + 1; i <= p2p.DefaultPenaltyLimit; i++ {
		r, err := wire.Call(ctx, h, wire.NewCallClock(10*time.Second, nil), nil, d.ID(), wire.Msg{Type: "pwn"})
		if err != nil || r.OK {
			t.Fatalf("message of unknown type: %+v, %v", r, err)
		}
		if n, banned := d.host.Penalties().Offences(h.ID()), d.host.Penalties().Banned(h.ID()); n != i || banned != (i == p2p.DefaultPenaltyLimit) {
			t.Fatalf("after violation %d: %d on record, banned %v", i, n, banned)
		}
	}
	// A trusted launcher is answered in full meanwhile.
	k, _ := p2p.GenerateKey()
	l := testHostWith(t, k)
	d.trust[l.ID()] = true
	if _, err := l.Connect(ctx, d.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	r, err = wire.Call(ctx, l, wire.NewCallClock(10*time.Second, nil), nil, d.ID(), wire.Msg{Type: wire.MsgOffer})
	if err != nil || !r.OK || r.Offer == nil || r.Offer.MemoryBytes == 0 || len(r.Offer.Addrs) == 0 {
		t.Fatalf("offer to a trusted launcher: %+v, %v", r, err)
	}
}
