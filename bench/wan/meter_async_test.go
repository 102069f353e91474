package wan

import (
	"fmt"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
)

// pipeSpec is a pipeline of stages × 4 micro-batches of the given schedule, for
// steps steps, with inFlight forwards in flight on stage 0.
func pipeSpec(t *testing.T, stages, steps, inFlight int, schedule string) *spec.Spec {
	t.Helper()
	sp, err := spec.Parse([]byte(fmt.Sprintf(`
name: m
model: {d_model: 16, n_layers: 4, n_heads: 2, d_ff: 32, seq_len: 8}
pipeline: {stages: %d, micro_batches: 4, in_flight: %d, schedule: %s}
train: {batch_size: 4, steps: %d, lr: 0.001, warmup: 0}
`, stages, inFlight, schedule, steps)), "m.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return sp
}

// uniformTrace is a trace in which every forward takes 10 ms and every backward 20 ms
// on every stage, each update 1 ms, and each frame is 12.5 kB (1 ms at 100 Mbit/s).
func uniformTrace(sp *spec.Spec) *Trace {
	ms := time.Millisecond
	tr := NewTrace()
	for s := range sp.Pipeline.Stages {
		for step := 1; step <= sp.Train.Steps; step++ {
			for m := range sp.Pipeline.MicroBatches {
				tr.Add(train.Op{Stage: s, Kind: train.OpForward, Step: step, Item: m, Dur: 10 * ms, Bytes: 12_500})
				tr.Add(train.Op{Stage: s, Kind: train.OpBackward, Step: step, Item: m, Dur: 20 * ms, Bytes: 12_500})
			}
			tr.Add(train.Op{Stage: s, Kind: train.OpOptimize, Step: step, Dur: ms})
		}
	}
	return tr
}

func meterOf(t *testing.T, sp *spec.Spec, prof *Profile) *Schedule {
	t.Helper()
	sc, err := Meter(sp, uniformTrace(sp), prof, 1)
	if err != nil {
		t.Fatal(err)
	}
	return sc
}

// idle is each stage's time not computing over the run.
func idle(sc *Schedule) []time.Duration {
	var out []time.Duration
	for _, l := range sc.Ledgers[0] {
		out = append(out, sc.Wall-l.Total[core.Computing])
	}
	return out
}

func TestMeterAsyncKeepsThePipelineFullOnAnIdealNetwork(t *testing.T) {
	// With no flush, a stage waits only while the pipeline fills and drains: its idle
	// time does not grow with the number of updates. A sync pipeline's grows by a
	// fill and a drain every step.
	short, long := meterOf(t, pipeSpec(t, 4, 3, 4, "async"), nil), meterOf(t, pipeSpec(t, 4, 9, 4, "async"), nil)
	for s, d := range idle(short) {
		if d2 := idle(long)[s]; d2 != d {
			t.Errorf("async, ideal network: stage %d idle %v over 3 updates, %v over 9; the pipeline drained between updates", s, d, d2)
		}
	}
	syncShort, syncLong := meterOf(t, pipeSpec(t, 4, 3, 4, "sync"), nil), meterOf(t, pipeSpec(t, 4, 9, 4, "sync"), nil)
	if idle(syncLong)[0] <= idle(syncShort)[0] {
		t.Errorf("sync, ideal network: stage 0 idle %v over 3 steps, %v over 9; the flush should cost every step", idle(syncShort)[0], idle(syncLong)[0])
	}
	// Every stage computes the same here, so after the fill none waits: the wall is
	// one stage's compute plus the fill and drain of 3 stages.
	compute := long.Ledgers[0][0].Total[core.Computing]
	if fill := 3 * 30 * time.Millisecond; long.Wall > compute+fill {
		t.Errorf("async, ideal network: wall %v for %v of compute per stage; more than the fill and drain (%v) lost", long.Wall, compute, fill)
	}
	for s, l := range long.Ledgers[0] {
		if l.Total[core.WaitNorm] != 0 {
			t.Errorf("stage %d waited %v for norms in an async run (each stage clips its own)", s, l.Total[core.WaitNorm])
		}
	}
	for i, end := range long.StepEnd {
		if end == 0 || (i > 0 && end < long.StepEnd[i-1]) {
			t.Fatalf("update ends %v: want each after the one before", long.StepEnd)
		}
	}
}

func TestMeterAsyncHidesTheLinksLatency(t *testing.T) {
	// 25 ms one way between 4 stages: a sync step waits 2 × 3 latencies for its flush.
	// Stage 0's round trip is 150 ms of latency and 130 ms of the later stages'
	// compute and frames; an async pipeline with 12 forwards (360 ms of work) in flight
	// on stage 0 covers it and keeps at least 90% of its own speed on an ideal network.
	home := &Profile{BandwidthMbps: 100, LatencyMs: 25}
	const steps = 12
	rate := func(sc *Schedule) float64 { return 1 / sc.Wall.Seconds() }
	async, asyncIdeal := meterOf(t, pipeSpec(t, 4, steps, 12, "async"), home), meterOf(t, pipeSpec(t, 4, steps, 12, "async"), nil)
	sync, syncIdeal := meterOf(t, pipeSpec(t, 4, steps, 4, "sync"), home), meterOf(t, pipeSpec(t, 4, steps, 4, "sync"), nil)
	if f := rate(async) / rate(asyncIdeal); f < 0.9 {
		t.Errorf("async keeps %.1f%% of the ideal network's speed at 25 ms (wall %v against %v); want ≥ 90%%", 100*f, async.Wall, asyncIdeal.Wall)
	}
	if f := rate(sync) / rate(syncIdeal); f > 0.75 {
		t.Errorf("sync keeps %.1f%% of the ideal network's speed at 25 ms; the flush should cost more", 100*f)
	}
	if r := rate(async) / rate(sync); r < 2 {
		t.Errorf("async at 25 ms is %.2f× sync's speed (walls %v, %v); want ≥ 2×", r, async.Wall, sync.Wall)
	}
	t.Logf("walls: async %v (ideal %v), sync %v (ideal %v)", async.Wall, asyncIdeal.Wall, sync.Wall, syncIdeal.Wall)
}
