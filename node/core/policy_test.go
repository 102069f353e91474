package core

import (
	"errors"
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

func TestCheckpointsFollowTheStepAtIntervalsAndWhereOrdered(t *testing.T) {
	// One stage, 5 steps, a checkpoint every 2 and one ordered at 3: after steps 2, 3
	// and 4, never after the last (the run's end writes it), and an order for a step
	// done is refused.
	c := mustNew(t, Config{Stages: 1, MicroBatches: 1, Steps: 5, CheckpointInterval: 2})
	must(t, c, Start{})
	if _, err := c.Handle(CheckpointAt{Step: 3}); err != nil {
		t.Fatal(err)
	}
	var cks []int
	for s := 1; s <= 5; s++ {
		for _, a := range single(t, c, s) {
			if k, ok := a.(Checkpoint); ok {
				cks = append(cks, k.Step)
			}
		}
		if s == 1 {
			if _, err := c.Handle(CheckpointAt{Step: 1}); !errors.Is(err, ErrStale) {
				t.Fatalf("a checkpoint ordered at step 1, done: %v, want ErrStale", err)
			}
		}
	}
	if want := []int{2, 3, 4}; !reflect.DeepEqual(cks, want) {
		t.Fatalf("checkpoints after steps %v, want %v", cks, want)
	}
}

func TestCheckpointFollowsTheOuterStepAndPrecedesEvaluation(t *testing.T) {
	c := mustNew(t, Config{Stages: 1, MicroBatches: 1, Steps: 3, CheckpointInterval: 2, EvalInterval: 2, EvalBatches: 1,
		Outer: &Outer{Fragments: 1, Due: everyOther}})
	must(t, c, Start{})
	single(t, c, 1)
	if out := single(t, c, 2); !reflect.DeepEqual(out, acts{StartReduce{Step: 2, Frags: []int{0}}}) {
		t.Fatalf("step 2: %v", out)
	}
	must(t, c, ReduceDone{Step: 2})
	if out := must(t, c, Done{}); !reflect.DeepEqual(out, acts{OuterDone{Step: 2}, StepDone{Step: 2}, Checkpoint{Step: 2}, EvalForward{Step: 2}}) {
		t.Fatalf("step 2's outer step applied: %v", out)
	}
}

func TestCheckpointOrderIsNotANeighbourSpeaking(t *testing.T) {
	// The launcher's orders come from elsewhere: a silent neighbour is stalled at its
	// deadline however many orders arrive meanwhile.
	k := newClocked(t, Config{Clip: true, Stage: 0, Stages: 2, MicroBatches: 1, Steps: 10, StartTimeout: 30 * 1e9})
	k.step(1e9)
	k.must(Done{})
	dl := k.c.Deadline()
	for i := range 3 {
		k.advance(dl / 3)
		if _, err := k.c.Handle(CheckpointAt{Step: 5 + i}); err != nil {
			t.Fatal(err)
		}
	}
	if _, ok := stalledIn(k.advance(200 * 1e6)); !ok {
		t.Fatal("not stalled: the launcher's orders were taken for the neighbour's liveness")
	}
}

func TestOuterStepsUnderAnyDeliveryOrderApplyEachAllReduceOnceInOrder(t *testing.T) {
	// 3 stages, 2 fragments, H = 4, 7 steps, all-reduces finishing at random points:
	// fragment 0 after 2 (applied after 3), fragment 1 after 4 (applied after 5),
	// fragment 0 after 6 (applied after 7), and both after 7, waited for.
	var cfgs []Config
	for s := range 3 {
		cfgs = append(cfgs, Config{Clip: true, Stage: s, Stages: 3, MicroBatches: 2, Steps: 7, EvalInterval: 3, EvalBatches: 1, Outer: streaming(7)})
	}
	want := acts{StepDone{Step: 1},
		StartReduce{Step: 2, Frags: []int{0}, Overlap: true}, StepDone{Step: 2},
		ApplyOuter{Step: 2, Overlapped: true}, OuterDone{Step: 3}, StepDone{Step: 3},
		StartReduce{Step: 4, Frags: []int{1}, Overlap: true}, StepDone{Step: 4},
		ApplyOuter{Step: 4, Overlapped: true}, OuterDone{Step: 5}, StepDone{Step: 5},
		StartReduce{Step: 6, Frags: []int{0}, Overlap: true}, StepDone{Step: 6},
		ApplyOuter{Step: 6, Overlapped: true}, StartReduce{Step: 7, Frags: []int{0, 1}}, ApplyOuter{Step: 7}, OuterDone{Step: 7}, StepDone{Step: 7}}
	for seed := range uint64(40) {
		for s, log := range simulate(t, cfgs, seed) {
			var got acts
			for _, a := range log {
				switch a.(type) {
				case StartReduce, ApplyOuter, OuterDone, StepDone:
					got = append(got, a)
				}
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("seed %d stage %d:\n got  %v\n want %v", seed, s, got, want)
			}
		}
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
