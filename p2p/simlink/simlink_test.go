package simlink

import (
	"context"
	"crypto/rand"
	"log/slog"
	"net"
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

// measure runs probe.Measure from h to p with bytes each way.
func measure(t *testing.T, h *p2p.Host, p peer.ID, bytes int64) probe.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	r, err := probe.Measure(ctx, h.Host, p, bytes)
	if err != nil {
		t.Fatalf("Measure: %v", err)
	}
	return r
}

func TestHomeProfileDeliversItsRTTAndRate(t *testing.T) {
	home, err := Profile("home")
	if err != nil {
		t.Fatal(err)
	}
	_, h, p := pair(t, home, home)
	r := measure(t, h, p, 12<<20) // ~1 s each way
	t.Logf("home %v: %v", home, r)
	if raceEnabled {
		return
	}
	// A packet may be read up to early before it is due, each way.
	if want := 2 * home.Latency; r.RTT < want-2*early || float64(r.RTT) > 1.1*float64(want) {
		t.Errorf("RTT %v, want %v to +10%%", r.RTT, want)
	}
	if r.UpMbps < 0.9*home.Mbps || r.DownMbps < 0.9*home.Mbps {
		t.Errorf("up %.1f, down %.1f Mbit/s; want ≥ %.0f each way", r.UpMbps, r.DownMbps, 0.9*home.Mbps)
	}
	if r.UpMbps > home.Mbps || r.DownMbps > home.Mbps {
		t.Errorf("up %.1f, down %.1f Mbit/s: faster than the %g Mbit/s link", r.UpMbps, r.DownMbps, home.Mbps)
	}
}

func TestSlowPeerLimitsThePairBothWays(t *testing.T) {
	fast := Link{Mbps: 100, Latency: 10 * time.Millisecond}
	slow := Link{Mbps: 10, Latency: 10 * time.Millisecond}
	_, h, p := pair(t, fast, slow)
	r := measure(t, h, p, 1<<20) // ~0.8 s each way
	t.Logf("100 Mbit/s to 10 Mbit/s: %v", r)
	if raceEnabled {
		return
	}
	for _, got := range []float64{r.UpMbps, r.DownMbps} {
		if got > slow.Mbps || got < 0.85*slow.Mbps {
			t.Errorf("up %.1f, down %.1f Mbit/s; want 8.5..10 each way, the slow link's rate", r.UpMbps, r.DownMbps)
			break
		}
	}
}

func TestTransferCompletesUnderOnePercentLoss(t *testing.T) {
	lossy := Link{Mbps: 100, Latency: 5 * time.Millisecond, Loss: 0.01}
	nw, h, p := pair(t, lossy, lossy)
	r := measure(t, h, p, 1<<20)
	st := nw.Stats()
	t.Logf("1%% loss: %v; %+v", r, st)
	if st.LossDrops == 0 {
		t.Error("no packet was dropped for loss")
	}
}

func TestCutSilencesANodeWithoutGoodbye(t *testing.T) {
	n := New(1)
	defer n.Close()
	_, listenA, err := n.Node(Link{Mbps: 100, Latency: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	nd := n.nodes[0]
	c, err := n.listen(nd, &net.UDPAddr{IP: net.IP(nd.ip.AsSlice()), Port: Port})
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Cut(listenA[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteTo([]byte("bye"), &net.UDPAddr{IP: net.IPv4(10, 9, 0, 2), Port: Port}); err == nil {
		t.Error("a cut endpoint still sends")
	}
	if _, err := n.listen(nd, &net.UDPAddr{IP: net.IP(nd.ip.AsSlice()), Port: Port}); err != nil {
		t.Errorf("the node cannot listen again after a cut: %v", err)
	}
}

func TestSilenceDropsEveryPacketBothWaysUntilLifted(t *testing.T) {
	n := New(1)
	defer n.Close()
	var conns []*conn
	var listens []string
	for range 2 {
		_, l, err := n.Node(Link{Mbps: 100, Latency: time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		nd := n.nodes[len(n.nodes)-1]
		c, err := n.listen(nd, &net.UDPAddr{IP: net.IP(nd.ip.AsSlice()), Port: Port})
		if err != nil {
			t.Fatal(err)
		}
		conns, listens = append(conns, c), append(listens, l[0])
	}
	send := func(from, to int) {
		t.Helper()
		if _, err := conns[from].WriteTo([]byte("hello"), conns[to].udp); err != nil {
			t.Fatalf("a silenced node's socket fails: %v", err)
		}
	}
	if err := n.Silence(listens[1], true); err != nil {
		t.Fatal(err)
	}
	send(0, 1)
	send(1, 0)
	if s := n.Stats(); s.SilentDrops != 2 || s.Sent != 2 {
		t.Fatalf("after one packet each way to and from a silenced node: %+v; want both sent and dropped", s)
	}
	if err := n.Silence(listens[1], false); err != nil {
		t.Fatal(err)
	}
	send(1, 0)
	buf := make([]byte, 64)
	_ = conns[0].SetReadDeadline(time.Now().Add(5 * time.Second))
	if k, _, err := conns[0].ReadFrom(buf); err != nil || string(buf[:k]) != "hello" {
		t.Fatalf("after Silence(false): read %q, %v; want the packet", buf[:k], err)
	}
	if s := n.Stats(); s.SilentDrops != 2 {
		t.Errorf("SilentDrops %d after lifting the silence, want still 2", s.SilentDrops)
	}
}
