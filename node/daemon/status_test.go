package daemon

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/pipeswarm/pipeswarm/node/config"
	"github.com/pipeswarm/pipeswarm/node/status"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
)

func statusDaemon(t *testing.T) *Daemon {
	t.Helper()
	cfg := &config.Config{DataDir: filepath.Join(t.TempDir(), "node"), Listen: []string{"/ip4/127.0.0.1/tcp/0"}, Open: true, Status: "127.0.0.1:0"}
	cfg.EnsureDefaults()
	d, err := New(context.Background(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// The status server shows what the daemon knows: its identity, its peers, the
// control messages and bad frames it received (counted where they are read), the
// warnings it logged and the runs it accepted.
func TestStatusServerShowsPeersTrafficWarningsAndRuns(t *testing.T) {
	d := statusDaemon(t)
	b, err := os.ReadFile(filepath.Join(d.dir.Path, "status_addr"))
	if err != nil || strings.TrimSpace(string(b)) != d.StatusAddr() || strings.HasSuffix(d.StatusAddr(), ":0") {
		t.Fatalf("status_addr holds %q (%v); the server is on %s", b, err, d.StatusAddr())
	}
	// Before anything has happened, the metrics that are there from the start.
	resp, err := http.Get("http://" + d.StatusAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	for _, name := range []string{"pipeswarm_build_info", "pipeswarm_peers", "pipeswarm_peers_limited", "pipeswarm_reachable"} {
		if _, ok := fams[name]; !ok {
			t.Errorf("a new node's /metrics lacks %s", name)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	k, _ := p2p.GenerateKey()
	h := testHostWith(t, k)
	if _, err := h.Connect(ctx, d.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	if r, err := wire.Call(ctx, h, wire.NewCallClock(10*time.Second, nil), nil, d.ID(), wire.Msg{Type: wire.MsgOffer}); err != nil || !r.OK {
		t.Fatalf("offer: %+v %v", r, err)
	}
	// h launches a run here (so its tensor streams are read), then sends a bad frame.
	if err := d.accept(h.ID(), signedPlanBy(t, d, k, 0xab, time.Now().Add(time.Minute))); err != nil {
		t.Fatal(err)
	}
	s, err := h.NewStream(ctx, d.ID(), p2p.ProtoActivation)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = s.Write([]byte("PSWF\x01garbage that is not a header, long enough to be read as one"))
	_ = s.CloseWrite()
	_ = s.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, _ = s.Read(make([]byte, 1)) // reset once the node has judged it

	snap, err := status.Fetch(ctx, d.StatusAddr())
	if err != nil {
		t.Fatal(err)
	}
	if snap.Peer != d.ID().String() || snap.Build.Go == "" || snap.Reachability.State == "" {
		t.Errorf("identity: peer %s build %+v reachability %+v", snap.Peer, snap.Build, snap.Reachability)
	}
	var found bool
	for _, p := range snap.Peers {
		if p.ID == h.ID().String() {
			found = true
			if p.Limited || p.Conns < 1 || p.Penalties != 1 {
				t.Errorf("peer %+v: want a direct connection and one penalty", p)
			}
		}
	}
	if !found {
		t.Errorf("connected peer %s not listed: %+v", h.ID(), snap.Peers)
	}
	for _, tr := range snap.Traffic {
		if tr.Protocol == string(p2p.ProtoControl) && (tr.FramesIn != 1 || tr.FramesOut != 1 || tr.BytesIn == 0 || tr.BytesOut == 0) {
			t.Errorf("control traffic %+v after one offer: want one message each way", tr)
		}
	}
	if snap.Penalties != 1 {
		t.Errorf("penalties %d, want 1", snap.Penalties)
	}
	var warned bool
	for _, w := range snap.Warnings {
		warned = warned || (strings.Contains(w.Msg, "protocol violation") && strings.Contains(w.Attrs, h.ID().String()))
	}
	if !warned || snap.WarningsSeen < 1 {
		t.Errorf("the bad frame's warning is not shown: %+v", snap.Warnings)
	}
	if len(snap.Runs) != 1 || snap.Runs[0].Run != "00000000000000ab" || snap.Runs[0].State != status.RunAccepted || snap.Runs[0].Steps != 2 {
		t.Errorf("runs %+v, want the accepted run", snap.Runs)
	}
	hb := d.Heartbeat()
	if hb.Peer != d.ID().String() || hb.Version == "" || len(hb.Runs) != 1 || hb.Runs[0].Run != "00000000000000ab" || hb.Runs[0].State != status.RunAccepted {
		t.Errorf("heartbeat %+v", hb)
	}

	addr := d.StatusAddr()
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(d.dir.Path, "status_addr")); !os.IsNotExist(err) {
		t.Errorf("status_addr left behind by a closed node: %v", err)
	}
	if _, err := status.Fetch(ctx, addr); err == nil {
		t.Error("a closed node still serves its status")
	}
}

// Heartbeats on gossip carry the node's version and what it serves, under the field
// names docs/node.md lists.
func TestHeartbeatsOnGossipCarryVersionAndStages(t *testing.T) {
	defer func(i time.Duration) { wire.HeartbeatInterval = i }(wire.HeartbeatInterval)
	wire.HeartbeatInterval = 200 * time.Millisecond
	d := testDaemon(t)
	h := testHost(t)
	topic, err := h.PubSub.Join(p2p.TopicHeartbeats)
	if err != nil {
		t.Fatal(err)
	}
	sub, err := topic.Subscribe()
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Cancel()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := h.Connect(ctx, d.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(context.Background())
	ran := make(chan struct{})
	go func() { d.Run(runCtx); close(ran) }()
	defer func() { stop(); <-ran }() // before HeartbeatInterval is restored
	for {
		m, err := sub.Next(ctx)
		if err != nil {
			t.Fatalf("no heartbeat from the node: %v", err)
		}
		if m.GetFrom() != d.ID() {
			continue
		}
		var fields map[string]any
		if err := json.Unmarshal(m.Data, &fields); err != nil {
			t.Fatalf("heartbeat %q: %v", m.Data, err)
		}
		for _, k := range []string{"peer", "version", "reachable", "tokens_per_s", "runs"} {
			if _, ok := fields[k]; !ok {
				t.Errorf("heartbeat %s lacks %q", m.Data, k)
			}
		}
		if fields["peer"] != d.ID().String() || fields["version"] == "" {
			t.Errorf("heartbeat %s", m.Data)
		}
		return
	}
}
