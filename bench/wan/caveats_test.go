package wan

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/node/wire"
)

// A report states what limits its figures, in report.md and report.json: a link
// measured more than 10% off its profile (naming it and both figures), a baseline
// reused from an earlier bench (when, which mode, the load then and now), a target
// that fell back to the final evaluation, and nodes sharing the machine's cores.
func TestReportStatesItsCaveats(t *testing.T) {
	defer func(f func() int) { numCPU = f }(numCPU)
	numCPU = func() int { return 2 }
	sp, err := spec.Parse([]byte(`
name: c
eval_interval: 200
model: {d_model: 16, n_layers: 4, n_heads: 2, d_ff: 32, seq_len: 8}
pipeline: {stages: 4, micro_batches: 1}
train: {batch_size: 1, steps: 40, lr: 0.001, warmup: 0}
`), "c.yaml")
	if err != nil {
		t.Fatal(err)
	}
	val := func(v float64) *float64 { return &v }
	var steps []metrics.Step
	for s := 1; s <= 40; s++ {
		row := metrics.Step{Step: s, Tokens: int64(8 * s), ElapsedS: float64(s)}
		if s == 40 {
			row.ValLoss = val(3.5)
		}
		steps = append(steps, row)
	}
	trained := time.Date(2026, 12, 6, 22, 15, 0, 0, time.UTC)
	b := &Baseline{Dir: "/cache/c-40-abc", Steps: steps, Result: train.Result{Steps: 40, ValLoss: 3.5, Tokens: 320, Elapsed: 20 * time.Second},
		Reused: true, Made: BaselineMade{Trained: trained, Mode: ModeMeter, Cores: 2, LoadBefore: 3.1, LoadAfter: 3.4}}
	out := &outcome{steps: steps, wall: 40 * time.Second, tokens: 320,
		links: []LinkFigures{
			{From: "s0r0", To: "s1r0", ProfileMbps: 100, MeasuredMbps: 113.3, ReverseMbps: 24.7, ProfileRTTMs: 50, MeasuredRTTMs: 51},
			{From: "s1r0", To: "s2r0", ProfileMbps: 100, MeasuredMbps: 98, ReverseMbps: 104, ProfileRTTMs: 50, MeasuredRTTMs: 50.4},
		},
		times: []wire.StageTime{{Stage: 3, WallS: 10, Seconds: map[string]float64{"compute": 4, "bubble": 4.81, "norm": 0.05},
			Spans: []core.Span{{Step: 2, Wait: core.WaitBubble, Start: time.Second, End: 2 * time.Second}}}}}
	r := build(Options{Mode: ModeSim, Threads: 1, ComputeScale: 1, Profile: &Profile{Name: "home", BandwidthMbps: 100, LatencyMs: 25}}, sp, b, out)

	want := []string{
		"link s0r0 ↔ s1r0 measured 113.3 / 24.7 Mbit/s (→ / ←) against the profile's 100: more than 10% off",
		"the centralised run is reused from /cache/c-40-abc, trained at 2026-12-06 22:15 UTC by a meter-mode bench, on 2 core(s) with a load average of 3.10 (this bench is sim mode)",
		"the target validation loss 3.5000 is the centralised run's at step 40 (its final evaluation): it evaluated nothing at or before step 20, half of the 40 steps (eval_interval 200)",
		"4 nodes with 1 compute thread(s) each shared this machine's 2 core(s): utilisation and tokens/s reflect that sharing, not 4 machines",
	}
	if len(r.Caveats) != len(want) {
		t.Errorf("%d caveats, want %d (the second link is within 10%%):\n%s", len(r.Caveats), len(want), strings.Join(r.Caveats, "\n"))
	}
	for _, w := range want {
		if !strings.Contains(strings.Join(r.Caveats, "\n"), w) {
			t.Errorf("no caveat says %q:\n%s", w, strings.Join(r.Caveats, "\n"))
		}
	}
	if len(r.StageTimes) != 1 || r.StageTimes[0].BubbleS != 4.81 || r.StageTimes[0].NormS != 0.05 {
		t.Errorf("stage times %+v: want 4.81 s in the bubble, 0.05 s waiting for norms", r.StageTimes)
	}
	if !r.Baseline.Reused || r.Baseline.Made == nil || !r.Baseline.Made.Trained.Equal(trained) {
		t.Errorf("baseline figures %+v: want reused, with when it was made", r.Baseline)
	}

	dir := t.TempDir()
	if err := r.Write(dir); err != nil {
		t.Fatal(err)
	}
	md, _ := os.ReadFile(filepath.Join(dir, "report.md"))
	if !strings.Contains(string(md), "## Caveats\n\n- link s0r0 ↔ s1r0 measured 113.3 / 24.7") || !strings.Contains(string(md), "| in the pipeline bubble s |") ||
		!strings.Contains(string(md), "| 3 | 0 | 40.0% | 4.00 | 0.00 | 0.00 | 4.81 | 0.05 | 0.00 |") {
		t.Errorf("report.md:\n%s", md)
	}
	var js map[string]any
	b2, _ := os.ReadFile(filepath.Join(dir, "report.json"))
	if err := json.Unmarshal(b2, &js); err != nil {
		t.Fatal(err)
	}
	if cv, _ := js["caveats"].([]any); len(cv) != len(want) {
		t.Errorf("report.json caveats: %v", js["caveats"])
	}

	// With an evaluation by half way, links on profile, a fresh baseline and a core
	// per node, there is nothing to say.
	steps[19].ValLoss = val(3.9)
	b.Reused = false
	out.links = out.links[1:]
	numCPU = func() int { return 8 }
	if r := build(Options{Mode: ModeSim, Threads: 1, ComputeScale: 1, Profile: &Profile{Name: "home"}}, sp, b, out); len(r.Caveats) != 0 {
		t.Errorf("caveats where there are none: %v", r.Caveats)
	}
}
