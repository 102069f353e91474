package wan

import (
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
)

func twoStageSpec(t *testing.T) *spec.Spec {
	t.Helper()
	sp, err := spec.Parse([]byte(`
name: m
model: {d_model: 16, n_layers: 2, n_heads: 2, d_ff: 32, seq_len: 8}
pipeline: {stages: 2, micro_batches: 1}
train: {batch_size: 1, steps: 1, lr: 0.001, warmup: 0}
`), "m.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return sp
}

func TestMeterTimesFramesByLinkBandwidthAndLatency(t *testing.T) {
	sp := twoStageSpec(t)
	tr := NewTrace()
	ms := time.Millisecond
	tr.Add(train.Op{Stage: 0, Kind: train.OpForward, Step: 1, Dur: 10 * ms, Bytes: 125_000}) // 10 ms at 100 Mbit/s
	tr.Add(train.Op{Stage: 1, Kind: train.OpForward, Step: 1, Dur: 10 * ms})
	tr.Add(train.Op{Stage: 1, Kind: train.OpBackward, Step: 1, Dur: 20 * ms, Bytes: 125_000})
	tr.Add(train.Op{Stage: 0, Kind: train.OpBackward, Step: 1, Dur: 20 * ms})
	tr.Add(train.Op{Stage: 0, Kind: train.OpOptimize, Step: 1, Dur: ms})
	tr.Add(train.Op{Stage: 1, Kind: train.OpOptimize, Step: 1, Dur: ms})
	prof := &Profile{BandwidthMbps: 100, LatencyMs: 25}
	sc, err := Meter(sp, tr, prof, 1)
	if err != nil {
		t.Fatal(err)
	}
	norm := time.Duration(normBytes * 8 * 10) // ns at 100 Mbit/s
	// s0 forward 0–10, frame on the link 10–20, +25 → s1 forward 45–55, backward
	// 55–75, gradient 75–85 +25 → s0 backward 110–130. s1's norm goes out behind
	// the gradient (85) and arrives at 110+; s0's leaves at 130 and reaches s1 at
	// 155+, whose optimiser step ends the step at 156+. s1 waits 75 to 155+ for
	// s0's backward and its norm: the pipeline's drain, not the norm exchange.
	want := 156*ms + norm
	if sc.Wall != want || sc.StepEnd[0] != want {
		t.Fatalf("wall %v, step end %v, want %v", sc.Wall, sc.StepEnd[0], want)
	}
	l := sc.Ledgers[0][1]
	if l.Total[core.WaitActivation] != 45*ms || l.Total[core.Computing] != 31*ms || l.Total[core.WaitBubble] != 80*ms+norm || l.Total[core.WaitNorm] != 0 {
		t.Fatalf("stage 1 ledger %v", l.Total)
	}
	if b := sc.Ledgers[0][0].Total[core.WaitBubble]; b != 0 {
		t.Fatalf("stage 0 has no earlier stage to wait for, yet %v in the bubble", b)
	}
	// An ideal network: the same compute, back to back.
	sc, err = Meter(sp, tr, nil, 2)
	if err != nil {
		t.Fatal(err)
	}
	if want := (10 + 10 + 20 + 20 + 1) * ms / 2; sc.Wall != want {
		t.Fatalf("ideal network, compute halved: wall %v, want %v", sc.Wall, want)
	}
}

func TestMeterNamesAMissingOp(t *testing.T) {
	sp := twoStageSpec(t)
	if _, err := Meter(sp, NewTrace(), nil, 1); err == nil {
		t.Fatal("an empty trace was scheduled")
	}
}
