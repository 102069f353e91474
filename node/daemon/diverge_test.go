package daemon

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/launcher"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
)

// With an absurd learning rate the weights overflow after the first step, so the
// second step's gradients are not finite. The stage that computes them says where
// it diverged instead of sending them; the launcher stops the run with that; and
// since no non-finite frame was ever sent, nobody is penalised.
func TestADivergingRunStopsSayingWhereAndPenalisesNobody(t *testing.T) {
	ds := []*Daemon{testDaemon(t), testDaemon(t)}
	sp, err := spec.Parse([]byte(`name: diverge
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 16}
pipeline: {stages: 2, micro_batches: 2}
train: {batch_size: 4, steps: 20, lr: 1.0e+30, warmup: 0}
`), "diverge.yaml")
	if err != nil {
		t.Fatal(err)
	}
	key, err := p2p.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	res, err := launcher.Launch(ctx, launcher.Options{Spec: sp, Key: key, Peers: []string{ds[0].Addrs()[0], ds[1].Addrs()[0]},
		Listen: []string{"/ip4/127.0.0.1/tcp/0"}, OutDir: t.TempDir(), Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if !errors.Is(err, launcher.ErrRunFailed) || !errors.Is(err, wire.ErrDiverged) {
		t.Fatalf("launch: %v, want a failed run that diverged", err)
	}
	if want := "diverged at step 2 on stage 1: the gradient values for micro-batch 0 it was to send are not finite in fp32"; !strings.Contains(err.Error(), want) {
		t.Fatalf("launch: %q, want it to say %q", err, want)
	}
	for i, d := range ds {
		if st := d.Host().Penalties().Stats(); st != (p2p.PenaltyStats{}) {
			t.Errorf("node %d recorded %+v", i, st)
		}
	}
	if res == nil || res.Penalties != (p2p.PenaltyStats{}) {
		t.Errorf("the launcher recorded penalties: %+v", res)
	}
}
