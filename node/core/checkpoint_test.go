package core

import (
	"errors"
	"reflect"
	"slices"
	"testing"
	"time"
)

func TestCheckpointsAreDueEveryIntervalAndWhereOrdered(t *testing.T) {
	c := Checkpoints{Interval: 5, Last: 20}
	if err := c.Order(12, 10); err != nil {
		t.Fatal(err)
	}
	if err := c.Order(10, 10); !errors.Is(err, ErrStale) {
		t.Errorf("an order for a step done here: %v, want ErrStale", err)
	}
	var due []int
	for s := range 21 {
		if c.Due(s) {
			due = append(due, s)
		}
	}
	if want := []int{5, 10, 12, 15}; !slices.Equal(due, want) {
		t.Errorf("due at %v, want %v (not 0, not the last step: the run's end is checkpointed anyway)", due, want)
	}
}

// The time rule orders one step, ahead by the lead at the pace of the steps, aligned to
// outer steps, and none again until that one is recorded and the time has passed.
func TestCheckpointClockOrdersAStepAheadOnceTheTimeHasPassed(t *testing.T) {
	k := CheckpointClock{Every: 10 * time.Second, Align: 4, Last: 1000, Lead: time.Second}
	sec := func(s int) time.Duration { return time.Duration(s) * time.Second }
	if _, ok := k.Recorded(3, sec(9), 100*time.Millisecond); ok {
		t.Error("ordered before the time passed")
	}
	at, ok := k.Recorded(90, sec(10), 100*time.Millisecond)
	// 90 + 2 + 1 s / 100 ms = 102, rounded up to a multiple of 4.
	if !ok || at != 104 {
		t.Fatalf("ordered %d (%v), want 104", at, ok)
	}
	if _, ok := k.Recorded(100, sec(30), 100*time.Millisecond); ok {
		t.Error("ordered again before the pending one was recorded")
	}
	if _, ok := k.Recorded(104, sec(31), 100*time.Millisecond); ok {
		t.Error("ordered again as the last one was recorded")
	}
	if at, ok := k.Recorded(200, sec(41), time.Second); !ok || at != 204 {
		t.Errorf("next order %d (%v), want 204", at, ok)
	}
	end := CheckpointClock{Every: time.Second, Last: 50, Align: 1, Lead: time.Second}
	if at, ok := end.Recorded(47, sec(5), time.Second); ok {
		t.Errorf("ordered step %d at the run's end, which is checkpointed anyway", at)
	}
	count := CheckpointClock{Every: time.Second, Interval: 10, Last: 100, Align: 1}
	if at, ok := count.Recorded(18, sec(5), time.Second); ok {
		t.Errorf("ordered step %d though the count rule checkpoints step 20", at)
	}
	if _, ok := (&CheckpointClock{Last: 100}).Recorded(50, sec(1e4), time.Second); ok {
		t.Error("ordered with no time rule")
	}
}

func TestTrainersTimeRuleAddsCheckpointsButNotAtTheEnd(t *testing.T) {
	c := Checkpoints{Interval: 10, Last: 30, Every: time.Minute}
	for _, tc := range []struct {
		step  int
		since time.Duration
		want  bool
	}{
		{10, 0, true}, // the count rule
		{11, 59 * time.Second, false},
		{11, time.Minute, true}, // the time rule
		{30, time.Hour, false},  // the run's end is written anyway
		{0, time.Hour, false},   // nothing trained yet
	} {
		if got := c.DueAfter(tc.step, tc.since); got != tc.want {
			t.Errorf("step %d, %s since the last: %v, want %v", tc.step, tc.since, got, tc.want)
		}
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
