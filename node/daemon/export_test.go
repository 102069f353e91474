package daemon

import (
	"fmt"
	"strings"
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/node/ckpt"
	"github.com/pipeswarm/pipeswarm/node/config"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/shard"
)

// A node gives a stage's weights only to the run's launcher, only where the run's spec
// (as its checkpoint records it) says export: allowed, and only if its config consents;
// each refusal says which rule and what to change.
func TestNodeGivesWeightsOnlyToTheLauncherOfAnExportableRunWithConsent(t *testing.T) {
	d := testDaemon(t)
	id := func() peer.ID {
		k, err := p2p.GenerateKey()
		if err != nil {
			t.Fatal(err)
		}
		p, err := peer.IDFromPrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	launcher, stranger := id(), id()
	write := func(run uint64, export string) {
		t.Helper()
		sp, err := spec.Parse([]byte(`name: w
export: `+export+`
model: {d_model: 16, n_layers: 1, n_heads: 2, d_ff: 32, seq_len: 8}
train: {batch_size: 2, steps: 5, lr: 0.01}
`), "w.yaml")
		if err != nil {
			t.Fatal(err)
		}
		st, err := shard.NewStage(train.ModelConfig(sp), shard.Range{Lo: 0, Hi: 1}, true, true)
		if err != nil {
			t.Fatal(err)
		}
		st.Init(1)
		dir := d.dir.RunDir(fmt.Sprintf("%016x", run))
		if err := writeLauncherRecord(dir, &wire.Plan{Launcher: launcher.String()}); err != nil {
			t.Fatal(err)
		}
		meta := map[string]string{train.MetaSpec: sp.String(), train.MetaStep: "5", ckpt.MetaStage: "0", ckpt.MetaReplica: "0"}
		if err := shard.SaveCheckpoint(ckpt.PairAt(dir, ckpt.Base(0, 0, 1)).Weights, meta, st); err != nil {
			t.Fatal(err)
		}
	}
	write(1, spec.ExportAllowed)
	write(3, spec.ExportNever)

	if path, size, err := d.weightsFor(launcher, wire.WeightsReq{Run: 1, Stage: 0, Step: 5}); err != nil || size <= 0 || !strings.HasSuffix(path, "stage-0.safetensors") {
		t.Fatalf("the launcher of an exportable run: %q, %d bytes, %v; want the stage's checkpoint", path, size, err)
	}
	for name, tc := range map[string]struct {
		from peer.ID
		req  wire.WeightsReq
		want string
	}{
		"another peer":    {stranger, wire.WeightsReq{Run: 1, Stage: 0, Step: 5}, "export refused: only the run's launcher " + launcher.String() + " may collect its weights"},
		"spec never":      {launcher, wire.WeightsReq{Run: 3, Stage: 0, Step: 5}, "export refused: run 0000000000000003's spec says export: never"},
		"another step":    {launcher, wire.WeightsReq{Run: 1, Stage: 0, Step: 4}, "no checkpoint of stage 0 replica 0 of run 0000000000000001 at step 4 here"},
		"another stage":   {launcher, wire.WeightsReq{Run: 1, Stage: 1, Step: 5}, "no checkpoint of stage 1"},
		"a run not here":  {launcher, wire.WeightsReq{Run: 2, Stage: 0, Step: 5}, "no run 0000000000000002 here"},
		"a malformed ask": {launcher, wire.WeightsReq{Run: 1, Stage: -1, Step: 5}, "bad request"},
	} {
		if _, _, err := d.weightsFor(tc.from, tc.req); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v; want %q", name, err, tc.want)
		}
	}
	d.cfg.Export = config.ExportDeny
	want := "export refused: this node's config says export: deny (its owner can set export: allow in its config, or start it with --export allow)"
	if _, _, err := d.weightsFor(launcher, wire.WeightsReq{Run: 1, Stage: 0, Step: 5}); err == nil || err.Error() != want {
		t.Errorf("a node that denies: %v; want %q", err, want)
	}
}
