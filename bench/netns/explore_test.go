package netns

import (
	"context"
	"log/slog"
	"os"
	"testing"
	"time"
)

func TestExplore(t *testing.T) {
	if os.Getenv("EXPLORE") == "" {
		t.Skip()
	}
	home, _ := Profile(os.Getenv("EXPLORE"))
	ctx := context.Background()
	t0 := time.Now()
	n, err := Build(ctx, Config{Nodes: []Link{home, home}, Prefix: "pswx", Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))})
	if err != nil {
		t.Fatal(err)
	}
	t.Log("build", time.Since(t0))
	defer n.Close()
	for _, b := range []int64{8 << 20, 64 << 20} {
		t0 = time.Now()
		r, err := n.Measure(ctx, 0, 1, b)
		t.Log(r, err, time.Since(t0))
	}
	r, err := n.Measure(ctx, 0, -1, 1<<20)
	t.Log("hub", r, err)
}
