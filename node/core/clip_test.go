package core

import (
	"fmt"
	"reflect"
	"testing"
)

func TestWithoutClippingNoNormIsExchangedAndEachStageStepsAtOnce(t *testing.T) {
	// The middle of 3 stages, 2 micro-batches, no clipping: the optimiser step follows
	// the last backward at once, with no norm shared and none waited for.
	c := mustNew(t, Config{Stage: 1, Stages: 3, MicroBatches: 2, Steps: 2})
	script(t, c,
		[2]any{Start{}, nil},
		[2]any{ActivationIn{1, 0}, acts{Forward{Step: 1, Micro: 0, Slot: 0, Send: true}}},
		[2]any{ActivationIn{1, 1}, nil},
		[2]any{Done{}, acts{Forward{Step: 1, Micro: 1, Slot: 1, Send: true}}},
		[2]any{GradientIn{1, 0}, nil},
		[2]any{Done{}, acts{Backward{Step: 1, Micro: 0, Slot: 0, Send: true}}},
		[2]any{GradientIn{1, 1}, nil},
		[2]any{Done{}, acts{Backward{Step: 1, Micro: 1, Slot: 1, Send: true}}},
		[2]any{ActivationIn{2, 0}, nil}, // the next step's input may come while this one steps
		[2]any{Done{}, acts{Optimize{Step: 1}}},
		[2]any{Done{}, acts{StepDone{Step: 1}, Forward{Step: 2, Micro: 0, Slot: 0, Send: true}}},
	)
	var cfgs []Config
	for s := range 4 {
		cfgs = append(cfgs, Config{Stage: s, Stages: 4, MicroBatches: 3, Steps: 3, EvalInterval: 2, EvalBatches: 2})
	}
	for seed := range uint64(30) {
		for s, acts := range simulate(t, cfgs, seed) {
			count := map[string]int{}
			for _, a := range acts {
				count[fmt.Sprintf("%T", a)]++
				if o, ok := a.(Optimize); ok && (o.Clip || o.Norm != 0) {
					t.Fatalf("seed %d stage %d: %+v in a run that does not clip", seed, s, o)
				}
			}
			if count["core.ShareNorm"] != 0 || count["core.Optimize"] != 3 || count["core.StepDone"] != 3 || count["core.Finished"] != 1 {
				t.Fatalf("seed %d stage %d: %v", seed, s, count)
			}
		}
	}
}

func TestWithoutClippingAStageWithEveryForwardOutIsStepping(t *testing.T) {
	// No clipping: once stage 1 of 3 has sent both forwards, stage 2 may finish the
	// step without it, so a stop lets the step finish; and stage 0 going down then
	// does not keep it from finishing its step (it needs only stage 2's gradients).
	c := mustNew(t, Config{Stage: 1, Stages: 3, MicroBatches: 2, Steps: 3})
	for _, e := range []Event{Start{}, ActivationIn{1, 0}, Done{}} {
		must(t, c, e)
	}
	if c.Stepping() {
		t.Fatal("stepping with a forward still to send")
	}
	must(t, c, ActivationIn{1, 1})
	if !c.Stepping() {
		t.Fatal("not stepping with every forward out")
	}
	if out := must(t, c, PeerDown{Stage: 0}); len(out) > 0 {
		t.Fatalf("stage 0 down with every forward out: %v; want the step finished first", out)
	}
	for _, e := range []Event{Done{}, GradientIn{1, 0}, Done{}, GradientIn{1, 1}, Done{}} {
		must(t, c, e)
	}
	out := must(t, c, Done{}) // the optimiser step
	if len(out) != 2 || out[0] != (StepDone{Step: 1}) {
		t.Fatalf("%v, want step 1 done, then a stall", out)
	}
	if s, ok := out[1].(Stalled); !ok || !s.Down || s.Stage != 0 {
		t.Fatalf("%v, want a stall naming stage 0 as down", out[1])
	}
	// A later stage down: its gradients are still needed, the stage stalls at once.
	c = mustNew(t, Config{Stage: 1, Stages: 3, MicroBatches: 1, Steps: 3})
	for _, e := range []Event{Start{}, ActivationIn{1, 0}, Done{}} {
		must(t, c, e)
	}
	if s, ok := stalledIn(must(t, c, PeerDown{Stage: 2})); !ok || s.Stage != 2 {
		t.Fatal("stage 2 down while its gradient is awaited: no stall")
	}
}

func TestEvalAtIsEveryIntervalAndTheLastStep(t *testing.T) {
	var got []int
	for s := 1; s <= 10; s++ {
		if EvalAt(s, 10, 4) {
			got = append(got, s)
		}
	}
	if want := []int{4, 8, 10}; !reflect.DeepEqual(got, want) {
		t.Errorf("interval 4 of 10: %v, want %v", got, want)
	}
	if EvalAt(5, 10, 0) || !EvalAt(10, 10, 0) {
		t.Error("interval 0: want the last step only")
	}
	if (Config{Stages: 1, MicroBatches: 1, Steps: 10, EvalInterval: 4}).EvalDue(4) {
		t.Error("a stage with no validation batches evaluates")
	}
}
