package daemon

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/config"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/shard"
)

// A node whose memory budget holds stage 0 of a run on the sync schedule refuses it on
// the async one, whose stage 0 keeps a past version of its weights besides, and says
// how much of the need that is.
func TestANodeRefusesAnAsyncStageWhosePastVersionsOverrunItsBudget(t *testing.T) {
	const src = `name: p
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 16}
pipeline: {stages: 2, micro_batches: 2%s}
train: {batch_size: 2, steps: 2, lr: 0.001}
`
	parse := func(pipeline string) *spec.Spec {
		sp, err := spec.Parse(fmt.Appendf(nil, src, pipeline), "p.yaml")
		if err != nil {
			t.Fatal(err)
		}
		return sp
	}
	sync, async := parse(""), parse(", schedule: async")
	ranges, _ := shard.SplitLayers(2, 2)
	syncNeed := assign.Need(train.ModelConfig(sync), ranges[0], train.StaffSchedule(sync), 0, 1, false)
	mem := assign.StageMemory(train.ModelConfig(async), ranges[0], train.StaffSchedule(async), 0, 1, false)
	if mem.Versions() != 1 || mem.Total() != syncNeed+mem.Stashed {
		t.Fatalf("async stage 0 needs %d, %d past versions of %d bytes; sync %d: want one version more", mem.Total(), mem.Versions(), mem.Stashed, syncNeed)
	}

	cfg := &config.Config{DataDir: filepath.Join(t.TempDir(), "node"), Listen: []string{"/ip4/127.0.0.1/tcp/0"}, Open: true,
		MemoryBudget: strconv.FormatInt(syncNeed, 10)}
	cfg.EnsureDefaults()
	d, err := New(context.Background(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	k, err := p2p.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	launcher, _ := p2p.PeerID(k)
	k1, _ := p2p.GenerateKey()
	next, _ := p2p.PeerID(k1) // holds stage 1
	cells := []assign.Assignment{{Stage: 0, Peer: d.ID().String(), Range: ranges[0]}, {Stage: 1, Peer: next.String(), Range: ranges[1]}}

	err = d.accept(launcher, signedPlanOf(t, k, 1, time.Now().Add(time.Minute), async, cells))
	needs, has := assign.FormatSizes(mem.Total(), syncNeed)
	want := fmt.Sprintf("refused: stage 0 needs %s, %s of it for 1 past weight version (async schedule), this node's memory budget is %s",
		needs, assign.FormatBytes(mem.Stashed), has)
	if err == nil || err.Error() != want {
		t.Errorf("async plan: %v\nwant %s", err, want)
	}
	if err := d.accept(launcher, signedPlanOf(t, k, 2, time.Now().Add(time.Minute), sync, cells)); err != nil {
		t.Errorf("sync plan on a budget of its need: %v", err)
	}
}
