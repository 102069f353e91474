package status

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/pipeswarm/pipeswarm/node/build"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/traffic"
)

func TestWarnRingKeepsTheLastWarningsAndPassesEverythingOn(t *testing.T) {
	var out bytes.Buffer
	ring := NewWarnRing(3)
	// The text handler shows errors only: the ring still keeps warnings.
	log := slog.New(ring.Handler(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: slog.LevelError}))).With("sys", "node")
	log.Info("not kept")
	for i := range 5 {
		log.Warn("slow peer", "n", i)
	}
	log.WithGroup("g").Error("broken", "peer", "12D3 x")
	got := ring.Recent()
	if ring.Total() != 6 || len(got) != 3 {
		t.Fatalf("total %d, kept %d: want 6 and 3", ring.Total(), len(got))
	}
	want := []string{"sys=node n=3", "sys=node n=4", `sys=node g.peer="12D3 x"`}
	for i, w := range got {
		if w.Attrs != want[i] {
			t.Errorf("warning %d attrs %q, want %q", i, w.Attrs, want[i])
		}
	}
	if got[2].Msg != "broken" || got[2].Level != "ERROR" || got[0].Msg != "slow peer" || got[0].Level != "WARN" {
		t.Errorf("kept %+v", got)
	}
	if s := out.String(); strings.Contains(s, "slow peer") || strings.Contains(s, "not kept") || !strings.Contains(s, "broken") {
		t.Errorf("the wrapped handler's level was not respected:\n%s", s)
	}
}

func TestCurveStaysBoundedAndKeepsItsEnds(t *testing.T) {
	c := Curve{Max: 16}
	for s := 1; s <= 1000; s++ {
		c.Add(s, 1/float64(s))
		if n := len(c.points); n > 17 {
			t.Fatalf("after step %d the curve holds %d points, want at most 17", s, n)
		}
	}
	p := c.Points()
	if p[0].Step != 1 || p[len(p)-1].Step != 1000 {
		t.Errorf("points run from step %d to %d, want 1 to 1000", p[0].Step, p[len(p)-1].Step)
	}
	if len(p) < 8 {
		t.Errorf("only %d points left of 1000 steps", len(p))
	}
	for i := 1; i < len(p); i++ {
		if p[i].Step <= p[i-1].Step || p[i].Loss != 1/float64(p[i].Step) {
			t.Fatalf("points out of order or changed: %v", p)
		}
	}
}

func testSnapshot(reach string, step int) Snapshot {
	return Snapshot{
		Time: time.Now(), Peer: "12D3KooWTestPeer", Addrs: []string{"/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWTestPeer"},
		Build:        build.Info{Version: "(devel)", Go: "go1.26", GEMM: "gonum"},
		Reachability: p2p.Reachability{State: reach},
		Peers:        []Peer{{ID: "12D3KooWA", Addr: "/ip4/127.0.0.1/tcp/1", Conns: 1}, {ID: "12D3KooWB", Addr: "/p2p-circuit", Conns: 1, Limited: true}},
		Runs: []Run{{Run: "00000000000000aa", Name: "t", Stage: 1, Stages: 2, Replica: 0, Replicas: 1, State: RunRunning, Step: step, Steps: 100,
			Loss: 2.5, LossCurve: []Point{{1, 3}, {step, 2.5}}, TokensPerS: 1000, ComputeS: 1.5, BytesIn: int64(100 * step), BytesOut: int64(50 * step)}},
		Traffic:   []traffic.Protocol{{Protocol: "/pipeswarm/act/2", Counts: traffic.Counts{FramesIn: uint64(step), BytesIn: uint64(1000 * step)}}},
		Penalties: 2,
		Warnings:  []Warning{{Time: time.Now(), Level: "WARN", Msg: "bad message", Attrs: "peer=x"}},
	}
}

func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	return fams
}

func value(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	t.Helper()
	f, ok := fams[name]
	if !ok {
		t.Fatalf("no series %s", name)
	}
next:
	for _, m := range f.GetMetric() {
		for k, v := range labels {
			found := false
			for _, l := range m.GetLabel() {
				found = found || (l.GetName() == k && l.GetValue() == v)
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Gauge != nil:
			return m.GetGauge().GetValue()
		case m.Counter != nil:
			return m.GetCounter().GetValue()
		}
	}
	t.Fatalf("no series %s%v", name, labels)
	return 0
}

func TestMetricsParseAndFollowTheSnapshot(t *testing.T) {
	reach, step := "unknown", 3
	srv, err := Listen(Options{Addr: "127.0.0.1:0", Snapshot: func() Snapshot { return testSnapshot(reach, step) },
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	url := "http://" + srv.Addr() + "/metrics"
	fams := scrape(t, url)
	for name := range fams {
		if !strings.HasPrefix(name, "pipeswarm_") {
			t.Errorf("series %s is not named pipeswarm_*", name)
		}
	}
	if v := value(t, fams, "pipeswarm_build_info", map[string]string{"version": "(devel)", "gemm": "gonum"}); v != 1 {
		t.Errorf("build_info %v", v)
	}
	if v := value(t, fams, "pipeswarm_peers", nil); v != 2 {
		t.Errorf("peers %v, want 2", v)
	}
	if v := value(t, fams, "pipeswarm_peers_limited", nil); v != 1 {
		t.Errorf("peers_limited %v, want 1", v)
	}
	if v := value(t, fams, "pipeswarm_reachable", nil); v != -1 {
		t.Errorf("reachable %v with state unknown, want -1", v)
	}
	if v := value(t, fams, "pipeswarm_frames_total", map[string]string{"protocol": "/pipeswarm/act/2", "direction": "in"}); v != 3 {
		t.Errorf("frames in %v, want 3", v)
	}
	run := map[string]string{"run": "00000000000000aa", "stage": "1", "replica": "0"}
	if v := value(t, fams, "pipeswarm_loss", run); v != 2.5 {
		t.Errorf("loss %v", v)
	}
	if fams["pipeswarm_frames_total"].GetType() != dto.MetricType_COUNTER || fams["pipeswarm_peers"].GetType() != dto.MetricType_GAUGE {
		t.Error("frames_total should be a counter and peers a gauge")
	}

	reach, step = "public", 7
	fams = scrape(t, url)
	if v := value(t, fams, "pipeswarm_reachable", nil); v != 1 {
		t.Errorf("reachable %v when public, want 1", v)
	}
	if v := value(t, fams, "pipeswarm_step", run); v != 7 {
		t.Errorf("step %v, want 7", v)
	}
	if v := value(t, fams, "pipeswarm_run_bytes_total", map[string]string{"run": "00000000000000aa", "direction": "in"}); v != 700 {
		t.Errorf("run bytes in %v, want 700", v)
	}
	reach = "private"
	if v := value(t, scrape(t, url), "pipeswarm_reachable", nil); v != 0 {
		t.Errorf("reachable %v when private, want 0", v)
	}
}

// The page is one self-contained document: it loads nothing from anywhere, and
// takes its data from /api/status on the node that served it.
func TestPageIsSelfContainedAndTheAPIServesTheSnapshot(t *testing.T) {
	srv, err := Listen(Options{Addr: "127.0.0.1:0", Snapshot: func() Snapshot { return testSnapshot("private", 5) },
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	resp, err := http.Get("http://" + srv.Addr() + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("GET /: %s %s", resp.Status, resp.Header.Get("Content-Type"))
	}
	if m := regexp.MustCompile(`(?i)(src|href)\s*=|<link|@import|url\(|https?://[^"]*"\s*\)`).FindString(string(body)); m != "" {
		t.Errorf("the page refers to another resource: %q", m)
	}
	if !strings.Contains(string(body), `fetch("/api/status"`) {
		t.Error("the page does not poll /api/status")
	}

	snap, err := Fetch(context.Background(), srv.Addr())
	if err != nil {
		t.Fatal(err)
	}
	want := testSnapshot("private", 5)
	if snap.Peer != want.Peer || len(snap.Runs) != 1 || snap.Runs[0].Step != 5 || len(snap.Runs[0].LossCurve) != 2 || snap.Reachability.State != "private" {
		t.Errorf("fetched %+v", snap)
	}
	var text bytes.Buffer
	if err := WriteText(&text, snap); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"12D3KooWTestPeer", "private", "00000000000000aa", "5/100", "2.5000", "12D3KooWB", "true", "/pipeswarm/act/2", "bad message", "5:2.5000"} {
		if !strings.Contains(text.String(), s) {
			t.Errorf("pipeswarm status text lacks %q:\n%s", s, text.String())
		}
	}
	if b, _ := json.Marshal(snap); !bytes.Contains(b, []byte(`"loss_curve":[{"step":1,"loss":3}`)) {
		t.Errorf("JSON field names changed: %s", b)
	}
}

func TestAServerThatStopsFreesItsPort(t *testing.T) {
	srv, err := Listen(Options{Addr: "127.0.0.1:0", Snapshot: func() Snapshot { return Snapshot{} }, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	addr := srv.Addr()
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	again, err := Listen(Options{Addr: addr, Snapshot: func() Snapshot { return Snapshot{} }, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatalf("port of a closed server still taken: %v", err)
	}
	again.Close()
	if _, err := Fetch(context.Background(), addr); err == nil {
		t.Error("Fetch from a stopped server succeeded")
	}
}
