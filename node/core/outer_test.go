package core

import (
	"errors"
	"reflect"
	"testing"
)

func everyOther(_, step int) bool { return step%2 == 0 }

func TestOuterStepFollowsTheOptimiserStepAndPrecedesEvaluation(t *testing.T) {
	// The last of 2 stages, one micro-batch, outer steps after even steps, evaluation
	// after step 2: the outer step comes between the optimiser step and the
	// evaluation, and the next step's input waits for it.
	c := mustNew(t, Config{Clip: true, Stage: 1, Stages: 2, MicroBatches: 1, Steps: 3, EvalInterval: 2, EvalBatches: 1,
		Outer: &Outer{Fragments: 1, Due: everyOther}})
	script(t, c,
		[2]any{Start{}, nil},
		[2]any{ActivationIn{1, 0}, acts{Forward{Step: 1, Micro: 0, Slot: 0}}},
		[2]any{Done{}, acts{Backward{Step: 1, Micro: 0, Slot: 0, Send: true}}},
		[2]any{Done{}, acts{ShareNorm{Step: 1}}},
		[2]any{NormIn{Step: 1, Stage: 1, SumSq: 1}, nil},
		[2]any{NormIn{Step: 1, Stage: 0, SumSq: 0}, acts{Optimize{Step: 1, Norm: 1, Clip: true}}},
		[2]any{Done{}, acts{StepDone{Step: 1}}}, // step 1: no outer step
		[2]any{ActivationIn{2, 0}, acts{Forward{Step: 2, Micro: 0, Slot: 0}}},
		[2]any{Done{}, acts{Backward{Step: 2, Micro: 0, Slot: 0, Send: true}}},
		[2]any{Done{}, acts{ShareNorm{Step: 2}}},
		[2]any{NormIn{Step: 2, Stage: 1, SumSq: 1}, nil},
		[2]any{NormIn{Step: 2, Stage: 0, SumSq: 0}, acts{Optimize{Step: 2, Norm: 1, Clip: true}}},
		[2]any{Done{}, acts{StartReduce{Step: 2, Frags: []int{0}}}},
		[2]any{EvalIn{2, 0}, nil},       // evaluation waits for the outer step
		[2]any{ActivationIn{3, 0}, nil}, // and so does the next step
		[2]any{ReduceDone{Step: 2}, acts{ApplyOuter{Step: 2}}},
		[2]any{Done{}, acts{OuterDone{Step: 2}, StepDone{Step: 2}, EvalForward{Step: 2, Batch: 0}}},
		[2]any{Done{}, acts{EvalDone{Step: 2}, Forward{Step: 3, Micro: 0, Slot: 0}}},
	)
}

// streaming is Streaming DiLoCo's schedule for 2 fragments over H = 4 inner steps:
// fragment 0 after steps 2, 6, ..., fragment 1 after 4, 8, ..., both after the last.
func streaming(steps int) *Outer {
	return &Outer{Fragments: 2, Overlap: true, Due: func(f, step int) bool {
		return step == steps || step%4 == (f+1)*4/2%4
	}}
}

// single runs one stage alone (one micro-batch, no clipping) through step s's
// forward, backward and optimiser step, checking each asks for the next.
func single(t *testing.T, c *Core, s int) []Action {
	t.Helper()
	out := must(t, c, Done{}) // the forward: the backward comes next
	if !reflect.DeepEqual(out, acts{Backward{Step: s, Micro: 0, Slot: 0}}) {
		t.Fatalf("step %d: after the forward %v", s, out)
	}
	if out := must(t, c, Done{}); !reflect.DeepEqual(out, acts{Optimize{Step: s}}) {
		t.Fatalf("step %d: after the backward %v", s, out)
	}
	return must(t, c, Done{})
}

func must(t *testing.T, c *Core, e Event) []Action {
	t.Helper()
	out, err := c.Handle(e)
	if err != nil {
		t.Fatalf("%T%+v: %v", e, e, err)
	}
	return out
}

func TestOverlappedOuterStepIsAppliedAfterTheNextStep(t *testing.T) {
	// One stage, 2 fragments, H = 4, 6 steps: fragment 0's all-reduce begins after
	// step 2 and is applied after step 3 (the stage goes on meanwhile); fragment 1's
	// after step 4, applied after 5; at the last step, 6, both are due and the stage
	// waits for them (a run ends on global weights), after applying fragment 0's from
	// step... none: step 5 began nothing.
	c := mustNew(t, Config{Stages: 1, MicroBatches: 1, Steps: 6, Outer: streaming(6)})
	if out := must(t, c, Start{}); !reflect.DeepEqual(out, acts{Forward{Step: 1, Micro: 0, Slot: 0}}) {
		t.Fatalf("start: %v", out)
	}
	next := func(s int) Action { return Forward{Step: s, Micro: 0, Slot: 0} }
	if out := single(t, c, 1); !reflect.DeepEqual(out, acts{StepDone{Step: 1}, next(2)}) {
		t.Fatalf("step 1: %v", out)
	}
	if out := single(t, c, 2); !reflect.DeepEqual(out, acts{StartReduce{Step: 2, Frags: []int{0}, Overlap: true}, StepDone{Step: 2}, next(3)}) {
		t.Fatalf("step 2: %v", out)
	}
	// The all-reduce is over while step 3 computes: nothing to do until step 3 is.
	if out := must(t, c, ReduceDone{Step: 2}); len(out) > 0 {
		t.Fatalf("all-reduce done mid-step: %v", out)
	}
	if out := single(t, c, 3); !reflect.DeepEqual(out, acts{ApplyOuter{Step: 2, Overlapped: true}}) {
		t.Fatalf("step 3: %v", out)
	}
	if out := must(t, c, Done{}); !reflect.DeepEqual(out, acts{OuterDone{Step: 3}, StepDone{Step: 3}, next(4)}) {
		t.Fatalf("step 3's outer step applied: %v", out)
	}
	if out := single(t, c, 4); !reflect.DeepEqual(out, acts{StartReduce{Step: 4, Frags: []int{1}, Overlap: true}, StepDone{Step: 4}, next(5)}) {
		t.Fatalf("step 4: %v", out)
	}
	// Step 5 ends before step 4's all-reduce: the stage waits for it.
	if out := single(t, c, 5); len(out) > 0 {
		t.Fatalf("step 5 with step 4's all-reduce under way: %v", out)
	}
	if c.Waiting() != WaitSync || !c.Stepping() {
		t.Fatalf("waiting %v, stepping %v; want the outer step", c.Waiting(), c.Stepping())
	}
	if out := must(t, c, ReduceDone{Step: 4}); !reflect.DeepEqual(out, acts{ApplyOuter{Step: 4, Overlapped: true}}) {
		t.Fatalf("step 4's all-reduce done: %v", out)
	}
	if out := must(t, c, Done{}); !reflect.DeepEqual(out, acts{OuterDone{Step: 5}, StepDone{Step: 5}, next(6)}) {
		t.Fatalf("step 5's outer step applied: %v", out)
	}
	// The last step: every fragment, not overlapped.
	if out := single(t, c, 6); !reflect.DeepEqual(out, acts{StartReduce{Step: 6, Frags: []int{0, 1}}}) {
		t.Fatalf("step 6: %v", out)
	}
	if out := must(t, c, ReduceDone{Step: 6}); !reflect.DeepEqual(out, acts{ApplyOuter{Step: 6}}) {
		t.Fatalf("step 6's all-reduce done: %v", out)
	}
	if out := must(t, c, Done{}); !reflect.DeepEqual(out, acts{OuterDone{Step: 6}, StepDone{Step: 6}, Finished{}}) {
		t.Fatalf("the end: %v", out)
	}
}

func TestOverlappedStepBeforeTheLastIsAppliedThenTheLastWaited(t *testing.T) {
	// 2 fragments, H = 4, 5 steps: fragment 1's all-reduce begun after step 4 is
	// applied first after step 5, then every fragment's blocking one: one outer step.
	c := mustNew(t, Config{Stages: 1, MicroBatches: 1, Steps: 5, From: 3, Outer: streaming(5)})
	must(t, c, Start{})
	if out := single(t, c, 4); !reflect.DeepEqual(out, acts{StartReduce{Step: 4, Frags: []int{1}, Overlap: true}, StepDone{Step: 4}, Forward{Step: 5, Micro: 0, Slot: 0}}) {
		t.Fatalf("step 4: %v", out)
	}
	must(t, c, ReduceDone{Step: 4})
	if out := single(t, c, 5); !reflect.DeepEqual(out, acts{ApplyOuter{Step: 4, Overlapped: true}}) {
		t.Fatalf("step 5: %v", out)
	}
	if out := must(t, c, Done{}); !reflect.DeepEqual(out, acts{StartReduce{Step: 5, Frags: []int{0, 1}}}) {
		t.Fatalf("step 5, overlapped one applied: %v", out)
	}
	if out := must(t, c, ReduceDone{Step: 5}); !reflect.DeepEqual(out, acts{ApplyOuter{Step: 5}}) {
		t.Fatalf("step 5's all-reduce done: %v", out)
	}
	if out := must(t, c, Done{}); !reflect.DeepEqual(out, acts{OuterDone{Step: 5}, StepDone{Step: 5}, Finished{}}) {
		t.Fatalf("the end: %v", out)
	}
}

func TestReduceDoneOutOfTurnIsAProtocolError(t *testing.T) {
	c := mustNew(t, Config{Clip: true, Stage: 0, Stages: 1, MicroBatches: 1, Steps: 2, Outer: &Outer{Fragments: 1, Due: func(int, int) bool { return true }}})
	must(t, c, Start{})
	if _, err := c.Handle(ReduceDone{Step: 1}); !errors.Is(err, ErrProtocol) {
		t.Errorf("ReduceDone while training: error %v, want ErrProtocol", err)
	}
	for _, e := range []Event{Done{}, Done{}, NormIn{Step: 1, Stage: 0}, Done{}, ReduceDone{Step: 1}} {
		must(t, c, e)
	}
	if _, err := c.Handle(ReduceDone{Step: 1}); !errors.Is(err, ErrProtocol) {
		t.Errorf("ReduceDone twice: error %v, want ErrProtocol", err)
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

func TestAppliedIsWhereTheCoreTakesItsOuterSteps(t *testing.T) {
	warm := &Outer{Fragments: 2, Overlap: true, Due: func(f, step int) bool { return step <= 2 || step%4 == (f+1)*4/2%4 }}
	for name, tc := range map[string]struct {
		o     *Outer
		steps int
	}{
		"streaming, 7 steps":   {streaming(7), 7},
		"streaming, 8 steps":   {streaming(8), 8},
		"one fragment":         {&Outer{Fragments: 1, Due: everyOther}, 7},
		"streaming and warmup": {warm, 9},
	} {
		c := mustNew(t, Config{Stages: 1, MicroBatches: 1, Steps: tc.steps, Outer: tc.o})
		queue := []Event{Start{}}
		var took []int
		for len(queue) > 0 {
			out := must(t, c, queue[0])
			queue = queue[1:]
			for _, a := range out {
				switch a := a.(type) {
				case Forward, Backward, Optimize, ApplyOuter:
					queue = append(queue, Done{})
				case StartReduce:
					queue = append(queue, ReduceDone{Step: a.Step})
				case OuterDone:
					took = append(took, a.Step)
				}
			}
		}
		var want []int
		for s := 1; s <= tc.steps; s++ {
			if tc.o.Applied(s, tc.steps) {
				want = append(want, s)
			}
		}
		if !c.Finished() || !reflect.DeepEqual(took, want) {
			t.Errorf("%s: the core took outer steps after %v (finished %v); Applied says %v", name, took, c.Finished(), want)
		}
	}
}

func TestResumedCoreBeginsTheOverlappedAllReduceUnderWayAgain(t *testing.T) {
	// Resumed after step 4, whose fragment-1 all-reduce was under way: it is begun
	// again first and applied after step 5, as the uninterrupted run applies it.
	c := mustNew(t, Config{Stages: 1, MicroBatches: 1, Steps: 7, From: 4, Outer: streaming(7)})
	if out := must(t, c, Start{}); !reflect.DeepEqual(out, acts{StartReduce{Step: 4, Frags: []int{1}, Overlap: true}, Forward{Step: 5, Micro: 0, Slot: 0}}) {
		t.Fatalf("start: %v", out)
	}
	must(t, c, ReduceDone{Step: 4})
	if out := single(t, c, 5); !reflect.DeepEqual(out, acts{ApplyOuter{Step: 4, Overlapped: true}}) {
		t.Fatalf("step 5: %v", out)
	}
	// After step 5 nothing was under way: a run resumed there begins nothing.
	c = mustNew(t, Config{Stages: 1, MicroBatches: 1, Steps: 7, From: 5, Outer: streaming(7)})
	if out := must(t, c, Start{}); !reflect.DeepEqual(out, acts{Forward{Step: 6, Micro: 0, Slot: 0}}) {
		t.Fatalf("start after step 5: %v", out)
	}
}
