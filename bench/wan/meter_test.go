package wan

import (
	"reflect"
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

func TestMeterWithoutClippingHasNoNormExchange(t *testing.T) {
	sp := twoStageSpec(t)
	sp.Train.GradClip = 0
	tr := NewTrace()
	ms := time.Millisecond
	tr.Add(train.Op{Stage: 0, Kind: train.OpForward, Step: 1, Dur: 10 * ms, Bytes: 125_000})
	tr.Add(train.Op{Stage: 1, Kind: train.OpForward, Step: 1, Dur: 10 * ms})
	tr.Add(train.Op{Stage: 1, Kind: train.OpBackward, Step: 1, Dur: 20 * ms, Bytes: 125_000})
	tr.Add(train.Op{Stage: 0, Kind: train.OpBackward, Step: 1, Dur: 20 * ms})
	tr.Add(train.Op{Stage: 0, Kind: train.OpOptimize, Step: 1, Dur: ms})
	tr.Add(train.Op{Stage: 1, Kind: train.OpOptimize, Step: 1, Dur: ms})
	sc, err := Meter(sp, tr, &Profile{BandwidthMbps: 100, LatencyMs: 25}, 1)
	if err != nil {
		t.Fatal(err)
	}
	// As with clipping up to s0's backward (110–130), then s0 steps at once (131);
	// s1 stepped right after its backward (75–76) and waits for nothing more.
	if want := 131 * ms; sc.Wall != want || sc.StepEnd[0] != want {
		t.Fatalf("wall %v, step end %v, want %v", sc.Wall, sc.StepEnd[0], want)
	}
	for s, l := range sc.Ledgers[0] {
		if l.Total[core.WaitBubble] != 0 || l.Total[core.WaitNorm] != 0 {
			t.Fatalf("stage %d waited for norms in a run that does not clip: %v", s, l.Total)
		}
	}
}

func TestMeterOverlapsOuterStepsAsTheCoreSchedulesThem(t *testing.T) {
	// One stage, two replicas, Streaming DiLoCo with 2 fragments over H = 2, 3 steps:
	// fragment 0's all-reduce begins after step 1 and is applied after step 2,
	// fragment 1's after 2 (applied after 3), and both after the last step, waited for.
	sp, err := spec.Parse([]byte(`
name: m
model: {d_model: 16, n_layers: 2, n_heads: 2, d_ff: 32, seq_len: 8}
pipeline: {stages: 1, replicas: 2, micro_batches: 1}
train: {batch_size: 1, steps: 3, lr: 0.001, warmup: 0}
diloco: {inner_steps: 2, fragments: 2}
`), "m.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ms := time.Millisecond
	tr := NewTrace()
	for r := range 2 {
		for step := 1; step <= 3; step++ {
			tr.Add(train.Op{Replica: r, Kind: train.OpForward, Step: step, Dur: 10 * ms})
			tr.Add(train.Op{Replica: r, Kind: train.OpBackward, Step: step, Dur: 10 * ms})
			tr.Add(train.Op{Replica: r, Kind: train.OpOptimize, Step: step, Dur: ms})
		}
		// The outer steps applied after steps 2 (fragment 0's) and 3 (fragment 1's,
		// then both): 100 ms of sending per fragment at 100 Mbit/s.
		tr.Add(train.Op{Replica: r, Kind: train.OpOuter, Step: 2, Dur: 2 * ms, Bytes: 1_250_000})
		tr.Add(train.Op{Replica: r, Kind: train.OpOuter, Step: 3, Dur: 2 * ms, Bytes: 3_750_000})
	}
	sc, err := Meter(sp, tr, &Profile{BandwidthMbps: 100, LatencyMs: 25}, 1)
	if err != nil {
		t.Fatal(err)
	}
	// Step 1 ends at 21 and its all-reduce runs 21–171 (100 ms + 2 × 25) while step 2
	// computes (21–42); step 2 waits for it, applies it (2 ms) and ends at 173, its own
	// all-reduce 173–323 under step 3 (173–194); step 3 applies that (323–325), then
	// both fragments' all-reduce, 200 ms + 50: the run ends at 575.
	if want := []time.Duration{21 * ms, 173 * ms, 575 * ms}; !reflect.DeepEqual(sc.StepEnd, want) {
		t.Fatalf("steps end at %v, want %v", sc.StepEnd, want)
	}
	want := []SyncTime{{Stage: 0, Step: 1, Bytes: 2_500_000, Dur: 150 * ms}, {Stage: 0, Step: 2, Bytes: 2_500_000, Dur: 150 * ms},
		{Stage: 0, Step: 3, Bytes: 5_000_000, Dur: 250 * ms}}
	if !reflect.DeepEqual(sc.Syncs, want) {
		t.Fatalf("all-reduces %+v, want %+v", sc.Syncs, want)
	}
}

func TestMeterSchedulesTheAsyncPipelineFromTheCores(t *testing.T) {
	sp, err := spec.Parse([]byte(`
name: m
model: {d_model: 16, n_layers: 2, n_heads: 2, d_ff: 32, seq_len: 8}
pipeline: {stages: 2, micro_batches: 2, schedule: async}
train: {batch_size: 2, steps: 2, lr: 0.001, warmup: 0}
`), "m.yaml")
	if err != nil {
		t.Fatal(err)
	}
	tr := NewTrace()
	ms := time.Millisecond
	for s := range 2 {
		for step := 1; step <= 2; step++ {
			for m := range 2 {
				tr.Add(train.Op{Stage: s, Kind: train.OpForward, Step: step, Item: m, Dur: 10 * ms})
				tr.Add(train.Op{Stage: s, Kind: train.OpBackward, Step: step, Item: m, Dur: 20 * ms})
			}
			tr.Add(train.Op{Stage: s, Kind: train.OpOptimize, Step: step, Dur: ms})
		}
	}
	sc, err := Meter(sp, tr, nil, 1)
	if err != nil {
		t.Fatal(err)
	}
	// Stage 0 (bound 2): F0 0–10, F1 10–20, B0 40–60 (stage 1: F0 10–20, B0 20–40),
	// F2 60–70, B1 70–90 (stage 1: F1 40–50, B1 50–70, U1 70–71), U1 90–91, F3
	// 91–101, B2 101–121 (stage 1: F2 71–81, B2 81–101), B3 131–151 (stage 1: F3
	// 101–111, B3 111–131, U2 131–132), U2 151–152. Stage 1 runs update 2's forwards
	// before stage 0 has taken update 1: no flush between updates.
	if want := 152 * ms; sc.Wall != want || sc.StepEnd[1] != want || sc.StepEnd[0] != 91*ms {
		t.Fatalf("wall %v, update ends %v; want 152ms, [91ms 152ms]", sc.Wall, sc.StepEnd)
	}
	for s, l := range sc.Ledgers[0] {
		if l.Total[core.WaitNorm] != 0 || l.Total[core.WaitBubble] != 0 {
			t.Fatalf("stage %d waited for norms or a drain in an async run: %v", s, l.Total)
		}
	}
}

func TestBaselineKeyKeepsAnAsyncRunsInFlight(t *testing.T) {
	key := func(schedule string, inFlight int) string {
		sp := twoStageSpec(t)
		sp.Pipeline.MicroBatches, sp.Train.BatchSize = 2, 2
		sp.Pipeline.Schedule, sp.Pipeline.InFlight = schedule, inFlight
		if schedule == spec.ScheduleAsync {
			sp.Train.Delay = spec.DefaultDelay
		}
		k, err := BaselineKey(sp, 1)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	// A sync run's in-flight bound changes its schedule only; an async run's changes
	// the weight versions its centralised run computes on.
	if key(spec.ScheduleSync, 0) != key(spec.ScheduleSync, 2) {
		t.Error("sync: the in-flight bound changed the baseline's key")
	}
	if key(spec.ScheduleAsync, 0) == key(spec.ScheduleAsync, 2) {
		t.Error("async: runs with another in-flight bound share a baseline")
	}
}
