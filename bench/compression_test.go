package bench

import (
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
)

func TestCompressionWritesRowsWithRatiosToTheBaseline(t *testing.T) {
	sp, err := spec.Parse([]byte(`name: bc
seed: 2
eval_interval: 4
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 16}
train: {batch_size: 4, steps: 8, lr: 0.004, warmup: 1}
data: {val_fraction: 0.002}
`), "bc.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	settings := []Setting{
		{Name: "none", Activations: "fp32", Gradients: "fp32"},
		{Name: "subspace k=4 + int8", Subspace: 4, DenseTail: 1, Activations: "int8/32", Gradients: "int8/32"},
	}
	rows, err := Compression(t.Context(), CompressionOptions{Spec: sp, Settings: settings, OutDir: dir,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	base, comp := rows[0], rows[1]
	// fp32 at d=32 is 128 bytes per token each way, plus two 1-byte token ids forward.
	if base.BytesPerTokenBwd < 128 || base.BytesPerTokenBwd > 130 || base.BytesPerTokenFwd < 130 || base.BytesPerTokenFwd > 132 {
		t.Errorf("baseline bytes/token fwd %.2f bwd %.2f, want ≈130 and ≈128", base.BytesPerTokenFwd, base.BytesPerTokenBwd)
	}
	// k=4 int8 values and their block scale, plus the token ids forward.
	if comp.BwdRatio < 20 || comp.FwdRatio < 15 {
		t.Errorf("subspace k=4 + int8 saves only %.1f× forward, %.1f× backward", comp.FwdRatio, comp.BwdRatio)
	}
	if base.FwdRatio != 1 || base.ValLossRatio != 1 || base.StepsToTarget == nil || *base.StepsRatio != 1 {
		t.Errorf("baseline row is not its own reference: %+v", base)
	}
	if base.Target <= 0 || base.Steps != 8 {
		t.Errorf("target %v after %d steps", base.Target, base.Steps)
	}
	var js struct {
		Rows []map[string]any `json:"rows"`
	}
	b, err := os.ReadFile(filepath.Join(dir, "compression.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &js); err != nil || len(js.Rows) != 2 {
		t.Fatalf("compression.json: %v, %d rows", err, len(js.Rows))
	}
	for _, k := range []string{"setting", "bytes_per_token_fwd", "bytes_per_token_bwd", "val_loss_at_equal_steps", "steps_to_target", "target"} {
		if _, ok := js.Rows[1][k]; !ok {
			t.Errorf("compression.json rows lack %q", k)
		}
	}
	md, _ := os.ReadFile(filepath.Join(dir, "compression.md"))
	if !strings.Contains(string(md), "| subspace k=4 + int8 |") {
		t.Errorf("compression.md lacks the setting's row:\n%s", md)
	}
}

func TestParseSettingNamesAndValidates(t *testing.T) {
	for in, want := range map[string]Setting{
		"fp32":               {Name: "none", Activations: "fp32", Gradients: "fp32"},
		"int8/32+zstd":       {Name: "int8/32+zstd", Activations: "int8/32+zstd", Gradients: "int8/32+zstd"},
		"k=4/int8/32":        {Name: "subspace k=4 + int8/32", Subspace: 4, DenseTail: 1, Activations: "int8/32", Gradients: "int8/32"},
		"k=8/fp32":           {Name: "subspace k=8", Subspace: 8, DenseTail: 1, Activations: "fp32", Gradients: "fp32"},
		"k=8,tail=4/int8/32": {Name: "subspace k=8 (dense tail 4) + int8/32", Subspace: 8, DenseTail: 4, Activations: "int8/32", Gradients: "int8/32"},
		"k=8,tail=0/fp32":    {Name: "subspace k=8 (dense tail 0)", Subspace: 8, DenseTail: 0, Activations: "fp32", Gradients: "fp32"},
	} {
		got, err := ParseSetting(in)
		if err != nil || got != want {
			t.Errorf("ParseSetting(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, bad := range []string{"int2", "k=0/fp32", "k=4", "k=x/int8", "k=4x/fp32", "k=4,tail=/fp32", "k=4,tail=-1/fp32", "k=4,tail=2"} {
		if _, err := ParseSetting(bad); err == nil {
			t.Errorf("ParseSetting(%q) accepted", bad)
		}
	}
}

func TestBaselineTargetFallsBackToTheFirstEvalAfterHalfway(t *testing.T) {
	v := func(x float64) *float64 { return &x }
	h := []metrics.Step{{Step: 1}, {Step: 2, ValLoss: v(3)}, {Step: 4, ValLoss: v(2)}, {Step: 6, ValLoss: v(1.5)}, {Step: 8, ValLoss: v(1)}}
	if got := TargetAt(h, 4); got != 2 {
		t.Errorf("eval at half the steps: target %v, want 2", got)
	}
	if got := TargetAt(h, 5); got != 2 {
		t.Errorf("last eval before half the steps: target %v, want 2", got)
	}
	if got := TargetAt(h[3:], 4); got != 1.5 {
		t.Errorf("no eval before half the steps: target %v, want the first after it, 1.5", got)
	}
}
