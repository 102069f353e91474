package netns

import (
	"log/slog"
	"os"
	"os/exec"
	"testing"
	"time"
)

func TestExplore2(t *testing.T) {
	if os.Getenv("EXPLORE2") == "" {
		t.Skip()
	}
	clean := Link{Mbps: 100, Latency: time.Millisecond}
	n := build(t, Config{Nodes: []Link{clean, clean}, Seed: 7, Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug - 4}))})
	for _, d := range [][2]int{{0, 1}, {1, 0}, {0, 1}, {1, 0}} {
		got, err := udpLoss(t.Context(), n, d[0], d[1], 4000)
		t.Log(d, got, err)
	}
	for i := 0; i < 2; i++ {
		out, _ := exec.Command("ip", "-n", n.Namespace(i), "-s", "link").CombinedOutput()
		t.Log(string(out))
		out, _ = exec.Command("ip", "netns", "exec", n.Namespace(i), "netstat", "-su").CombinedOutput()
		t.Log(string(out))
	}
	for _, d := range n.lines {
		t.Log(d.sent.Load(), d.lost.Load(), d.overflow.Load(), d.sendErrs.Load())
	}
}
