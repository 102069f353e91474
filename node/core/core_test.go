package core

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/p2p/clock"
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
		got, err := c.Handle(s[0].(Event))
		if err != nil {
			t.Fatalf("event %d %#v: %v", i, s[0], err)
		}
		var want []Action
		if s[1] != nil {
			want = s[1].([]Action)
		}
		if len(got) == 0 && len(want) == 0 {
			continue
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("event %d %#v:\n got  %#v\n want %#v", i, s[0], got, want)
		}
	}
}

type acts = []Action

func TestMiddleStageRunsOneForwardOneBackward(t *testing.T) {
	// Stage 1 of 3 with 3 micro-batches holds at most 2 forwards in flight.
	c := mustNew(t, Config{Clip: true, Stage: 1, Stages: 3, MicroBatches: 3, Steps: 1})
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
		[2]any{NormIn{Step: 1, Stage: 0, SumSq: 12}, acts{Optimize{Step: 1, Norm: 5, Clip: true}}},
		[2]any{Done{}, acts{StepDone{Step: 1}, Finished{}}},
	)
	if !c.Finished() {
		t.Fatal("not finished after the last step")
	}
}

func TestLastStageRunsBackwardRightAfterForward(t *testing.T) {
	c := mustNew(t, Config{Clip: true, Stage: 1, Stages: 2, MicroBatches: 2, Steps: 2, EvalInterval: 1, EvalBatches: 2})
	script(t, c,
		[2]any{Start{}, nil},
		[2]any{ActivationIn{1, 0}, acts{Forward{Step: 1, Micro: 0, Slot: 0}}},
		[2]any{Done{}, acts{Backward{Step: 1, Micro: 0, Slot: 0, Send: true}}},
		[2]any{Done{}, nil},
		[2]any{ActivationIn{1, 1}, acts{Forward{Step: 1, Micro: 1, Slot: 0}}},
		[2]any{Done{}, acts{Backward{Step: 1, Micro: 1, Slot: 0, Send: true}}},
		[2]any{Done{}, acts{ShareNorm{Step: 1}}},
		[2]any{NormIn{Step: 1, Stage: 1, SumSq: 1}, nil},
		[2]any{NormIn{Step: 1, Stage: 0, SumSq: 3}, acts{Optimize{Step: 1, Norm: 2, Clip: true}}},
		[2]any{EvalIn{1, 0}, nil}, // evaluation waits for this stage's optimiser step
		[2]any{Done{}, acts{StepDone{Step: 1}, EvalForward{Step: 1, Batch: 0}}},
		[2]any{ActivationIn{2, 0}, nil}, // next step's input waits for the evaluation
		[2]any{Done{}, nil},
		[2]any{EvalIn{1, 1}, acts{EvalForward{Step: 1, Batch: 1}}},
		[2]any{Done{}, acts{EvalDone{Step: 1}, Forward{Step: 2, Micro: 0, Slot: 0}}},
	)
}

func TestFirstStageNeedsNoInputAndSendsNoGradient(t *testing.T) {
	c := mustNew(t, Config{Clip: true, Stage: 0, Stages: 2, MicroBatches: 3, Steps: 1})
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
		events []Event
	}{
		"activation to stage 0":            {Config{Clip: true, Stage: 0, Stages: 2, MicroBatches: 1, Steps: 1}, []Event{Start{}, ActivationIn{1, 0}}},
		"gradient to last stage":           {Config{Clip: true, Stage: 1, Stages: 2, MicroBatches: 1, Steps: 1}, []Event{Start{}, GradientIn{1, 0}}},
		"micro-batch out of range":         {Config{Clip: true, Stage: 1, Stages: 2, MicroBatches: 2, Steps: 1}, []Event{Start{}, ActivationIn{1, 2}}},
		"step beyond the run":              {Config{Clip: true, Stage: 1, Stages: 2, MicroBatches: 2, Steps: 1}, []Event{Start{}, ActivationIn{2, 0}}},
		"gradient never sent":              {Config{Clip: true, Stage: 0, Stages: 2, MicroBatches: 2, Steps: 1}, []Event{Start{}, GradientIn{1, 1}}},
		"norm from unknown stage":          {Config{Clip: true, Stage: 0, Stages: 2, MicroBatches: 2, Steps: 1}, []Event{Start{}, NormIn{Step: 1, Stage: 5}}},
		"done with nothing running":        {Config{Clip: true, Stage: 1, Stages: 2, MicroBatches: 1, Steps: 1}, []Event{Start{}, Done{}}},
		"norm in a run that does not clip": {Config{Stage: 0, Stages: 2, MicroBatches: 1, Steps: 1}, []Event{Start{}, NormIn{Step: 1, Stage: 1}}},
		"eval on a non-eval step":          {Config{Clip: true, Stage: 1, Stages: 2, MicroBatches: 1, Steps: 3, EvalBatches: 1}, []Event{Start{}, EvalIn{1, 0}}},
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

func TestDuplicateAndLateEventsAreStaleAndChangeNothing(t *testing.T) {
	cases := map[string]struct {
		cfg    Config
		events []Event
	}{
		"duplicate activation":    {Config{Clip: true, Stage: 1, Stages: 3, MicroBatches: 2, Steps: 2}, []Event{Start{}, ActivationIn{1, 0}, ActivationIn{1, 0}}},
		"activation already used": {Config{Clip: true, Stage: 1, Stages: 3, MicroBatches: 2, Steps: 2}, []Event{Start{}, ActivationIn{1, 0}, Done{}, ActivationIn{1, 0}}},
		"duplicate norm":          {Config{Clip: true, Stage: 0, Stages: 2, MicroBatches: 2, Steps: 1}, []Event{Start{}, NormIn{Step: 1, Stage: 1}, NormIn{Step: 1, Stage: 1}}},
		"duplicate gradient": {Config{Clip: true, Stage: 0, Stages: 2, MicroBatches: 2, Steps: 1},
			[]Event{Start{}, Done{}, GradientIn{1, 0}, GradientIn{1, 0}}},
		"gradient already used": {Config{Clip: true, Stage: 0, Stages: 2, MicroBatches: 2, Steps: 1},
			[]Event{Start{}, Done{}, GradientIn{1, 0}, Done{}, GradientIn{1, 0}}},
	}
	for name, tc := range cases {
		c := mustNew(t, tc.cfg)
		var err error
		for _, e := range tc.events[:len(tc.events)-1] {
			if _, err = c.Handle(e); err != nil {
				t.Fatalf("%s: %#v: %v", name, e, err)
			}
		}
		before := fmt.Sprintf("%+v", *c)
		acts, err := c.Handle(tc.events[len(tc.events)-1])
		if !errors.Is(err, ErrStale) || errors.Is(err, ErrProtocol) || len(acts) > 0 {
			t.Errorf("%s: %v, %v; want ErrStale and no action", name, acts, err)
		}
		if after := fmt.Sprintf("%+v", *c); after != before {
			t.Errorf("%s: the stale event changed the core:\n%s\n%s", name, before, after)
		}
	}
}

// simulate connects the stages of a run through per-link FIFO queues and delivers
// events in a random order (as concurrent peers would), carrying out actions the way
// the daemon does. It returns each stage's actions.
func simulate(t *testing.T, cfgs []Config, seed uint64) [][]Action {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 1))
	n := len(cfgs)
	cores := make([]*Core, n)
	queues := make([][]Event, n) // events waiting for each stage, FIFO
	log := make([][]Action, n)
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
			case StartReduce:
				queues[i] = append(queues[i], ReduceDone{Step: a.Step})
			case Optimize, EvalForward, ApplyOuter:
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
		cfgs = append(cfgs, Config{Clip: true, Stage: s, Stages: stages, MicroBatches: micro, Steps: steps, EvalInterval: 2, EvalBatches: evalBatches})
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
		cfgs = append(cfgs, Config{Clip: true, Stage: s, Stages: stages, MicroBatches: micro, MaxInFlight: micro, Steps: steps})
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
		cfgs = append(cfgs, Config{Clip: true, Stage: s, Stages: 3, MicroBatches: 4, Steps: 3, EvalBatches: 2})
	}
	a, b := simulate(t, cfgs, 7), simulate(t, cfgs, 7)
	if !reflect.DeepEqual(a, b) {
		t.Fatal("the same delivery order gave different actions")
	}
}

func TestWaitingNamesWhatAnIdleStageNeeds(t *testing.T) {
	cfg := Config{Clip: true, Stage: 1, Stages: 3, MicroBatches: 2, Steps: 1}
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
	// Stage 0's backwards come after this stage's: its norm is the pipeline's drain.
	if got := c.Waiting(); got != WaitBubble {
		t.Fatalf("after the backwards, stage 0's norm missing: %v, want bubble", got)
	}
	mustHandle(t, c, NormIn{Step: 1, Stage: 0})
	if got := c.Waiting(); got != WaitNorm {
		t.Fatalf("stage 0's norm in, stage 2's missing: %v, want norm", got)
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

func mustHandle(t *testing.T, c *Core, e Event) {
	t.Helper()
	if _, err := c.Handle(e); err != nil {
		t.Fatalf("%T%+v: %v", e, e, err)
	}
}

func TestResumedCoreBeginsAfterItsLastStepAndRunsTheRest(t *testing.T) {
	const stages, micro, steps, from = 3, 2, 5, 3
	var cfgs []Config
	for s := range stages {
		cfgs = append(cfgs, Config{Clip: true, Stage: s, Stages: stages, MicroBatches: micro, Steps: steps, From: from, EvalInterval: 2, EvalBatches: 1})
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
	if _, err := New(Config{Clip: true, Stages: 1, MicroBatches: 1, Steps: 3, From: 3}); err == nil {
		t.Error("a core resuming after its last step was accepted")
	}
}

// Stages stopped together stop right after a step, before its evaluation: a resumed
// run runs that evaluation first, on every stage, then the next step; after a step
// with no evaluation due it begins the next step at once.
func TestResumedCoreEvaluatesTheStepItContinuesFromFirst(t *testing.T) {
	const stages, micro, steps = 3, 2, 5
	for _, tc := range []struct {
		from  int
		evals []int // the steps evaluated, in order
	}{
		{from: 2, evals: []int{2, 4, 5}},
		{from: 3, evals: []int{4, 5}},
	} {
		var cfgs []Config
		for s := range stages {
			cfgs = append(cfgs, Config{Stage: s, Stages: stages, MicroBatches: micro, Steps: steps, From: tc.from, EvalFrom: true, EvalInterval: 2, EvalBatches: 2})
		}
		log := simulate(t, cfgs, 1)
		for s, acts := range log {
			var evals, done []int
			firstEval, firstForward := -1, -1
			for i, a := range acts {
				switch a := a.(type) {
				case EvalDone:
					evals = append(evals, a.Step)
				case StepDone:
					done = append(done, a.Step)
				case EvalForward:
					if firstEval < 0 {
						firstEval = i
					}
				case Forward:
					if firstForward < 0 {
						firstForward = i
					}
				}
			}
			if !reflect.DeepEqual(evals, tc.evals) {
				t.Errorf("from %d: stage %d evaluated after steps %v, want %v", tc.from, s, evals, tc.evals)
			}
			if want := []int{tc.from + 1, tc.from + 2, tc.from + 3}[:steps-tc.from]; !reflect.DeepEqual(done, want) {
				t.Errorf("from %d: stage %d finished steps %v, want %v", tc.from, s, done, want)
			}
			if tc.from == 2 && !(firstEval >= 0 && firstEval < firstForward) {
				t.Errorf("from %d: stage %d began step %d before evaluating step %d: %v", tc.from, s, tc.from+1, tc.from, acts)
			}
		}
	}
}

func TestSteppingFromNormSharedUntilTheStepIsDone(t *testing.T) {
	c := mustNew(t, Config{Clip: true, Stage: 0, Stages: 2, MicroBatches: 1, Steps: 2})
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
		[2]any{NormIn{Step: 1, Stage: 1, SumSq: 3}, acts{Optimize{Step: 1, Norm: 2, Clip: true}}},
	)
	if !c.Stepping() {
		t.Fatal("not stepping while the optimiser runs")
	}
	script(t, c, [2]any{Done{}, acts{StepDone{Step: 1}, Forward{Step: 2, Micro: 0, Slot: 0, Send: true}}})
	if c.Stepping() {
		t.Fatal("stepping after the step is done")
	}
}

// clocked drives stage 0 of a two-stage run (one micro-batch a step) on a fake clock.
type clocked struct {
	t   *testing.T
	c   *Core
	now time.Duration
	rtt time.Duration
}

func newClocked(t *testing.T, cfg Config) *clocked {
	k := &clocked{t: t, c: mustNew(t, cfg), rtt: 10 * time.Millisecond}
	k.must(Start{})
	return k
}

func (k *clocked) must(e Event) []Action {
	k.t.Helper()
	out, err := k.c.Handle(e)
	if err != nil {
		k.t.Fatalf("%#v: %v", e, err)
	}
	return out
}

// advance moves the clock by d in ticks of 100 ms and returns what the ticks asked for.
func (k *clocked) advance(d time.Duration) []Action {
	var out []Action
	for end := k.now + d; k.now < end; {
		k.now = min(end, k.now+100*time.Millisecond)
		out = append(out, k.must(Tick{Now: k.now, RTT: k.rtt})...)
	}
	return out
}

// step runs the step in progress to its end, taking d in all, half of it waiting for
// the gradient.
func (k *clocked) step(d time.Duration) {
	k.t.Helper()
	s := k.c.Step()
	k.must(Done{}) // the forward
	if out := k.advance(d / 2); len(out) > 0 {
		k.t.Fatalf("step %d: %v while waiting %s for a gradient", s, out, d/2)
	}
	k.must(GradientIn{s, 0})
	k.must(Done{}) // backward: ShareNorm
	k.must(NormIn{Step: s, Stage: 0})
	k.must(NormIn{Step: s, Stage: 1})
	k.advance(d / 2)
	k.must(Done{}) // optimiser
}

func stalledIn(out []Action) (Stalled, bool) {
	for _, a := range out {
		if s, ok := a.(Stalled); ok {
			return s, true
		}
	}
	return Stalled{}, false
}

func TestDeadlineComesFromTheStepTimesMeasured(t *testing.T) {
	k := newClocked(t, Config{Clip: true, Stage: 0, Stages: 2, MicroBatches: 1, Steps: 10, StartTimeout: 30 * time.Second})
	k.advance(100 * time.Millisecond) // the first tick brings the round trip
	if got := k.c.Deadline(); got != 30*time.Second+80*time.Millisecond {
		t.Errorf("before any step: deadline %s, want the start timeout plus 8 round trips", got)
	}
	for range 3 {
		k.step(time.Second)
	}
	// 4 × the mean step (the first took the 100 ms before it too) + 8 × 10 ms + 3 s.
	if got, want := k.c.Deadline(), 4*(3100*time.Millisecond/3)+80*time.Millisecond+clock.Stall; got != want {
		t.Errorf("after three 1 s steps: deadline %s, want %s", got, want)
	}
}

func TestSlowPeerWithinItsPaceIsNotStalled(t *testing.T) {
	k := newClocked(t, Config{Clip: true, Stage: 0, Stages: 2, MicroBatches: 1, Steps: 20, StartTimeout: 30 * time.Second})
	// The neighbour slows down step by step: the deadline follows the steps measured.
	for d := time.Second; d <= 6*time.Second; d += time.Second {
		k.step(d)
	}
	if k.c.stalled {
		t.Fatal("a neighbour that slows down gradually was declared stalled")
	}
}

func TestSilentNeighbourIsStalledAtItsDeadline(t *testing.T) {
	k := newClocked(t, Config{Clip: true, Stage: 0, Stages: 2, MicroBatches: 1, Steps: 10, StartTimeout: 30 * time.Second})
	k.step(time.Second)
	k.step(time.Second)
	k.must(Done{}) // step 3's forward; now the gradient never comes
	dl := k.c.Deadline()
	out := k.advance(dl)
	if _, ok := stalledIn(out); ok {
		t.Fatalf("stalled before the deadline %s", dl)
	}
	out = k.advance(200 * time.Millisecond)
	s, ok := stalledIn(out)
	if !ok {
		t.Fatalf("not stalled 200 ms past the deadline %s: %v", dl, out)
	}
	if s.Stage != 1 || s.Wait != WaitGradient || s.Step != 3 || s.Down || s.Waited <= s.Deadline {
		t.Errorf("stalled %+v, want stage 1, waiting for a gradient of step 3, past the deadline", s)
	}
	if out := k.advance(10 * time.Second); len(out) > 0 {
		t.Errorf("a stalled core asked for more: %v", out)
	}
	if out := k.must(GradientIn{3, 0}); len(out) > 0 {
		t.Errorf("a stalled core went on after a late gradient: %v", out)
	}
}

func TestMissingNormIsStalledNamingItsStage(t *testing.T) {
	c := mustNew(t, Config{Clip: true, Stage: 1, Stages: 3, MicroBatches: 1, Steps: 2, StartTimeout: 5 * time.Second})
	for _, e := range []Event{Start{}, ActivationIn{1, 0}, Done{}, GradientIn{1, 0}, Done{}, NormIn{Step: 1, Stage: 1}, NormIn{Step: 1, Stage: 0}} {
		if _, err := c.Handle(e); err != nil {
			t.Fatal(err)
		}
	}
	out, _ := c.Handle(Tick{Now: 6 * time.Second})
	s, ok := stalledIn(out)
	if !ok || s.Stage != 2 || s.Wait != WaitNorm {
		t.Errorf("%v: want a stall naming stage 2, whose norm is missing", out)
	}
}

// The last stage, its backward passes done, waits for the earlier stages' norms. Stage
// 1 has gone silent, so stage 0, waiting for stage 1's gradients, has sent no norm
// either: the stall names stage 1, the one whose norm nothing else holds up.
func TestABubbleStallNamesTheLastStageWhoseNormIsMissing(t *testing.T) {
	c := mustNew(t, Config{Clip: true, Stage: 2, Stages: 3, MicroBatches: 1, Steps: 2, StartTimeout: 5 * time.Second})
	for _, e := range []Event{Start{}, ActivationIn{1, 0}, Done{}, Done{}, NormIn{Step: 1, Stage: 2}} {
		if _, err := c.Handle(e); err != nil {
			t.Fatal(err)
		}
	}
	out, _ := c.Handle(Tick{Now: 6 * time.Second})
	s, ok := stalledIn(out)
	if !ok || s.Stage != 1 || s.Wait != WaitBubble {
		t.Errorf("%v: want a stall naming stage 1, waiting in the bubble", out)
	}
}

func TestPeerDownStallsTheStageInEveryPhase(t *testing.T) {
	cfg := Config{Clip: true, Stage: 1, Stages: 3, MicroBatches: 2, Steps: 2, Outer: &Outer{Fragments: 1, Due: func(int, int) bool { return true }}}
	phases := map[string][]Event{
		"forward":       {Start{}},                             // waiting for an activation
		"backward":      {Start{}, ActivationIn{1, 0}, Done{}}, // waiting for a gradient
		"norm exchange": {Start{}, ActivationIn{1, 0}, ActivationIn{1, 1}, Done{}, Done{}, GradientIn{1, 0}, Done{}, GradientIn{1, 1}, Done{}},
		"outer step": {Start{}, ActivationIn{1, 0}, ActivationIn{1, 1}, Done{}, Done{}, GradientIn{1, 0}, Done{}, GradientIn{1, 1}, Done{},
			NormIn{Step: 1, Stage: 0}, NormIn{Step: 1, Stage: 1}, NormIn{Step: 1, Stage: 2}, Done{}},
	}
	for name, events := range phases {
		c := mustNew(t, cfg)
		for _, e := range events {
			if _, err := c.Handle(e); err != nil {
				t.Fatalf("%s: %#v: %v", name, e, err)
			}
		}
		out, err := c.Handle(PeerDown{Stage: 0})
		if name == "outer step" {
			// Its norms are all in: the step is finished (the outer step applied), then
			// the stage stops.
			if len(out) > 0 || err != nil {
				t.Fatalf("%s: %v, %v; want nothing until the outer step is done", name, out, err)
			}
			if out, err = c.Handle(ReduceDone{Step: 1}); err != nil || !reflect.DeepEqual(out, acts{ApplyOuter{Step: 1}}) {
				t.Fatalf("%s: all-reduce done: %v, %v; want it applied", name, out, err)
			}
			out, err = c.Handle(Done{})
		}
		s, ok := stalledIn(out)
		if err != nil || !ok || !s.Down || s.Stage != 0 {
			t.Errorf("%s: stage 0's node down: %v, %v; want a stall naming it", name, out, err)
		}
	}
}

func TestOuterStepIsNotTimedByTheCore(t *testing.T) {
	c := mustNew(t, Config{Clip: true, Stage: 0, Stages: 1, MicroBatches: 1, Steps: 2, StartTimeout: time.Second, Outer: &Outer{Fragments: 1, Due: func(int, int) bool { return true }}})
	for _, e := range []Event{Start{}, Done{}, Done{}, NormIn{Step: 1, Stage: 0}, Done{}} {
		if _, err := c.Handle(e); err != nil {
			t.Fatal(err)
		}
	}
	if c.Waiting() != WaitSync {
		t.Fatalf("waiting %v, want the outer step", c.Waiting())
	}
	if out, _ := c.Handle(Tick{Now: time.Hour}); len(out) > 0 {
		t.Errorf("an outer step taking an hour: %v; the all-reduce keeps its own deadlines", out)
	}
}

func TestPartitionShorterThanTheDeadlineHeals(t *testing.T) {
	k := newClocked(t, Config{Clip: true, Stage: 0, Stages: 2, MicroBatches: 1, Steps: 10, StartTimeout: 30 * time.Second})
	k.step(time.Second)
	k.step(time.Second)
	k.must(Done{})
	// Nothing arrives for most of the deadline (a partition), then the link heals.
	if out := k.advance(k.c.Deadline() - 300*time.Millisecond); len(out) > 0 {
		t.Fatalf("partition shorter than the deadline: %v", out)
	}
	k.must(GradientIn{3, 0})
	k.must(Done{})
	k.must(NormIn{Step: 3, Stage: 0})
	k.must(NormIn{Step: 3, Stage: 1})
	if out := k.must(Done{}); !reflect.DeepEqual(out[0], StepDone{Step: 3}) {
		t.Fatalf("after the heal: %v, want step 3 done", out)
	}
	if k.c.stalled {
		t.Error("stalled by a partition that healed in time")
	}
}

func TestPeerDownAfterItsNormCameLetsTheStepFinishFirst(t *testing.T) {
	c := mustNew(t, Config{Clip: true, Stage: 1, Stages: 2, MicroBatches: 1, Steps: 3})
	for _, e := range []Event{Start{}, ActivationIn{1, 0}, Done{}, Done{}, NormIn{Step: 1, Stage: 0}} {
		if _, err := c.Handle(e); err != nil {
			t.Fatal(err)
		}
	}
	// Stage 0 shared its norm and went away: this stage's step can still be taken.
	if out, err := c.Handle(PeerDown{Stage: 0}); err != nil || len(out) > 0 {
		t.Fatalf("peer down with its norm in: %v, %v; want nothing yet", out, err)
	}
	out, _ := c.Handle(NormIn{Step: 1, Stage: 1})
	if len(out) != 1 {
		t.Fatalf("%v, want the optimiser step", out)
	}
	out, _ = c.Handle(Done{})
	if len(out) != 2 || out[0] != (StepDone{Step: 1}) {
		t.Fatalf("%v, want step 1 done and then a stall", out)
	}
	if s, ok := out[1].(Stalled); !ok || !s.Down || s.Stage != 0 {
		t.Errorf("%v, want a stall naming stage 0 as down", out[1])
	}
}
