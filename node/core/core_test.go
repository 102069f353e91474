package core

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"testing"
	"time"
)

func mustNew(t *testing.T, c Config) *Core {
	t.Helper()
	k, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// script feeds events one by one and checks the actions each returns.
func script(t *testing.T, c *Core, steps ...[2]any) {
	t.Helper()
	for i, s := range steps {
		got, err := c.Handle(s[0])
		if err != nil {
			t.Fatalf("event %d %#v: %v", i, s[0], err)
		}
		var want []any
		if s[1] != nil {
			want = s[1].([]any)
		}
		if len(got) == 0 && len(want) == 0 {
			continue
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("event %d %#v:\n got  %#v\n want %#v", i, s[0], got, want)
		}
	}
}

type acts = []any

func TestMiddleStageRunsOneForwardOneBackward(t *testing.T) {
	// Stage 1 of 3 with 3 micro-batches holds at most 2 forwards in flight.
	c := mustNew(t, Config{Stage: 1, Stages: 3, MicroBatches: 3, Steps: 1})
	script(t, c,
		[2]any{Start{}, nil},
		[2]any{ActivationIn{1, 0}, acts{Forward{Step: 1, Micro: 0, Slot: 0, Send: true}}},
		[2]any{ActivationIn{1, 1}, nil}, // compute busy: queued
		[2]any{Done{}, acts{Forward{Step: 1, Micro: 1, Slot: 1, Send: true}}},
		[2]any{ActivationIn{1, 2}, nil},
		[2]any{Done{}, nil}, // two in flight: micro 2 waits for a backward
		[2]any{GradientIn{1, 0}, acts{Backward{Step: 1, Micro: 0, Slot: 0, Send: true}}},
		[2]any{Done{}, acts{Forward{Step: 1, Micro: 2, Slot: 0, Send: true}}},
		[2]any{GradientIn{1, 1}, nil},
		[2]any{Done{}, acts{Backward{Step: 1, Micro: 1, Slot: 1, Send: true}}},
		[2]any{Done{}, nil},
		[2]any{GradientIn{1, 2}, acts{Backward{Step: 1, Micro: 2, Slot: 0, Send: true}}},
		[2]any{NormIn{Step: 1, Stage: 2, SumSq: 4}, nil}, // a peer's norm may come early
		[2]any{Done{}, acts{ShareNorm{Step: 1}}},
		[2]any{NormIn{Step: 1, Stage: 1, SumSq: 9}, nil},
		[2]any{NormIn{Step: 1, Stage: 0, SumSq: 12}, acts{Optimize{Step: 1, Norm: 5}}},
		[2]any{Done{}, acts{StepDone{Step: 1}, Finished{}}},
	)
	if !c.Finished() {
		t.Fatal("not finished after the last step")
	}
}

func TestLastStageRunsBackwardRightAfterForward(t *testing.T) {
	c := mustNew(t, Config{Stage: 1, Stages: 2, MicroBatches: 2, Steps: 2, EvalInterval: 1, EvalBatches: 2})
	script(t, c,
		[2]any{Start{}, nil},
		[2]any{ActivationIn{1, 0}, acts{Forward{Step: 1, Micro: 0, Slot: 0}}},
		[2]any{Done{}, acts{Backward{Step: 1, Micro: 0, Slot: 0, Send: true}}},
		[2]any{Done{}, nil},
		[2]any{ActivationIn{1, 1}, acts{Forward{Step: 1, Micro: 1, Slot: 0}}},
		[2]any{Done{}, acts{Backward{Step: 1, Micro: 1, Slot: 0, Send: true}}},
		[2]any{Done{}, acts{ShareNorm{Step: 1}}},
		[2]any{NormIn{Step: 1, Stage: 1, SumSq: 1}, nil},
		[2]any{NormIn{Step: 1, Stage: 0, SumSq: 3}, acts{Optimize{Step: 1, Norm: 2}}},
		[2]any{EvalIn{1, 0}, nil}, // evaluation waits for this stage's optimiser step
		[2]any{Done{}, acts{StepDone{Step: 1}, EvalForward{Step: 1, Batch: 0}}},
		[2]any{ActivationIn{2, 0}, nil}, // next step's input waits for the evaluation
		[2]any{Done{}, nil},
		[2]any{EvalIn{1, 1}, acts{EvalForward{Step: 1, Batch: 1}}},
		[2]any{Done{}, acts{EvalDone{Step: 1}, Forward{Step: 2, Micro: 0, Slot: 0}}},
	)
}

func TestFirstStageNeedsNoInputAndSendsNoGradient(t *testing.T) {
	c := mustNew(t, Config{Stage: 0, Stages: 2, MicroBatches: 3, Steps: 1})
	script(t, c,
		[2]any{Start{}, acts{Forward{Step: 1, Micro: 0, Slot: 0, Send: true}}},
		[2]any{Done{}, acts{Forward{Step: 1, Micro: 1, Slot: 1, Send: true}}},
		[2]any{Done{}, nil}, // bound of 2 in flight reached
		[2]any{GradientIn{1, 0}, acts{Backward{Step: 1, Micro: 0, Slot: 0}}},
	)
}

func TestBadEventsAreProtocolErrors(t *testing.T) {
	cases := map[string]struct {
		cfg    Config
		events []any
	}{
		"activation to stage 0":     {Config{Stage: 0, Stages: 2, MicroBatches: 1, Steps: 1}, []any{Start{}, ActivationIn{1, 0}}},
		"gradient to last stage":    {Config{Stage: 1, Stages: 2, MicroBatches: 1, Steps: 1}, []any{Start{}, GradientIn{1, 0}}},
		"micro-batch out of range":  {Config{Stage: 1, Stages: 2, MicroBatches: 2, Steps: 1}, []any{Start{}, ActivationIn{1, 2}}},
		"step beyond the run":       {Config{Stage: 1, Stages: 2, MicroBatches: 2, Steps: 1}, []any{Start{}, ActivationIn{2, 0}}},
		"duplicate activation":      {Config{Stage: 1, Stages: 3, MicroBatches: 2, Steps: 1}, []any{Start{}, ActivationIn{1, 0}, ActivationIn{1, 0}}},
		"gradient never sent":       {Config{Stage: 0, Stages: 2, MicroBatches: 2, Steps: 1}, []any{Start{}, GradientIn{1, 1}}},
		"norm from unknown stage":   {Config{Stage: 0, Stages: 2, MicroBatches: 2, Steps: 1}, []any{Start{}, NormIn{Step: 1, Stage: 5}}},
		"duplicate norm":            {Config{Stage: 0, Stages: 2, MicroBatches: 2, Steps: 1}, []any{Start{}, NormIn{Step: 1, Stage: 1}, NormIn{Step: 1, Stage: 1}}},
		"done with nothing running": {Config{Stage: 1, Stages: 2, MicroBatches: 1, Steps: 1}, []any{Start{}, Done{}}},
		"eval on a non-eval step":   {Config{Stage: 1, Stages: 2, MicroBatches: 1, Steps: 3, EvalBatches: 1}, []any{Start{}, EvalIn{1, 0}}},
		"unknown event":             {Config{Stage: 1, Stages: 2, MicroBatches: 1, Steps: 1}, []any{Start{}, "hello"}},
	}
	for name, tc := range cases {
		c := mustNew(t, tc.cfg)
		var err error
		for _, e := range tc.events {
			if _, err = c.Handle(e); err != nil {
				break
			}
		}
		if !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: err = %v, want ErrProtocol", name, err)
		}
	}
}

// simulate connects the stages of a run through per-link FIFO queues and delivers
// events in a random order (as concurrent peers would), carrying out actions the way
// the daemon does. It returns each stage's actions.
func simulate(t *testing.T, cfgs []Config, seed uint64) [][]any {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 1))
	n := len(cfgs)
	cores := make([]*Core, n)
	queues := make([][]any, n) // events waiting for each stage, FIFO
	log := make([][]any, n)
	for i, c := range cfgs {
		cores[i] = mustNew(t, c)
		queues[i] = append(queues[i], Start{})
	}
	inflight := make([]int, n)
	for guard := 0; guard < 1_000_000; guard++ {
		var ready []int
		for i := range queues {
			if len(queues[i]) > 0 {
				ready = append(ready, i)
			}
		}
		if len(ready) == 0 {
			break
		}
		i := ready[rng.IntN(len(ready))]
		e := queues[i][0]
		queues[i] = queues[i][1:]
		out, err := cores[i].Handle(e)
		if err != nil {
			t.Fatalf("seed %d stage %d event %#v: %v", seed, i, e, err)
		}
		for _, a := range out {
			log[i] = append(log[i], a)
			switch a := a.(type) {
			case Forward:
				inflight[i]++
				if inflight[i] > cfgs[i].Slots() {
					t.Fatalf("stage %d holds %d forwards, bound %d", i, inflight[i], cfgs[i].Slots())
				}
				if a.Send {
					queues[i+1] = append(queues[i+1], ActivationIn{a.Step, a.Micro})
				}
				queues[i] = append(queues[i], Done{})
			case Backward:
				inflight[i]--
				if a.Send {
					queues[i-1] = append(queues[i-1], GradientIn{a.Step, a.Micro})
				}
				queues[i] = append(queues[i], Done{})
			case ShareNorm:
				for j := range n {
					queues[j] = append(queues[j], NormIn{Step: a.Step, Stage: i, SumSq: float64(i + a.Step)})
				}
			case Optimize, EvalForward:
				if ef, ok := a.(EvalForward); ok && ef.Send {
					queues[i+1] = append(queues[i+1], EvalIn{ef.Step, ef.Batch})
				}
				queues[i] = append(queues[i], Done{})
			}
		}
	}
	for i, c := range cores {
		if !c.Finished() {
			t.Fatalf("seed %d: stage %d stuck at step %d", seed, i, c.Step())
		}
	}
	return log
}

func TestPipelineRunsToCompletionUnderAnyDeliveryOrder(t *testing.T) {
	const stages, micro, steps, evalBatches = 4, 5, 4, 3
	var cfgs []Config
	for s := range stages {
		cfgs = append(cfgs, Config{Stage: s, Stages: stages, MicroBatches: micro, Steps: steps, EvalInterval: 2, EvalBatches: evalBatches})
	}
	for seed := range uint64(50) {
		log := simulate(t, cfgs, seed)
		for s, acts := range log {
			count := map[string]int{}
			var norms []float64
			for _, a := range acts {
				count[fmt.Sprintf("%T", a)]++
				if o, ok := a.(Optimize); ok {
					norms = append(norms, o.Norm)
				}
			}
			want := map[string]int{"core.Forward": steps * micro, "core.Backward": steps * micro, "core.Optimize": steps,
				"core.EvalForward": 2 * evalBatches, "core.StepDone": steps, "core.EvalDone": 2, "core.ShareNorm": steps, "core.Finished": 1}
			for k, v := range want {
				if count[k] != v {
					t.Fatalf("seed %d stage %d: %d × %s, want %d", seed, s, count[k], k, v)
				}
			}
			for step, nrm := range norms {
				var ss float64
				for j := range stages {
					ss += float64(j + step + 1)
				}
				if nrm != sqrt(ss) {
					t.Fatalf("seed %d stage %d step %d: clipped by norm %g, want the global %g", seed, s, step+1, nrm, sqrt(ss))
				}
			}
		}
	}
}

func TestEveryForwardInFlightKeepsBackwardsInMicroBatchOrder(t *testing.T) {
	// pipeline.in_flight = micro_batches: forwards never wait for a gradient, and the
	// backwards still come in micro-batch order, so gradients add up in the order the
	// single-process trainer adds them.
	const stages, micro, steps = 4, 6, 3
	var cfgs []Config
	for s := range stages {
		cfgs = append(cfgs, Config{Stage: s, Stages: stages, MicroBatches: micro, MaxInFlight: micro, Steps: steps})
	}
	if got := cfgs[1].Slots(); got != micro {
		t.Fatalf("slots %d, want %d", got, micro)
	}
	for seed := range uint64(30) {
		for s, acts := range simulate(t, cfgs, seed) {
			next, step := 0, 1
			for _, a := range acts {
				if b, ok := a.(Backward); ok {
					if b.Step != step || b.Micro != next {
						t.Fatalf("seed %d stage %d: backward of step %d micro %d, want step %d micro %d", seed, s, b.Step, b.Micro, step, next)
					}
					if next++; next == micro {
						next, step = 0, step+1
					}
				}
			}
			if step != steps+1 {
				t.Fatalf("seed %d stage %d: ran %d steps of backwards", seed, s, step-1)
			}
		}
	}
}

func TestSameEventsSameActions(t *testing.T) {
	var cfgs []Config
	for s := range 3 {
		cfgs = append(cfgs, Config{Stage: s, Stages: 3, MicroBatches: 4, Steps: 3, EvalBatches: 2})
	}
	a, b := simulate(t, cfgs, 7), simulate(t, cfgs, 7)
	if !reflect.DeepEqual(a, b) {
		t.Fatal("the same delivery order gave different actions")
	}
}

func TestOuterStepFollowsTheOptimiserStepAndPrecedesEvaluation(t *testing.T) {
	// The last of 2 stages, one micro-batch, outer steps after even steps, evaluation
	// after step 2: the sync comes between the optimiser step and the evaluation, and
	// the next step's input waits for it.
	c := mustNew(t, Config{Stage: 1, Stages: 2, MicroBatches: 1, Steps: 3, EvalInterval: 2, EvalBatches: 1,
		OuterDue: func(step int) bool { return step%2 == 0 }})
	script(t, c,
		[2]any{Start{}, nil},
		[2]any{ActivationIn{1, 0}, acts{Forward{Step: 1, Micro: 0, Slot: 0}}},
		[2]any{Done{}, acts{Backward{Step: 1, Micro: 0, Slot: 0, Send: true}}},
		[2]any{Done{}, acts{ShareNorm{Step: 1}}},
		[2]any{NormIn{Step: 1, Stage: 1, SumSq: 1}, nil},
		[2]any{NormIn{Step: 1, Stage: 0, SumSq: 0}, acts{Optimize{Step: 1, Norm: 1}}},
		[2]any{Done{}, acts{StepDone{Step: 1}}}, // step 1: no outer step
		[2]any{ActivationIn{2, 0}, acts{Forward{Step: 2, Micro: 0, Slot: 0}}},
		[2]any{Done{}, acts{Backward{Step: 2, Micro: 0, Slot: 0, Send: true}}},
		[2]any{Done{}, acts{ShareNorm{Step: 2}}},
		[2]any{NormIn{Step: 2, Stage: 1, SumSq: 1}, nil},
		[2]any{NormIn{Step: 2, Stage: 0, SumSq: 0}, acts{Optimize{Step: 2, Norm: 1}}},
		[2]any{Done{}, acts{Sync{Step: 2}}},
		[2]any{EvalIn{2, 0}, nil},       // evaluation waits for the outer step
		[2]any{ActivationIn{3, 0}, nil}, // and so does the next step
		[2]any{Synced{Step: 2}, acts{StepDone{Step: 2}, EvalForward{Step: 2, Batch: 0}}},
		[2]any{Done{}, acts{EvalDone{Step: 2}, Forward{Step: 3, Micro: 0, Slot: 0}}},
	)
}

func TestSyncedOutOfTurnIsAProtocolError(t *testing.T) {
	c := mustNew(t, Config{Stage: 0, Stages: 1, MicroBatches: 1, Steps: 2, OuterDue: func(int) bool { return true }})
	if _, err := c.Handle(Start{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Handle(Synced{Step: 1}); !errors.Is(err, ErrProtocol) {
		t.Errorf("Synced while training: error %v, want ErrProtocol", err)
	}
}

func TestWaitingNamesWhatAnIdleStageNeeds(t *testing.T) {
	cfg := Config{Stage: 1, Stages: 3, MicroBatches: 2, Steps: 1}
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Waiting(); got != Stopped {
		t.Fatalf("before start: %v", got)
	}
	mustHandle(t, c, Start{})
	if got := c.Waiting(); got != WaitActivation {
		t.Fatalf("middle stage at start: %v, want activation", got)
	}
	mustHandle(t, c, ActivationIn{Step: 1, Micro: 0})
	if got := c.Waiting(); got != Computing {
		t.Fatalf("forward out: %v", got)
	}
	mustHandle(t, c, Done{})
	mustHandle(t, c, ActivationIn{Step: 1, Micro: 1})
	mustHandle(t, c, Done{}) // second forward; both now wait for gradients (bound 2)
	if got := c.Waiting(); got != WaitGradient {
		t.Fatalf("two in flight: %v, want gradient", got)
	}
	for m := range 2 {
		mustHandle(t, c, GradientIn{Step: 1, Micro: m})
		mustHandle(t, c, Done{})
	}
	if got := c.Waiting(); got != WaitNorm {
		t.Fatalf("after the backwards: %v, want norm", got)
	}
}

func TestLedgerSumsTimePerStateAndKeepsTheWindow(t *testing.T) {
	var l Ledger
	l.Window.Lo, l.Window.Hi = 2, 2
	l.Mark(1*time.Second, WaitActivation, 1) // nothing counted before the first mark
	l.Mark(3*time.Second, Computing, 2)
	l.Mark(4*time.Second, Computing, 2) // same state: one span
	l.Mark(6*time.Second, WaitNorm, 2)
	l.Mark(7*time.Second, Stopped, 3)
	if l.Total[WaitActivation] != 2*time.Second || l.Total[Computing] != 3*time.Second || l.Total[WaitNorm] != time.Second {
		t.Fatalf("totals %v", l.Total)
	}
	want := []Span{{2, Computing, 3 * time.Second, 6 * time.Second}, {2, WaitNorm, 6 * time.Second, 7 * time.Second}}
	if !reflect.DeepEqual(l.Spans, want) {
		t.Fatalf("spans %+v, want %+v", l.Spans, want)
	}
}

func mustHandle(t *testing.T, c *Core, e any) {
	t.Helper()
	if _, err := c.Handle(e); err != nil {
		t.Fatalf("%T%+v: %v", e, e, err)
	}
}

func TestResumedCoreBeginsAfterItsLastStepAndRunsTheRest(t *testing.T) {
	const stages, micro, steps, from = 3, 2, 5, 3
	var cfgs []Config
	for s := range stages {
		cfgs = append(cfgs, Config{Stage: s, Stages: stages, MicroBatches: micro, Steps: steps, From: from, EvalInterval: 2, EvalBatches: 1})
	}
	log := simulate(t, cfgs, 1)
	for s, acts := range log {
		var done []int
		for _, a := range acts {
			if d, ok := a.(StepDone); ok {
				done = append(done, d.Step)
			}
		}
		if !reflect.DeepEqual(done, []int{4, 5}) {
			t.Errorf("stage %d finished steps %v, want [4 5]", s, done)
		}
	}
	if _, err := New(Config{Stages: 1, MicroBatches: 1, Steps: 3, From: 3}); err == nil {
		t.Error("a core resuming after its last step was accepted")
	}
}

func TestSteppingFromNormSharedUntilTheStepIsDone(t *testing.T) {
	c := mustNew(t, Config{Stage: 0, Stages: 2, MicroBatches: 1, Steps: 2})
	script(t, c,
		[2]any{Start{}, acts{Forward{Step: 1, Micro: 0, Slot: 0, Send: true}}},
		[2]any{Done{}, nil},
		[2]any{GradientIn{Step: 1, Micro: 0}, acts{Backward{Step: 1, Micro: 0, Slot: 0}}},
	)
	if c.Stepping() {
		t.Fatal("stepping before the norm is shared")
	}
	script(t, c, [2]any{Done{}, acts{ShareNorm{Step: 1}}})
	if !c.Stepping() {
		t.Fatal("not stepping once the norm is shared")
	}
	script(t, c,
		[2]any{NormIn{Step: 1, Stage: 0, SumSq: 1}, nil},
		[2]any{NormIn{Step: 1, Stage: 1, SumSq: 3}, acts{Optimize{Step: 1, Norm: 2}}},
	)
	if !c.Stepping() {
		t.Fatal("not stepping while the optimiser runs")
	}
	script(t, c, [2]any{Done{}, acts{StepDone{Step: 1}, Forward{Step: 2, Micro: 0, Slot: 0, Send: true}}})
	if c.Stepping() {
		t.Fatal("stepping after the step is done")
	}
}
