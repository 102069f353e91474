package main

import (
	"bytes"
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/pipeswarm/pipeswarm/node/status"
)

// chromiumPath is Debian's chromium, which the browser test drives (.ci/run installs it).
const chromiumPath = "/usr/bin/chromium"

// statusSpec trains long enough for the test to look at it and is stopped by it.
const statusSpec = `name: status
seed: 5
eval_interval: 50
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 2, micro_batches: 2}
train: {batch_size: 4, steps: 100000, lr: 0.003, warmup: 2}
data: {val_fraction: 0.005}
`

// TestStatusPageAndMetricsFollowATwoNodeRun starts two node processes with
// --status, launches a run across them, and looks at what they serve while it goes:
// /metrics parses with Prometheus's own text parser and its counters grow; `pipeswarm
// status` prints the run; and the page, in headless Chromium, shows the node's peer
// ID and a loss curve that grows without the page being reloaded.
func TestStatusPageAndMetricsFollowATwoNodeRun(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, statusSpec, 2, "--status", "127.0.0.1:0", "--threads", "1")
	addrs := make([]string, len(nodes))
	for i, n := range nodes {
		// A node writes status_addr after addrs, which is all startSwarm waits for.
		b, err := os.ReadFile(filepath.Join(n.dir, "status_addr"))
		for deadline := time.Now().Add(30 * time.Second); err != nil && time.Now().Before(deadline); {
			time.Sleep(50 * time.Millisecond)
			b, err = os.ReadFile(filepath.Join(n.dir, "status_addr"))
		}
		if err != nil {
			t.Fatalf("node %d wrote no status_addr in 30 s: %v", i, err)
		}
		addrs[i] = strings.TrimSpace(string(b))
	}

	ctx, stopLaunch := context.WithCancel(context.Background())
	launched := make(chan int, 1)
	var launchErr bytes.Buffer
	go func() {
		var out bytes.Buffer
		launched <- run(ctx, append([]string{"launch", specPath, "--key", keyPath, "--out", filepath.Join(dir, "out"), "--quiet"}, peerArgs...), &out, &launchErr)
	}()
	defer func() {
		stopLaunch()
		select {
		case <-launched:
		case <-time.After(30 * time.Second):
			t.Error("launch did not stop 30 s after its context ended")
		}
		for i, n := range nodes {
			_ = n.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-n.exited:
			case <-time.After(15 * time.Second):
				t.Errorf("node %d still running 15 s after SIGTERM", i)
			}
		}
	}()

	// The node holding the last stage knows the loss; wait until it has a few steps.
	last, peerID := -1, ""
	deadline := time.Now().Add(60 * time.Second)
	for last < 0 {
		for i, a := range addrs {
			s, err := status.Fetch(context.Background(), a)
			if err != nil {
				continue
			}
			for _, r := range s.Runs {
				if r.Stage == r.Stages-1 && r.State == status.RunRunning && len(r.LossCurve) >= 3 {
					last, peerID = i, s.Peer
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no node shows a running last stage with a loss curve after 60 s; launch: %s", launchErr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}

	t.Run("metrics", func(t *testing.T) {
		for i, a := range addrs {
			before := scrapeMetrics(t, a)
			for _, name := range []string{"pipeswarm_build_info", "pipeswarm_peers", "pipeswarm_reachable"} {
				if _, ok := before[name]; !ok {
					t.Errorf("node %d: no %s", i, name)
				}
			}
			for name := range before {
				if !strings.HasPrefix(name, "pipeswarm_") {
					t.Errorf("node %d: series %s is not named pipeswarm_*", i, name)
				}
			}
			if v := sum(before["pipeswarm_peers"], nil); v < 1 {
				t.Errorf("node %d: pipeswarm_peers %v during a run, want at least 1", i, v)
			}
			// Counters grow while the run goes on: poll until they have, or give up.
			grew := func(after map[string]*dto.MetricFamily) bool {
				for _, p := range []string{"/pipeswarm/act/2", "/pipeswarm/grad/2"} {
					for _, m := range []string{"pipeswarm_frames_total", "pipeswarm_bytes_total"} {
						sel := map[string]string{"protocol": p}
						if sum(after[m], sel) <= sum(before[m], sel) {
							return false
						}
					}
				}
				return sum(after["pipeswarm_step"], nil) > sum(before["pipeswarm_step"], nil) &&
					sum(after["pipeswarm_compute_seconds_total"], nil) > sum(before["pipeswarm_compute_seconds_total"], nil)
			}
			var after map[string]*dto.MetricFamily
			for end := time.Now().Add(30 * time.Second); ; {
				time.Sleep(250 * time.Millisecond)
				if after = scrapeMetrics(t, a); grew(after) {
					break
				}
				if time.Now().After(end) {
					t.Fatalf("node %d: frames, bytes, step or compute time did not grow in 30 s", i)
				}
			}
			t.Logf("node %d: step %v → %v, tensor frames %v → %v", i, sum(before["pipeswarm_step"], nil), sum(after["pipeswarm_step"], nil),
				sum(before["pipeswarm_frames_total"], map[string]string{"protocol": "/pipeswarm/act/2"})+sum(before["pipeswarm_frames_total"], map[string]string{"protocol": "/pipeswarm/grad/2"}),
				sum(after["pipeswarm_frames_total"], map[string]string{"protocol": "/pipeswarm/act/2"})+sum(after["pipeswarm_frames_total"], map[string]string{"protocol": "/pipeswarm/grad/2"}))
		}
		if sum(scrapeMetrics(t, addrs[last])["pipeswarm_loss"], nil) <= 0 {
			t.Error("the last stage's node exports no pipeswarm_loss")
		}
	})

	t.Run("status command", func(t *testing.T) {
		code, stdout, stderr := runCLI(t, "status", "--data-dir", nodes[last].dir)
		if code != 0 {
			t.Fatalf("status exited %d: %s", code, stderr)
		}
		for _, want := range []string{peerID, "running", "loss (step:loss)", "/pipeswarm/act/2"} {
			if !strings.Contains(stdout, want) {
				t.Errorf("pipeswarm status lacks %q:\n%s", want, stdout)
			}
		}
		// The first stage never computes the loss; it shows the one the last stage
		// announced in its heartbeat (every HeartbeatInterval, 5 s).
		first := 1 - last
		deadline := time.Now().Add(20 * time.Second)
		for {
			code, stdout, stderr := runCLI(t, "status", "--data-dir", nodes[first].dir)
			if i := strings.Index(stdout, "from the heartbeat of stage 1"); code == 0 && i >= 0 {
				t.Logf("the first stage's status: %s", stdout[strings.LastIndex(stdout[:i], "\n")+1:i+len("from the heartbeat of stage 1")])
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the first stage's status shows no loss 20 s on (exit %d, %s):\n%s", code, stderr, stdout)
			}
			time.Sleep(200 * time.Millisecond)
		}
	})

	t.Run("page in chromium", func(t *testing.T) {
		if _, err := os.Stat(chromiumPath); err != nil {
			t.Skipf("headless Chromium not installed at %s (apt-get install chromium); the status page is not tested in a browser", chromiumPath)
		}
		profile, err := os.MkdirTemp("", "pipeswarm-chromium-")
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(profile)
		actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
			chromedp.ExecPath(chromiumPath), chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU, chromedp.NoFirstRun,
			chromedp.Flag("disable-quic", true), chromedp.Flag("disable-background-networking", true),
			chromedp.Flag("disable-component-update", true), chromedp.Flag("disable-sync", true),
			chromedp.UserDataDir(profile), chromedp.WindowSize(1280, 1000))
		defer cancelAlloc()
		bctx, cancelBrowser := chromedp.NewContext(actx)
		defer cancelBrowser()
		bctx, cancel := context.WithTimeout(bctx, 90*time.Second)
		defer cancel()

		url := "http://" + addrs[last] + "/"
		if err := chromedp.Do(bctx, chromedp.Navigate(url)); err != nil {
			t.Fatalf("the page did not load: %v", err)
		}
		shown, err := chromedp.Run(bctx, chromedp.Poll[string](`(() => { const t = document.getElementById("peer").textContent; return t.startsWith("12D3KooW") ? t : ""; })()`,
			chromedp.WithPollingTimeout(30*time.Second)))
		if err != nil {
			t.Fatalf("the page shows no peer ID: %v", err)
		}
		if shown != peerID {
			t.Errorf("the page shows peer %q, the node is %s", shown, peerID)
		}
		points := func() int {
			n, err := chromedp.Run(bctx, chromedp.Poll[string](`(() => { const l = document.querySelector("svg.loss polyline"); return l ? l.getAttribute("data-n") : ""; })()`,
				chromedp.WithPollingTimeout(30*time.Second)))
			if err != nil {
				t.Fatalf("no loss curve on the page: %v", err)
			}
			v, _ := strconv.Atoi(n)
			return v
		}
		// Changed, not grown: past status.DefaultCurvePoints the curve is thinned to half.
		first := points()
		deadline := time.Now().Add(30 * time.Second)
		for points() == first {
			if time.Now().After(deadline) {
				t.Fatalf("the loss curve stayed at %d points for 30 s", first)
			}
			time.Sleep(200 * time.Millisecond)
		}
		png, err := chromedp.Run(bctx, chromedp.FullScreenshot(100))
		if err != nil {
			t.Fatal(err)
		}
		out := filepath.Join(artifactDir(t), "pipeswarm-status-page.png")
		if err := os.WriteFile(out, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("loss curve went from %d to %d points without a reload; screenshot of the page: %s", first, points(), out)
	})
}

// artifactDir is where tests leave files for people to look at after the run:
// $PIPESWARM_ARTIFACTS if set (.ci/run sets it), else the system temp directory.
func artifactDir(t *testing.T) string {
	d := os.Getenv("PIPESWARM_ARTIFACTS")
	if d == "" {
		return os.TempDir()
	}
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	return d
}

// scrapeMetrics reads a node's /metrics and parses it as Prometheus does.
func scrapeMetrics(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %s", resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	return fams
}

// sum adds the values of f's series whose labels include sel.
func sum(f *dto.MetricFamily, sel map[string]string) float64 {
	var s float64
next:
	for _, m := range f.GetMetric() {
		for k, v := range sel {
			ok := false
			for _, l := range m.GetLabel() {
				ok = ok || (l.GetName() == k && l.GetValue() == v)
			}
			if !ok {
				continue next
			}
		}
		s += m.GetGauge().GetValue() + m.GetCounter().GetValue()
	}
	return s
}
