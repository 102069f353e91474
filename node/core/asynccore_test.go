package core

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"testing"
)

// asyncPipeline runs the cores of an async pipeline together, delivering each stage's
// waiting events in a random order (frames overtake one another, as over links of
// their own), and returns each stage's work as AsyncOps, with the age of every
// forward and backward.
func asyncPipeline(t *testing.T, cfgs []Config, seed uint64) (ops [][]AsyncOp, ages [][]int, logs [][]Action) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 7))
	n := len(cfgs)
	cores := make([]*Core, n)
	queues := make([][]Event, n)
	ops, ages, logs = make([][]AsyncOp, n), make([][]int, n), make([][]Action, n)
	updates := make([]int, n)
	last := make([]int, n)
	for i, c := range cfgs {
		cores[i] = mustNew(t, c)
		queues[i] = append(queues[i], Start{})
		updates[i] = c.From
	}
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
		k := rng.IntN(len(queues[i]))
		e := queues[i][k]
		queues[i] = append(queues[i][:k], queues[i][k+1:]...)
		out, err := cores[i].Handle(e)
		if err != nil {
			t.Fatalf("seed %d stage %d event %#v: %v", seed, i, e, err)
		}
		M := cfgs[i].MicroBatches
		for _, a := range out {
			logs[i] = append(logs[i], a)
			switch a := a.(type) {
			case Forward:
				j := (a.Step-1)*M + a.Micro
				ops[i] = append(ops[i], AsyncOp{Kind: AsyncForward, Micro: j, Version: updates[i] - a.Age})
				ages[i] = append(ages[i], a.Age)
				if a.Send {
					queues[i+1] = append(queues[i+1], ActivationIn{a.Step, a.Micro})
				}
				queues[i] = append(queues[i], Done{})
			case Backward:
				j := (a.Step-1)*M + a.Micro
				last[i] = j
				ops[i] = append(ops[i], AsyncOp{Kind: AsyncBackward, Micro: j, Version: updates[i]})
				ages[i] = append(ages[i], a.Age)
				if a.Send {
					queues[i-1] = append(queues[i-1], GradientIn{a.Step, a.Micro})
				}
				queues[i] = append(queues[i], Done{})
			case Optimize:
				if !a.Own || a.Step != updates[i]+1 {
					t.Fatalf("stage %d: %#v after %d updates", i, a, updates[i])
				}
				updates[i]++
				ops[i] = append(ops[i], AsyncOp{Kind: AsyncUpdate, Micro: last[i], Version: updates[i]})
				queues[i] = append(queues[i], Done{})
			case ShareNorm:
				t.Fatalf("stage %d: an async run exchanges no norm: %#v", i, a)
			case StartReduce:
				queues[i] = append(queues[i], ReduceDone{Step: a.Step})
			case EvalForward:
				if a.Send {
					queues[i+1] = append(queues[i+1], EvalIn{a.Step, a.Batch})
				}
				queues[i] = append(queues[i], Done{})
			case ApplyOuter:
				queues[i] = append(queues[i], Done{})
			}
		}
	}
	for i, c := range cores {
		if !c.Finished() {
			t.Fatalf("seed %d: stage %d stuck at update %d", seed, i, c.Step())
		}
	}
	return ops, ages, logs
}

func asyncCfgs(stages, micro, inFlight, steps int, stash bool) []Config {
	var cfgs []Config
	for s := range stages {
		cfgs = append(cfgs, Config{Async: true, Stash: stash, Stage: s, Stages: stages, MicroBatches: micro,
			MaxInFlight: inFlight, Steps: steps, EvalInterval: 2, EvalBatches: 2, CheckpointInterval: 3})
	}
	return cfgs
}

func TestAsyncCoreRunsTheScheduleOrderUnderAnyDeliveryOrder(t *testing.T) {
	for _, c := range []struct{ stages, micro, inFlight int }{{4, 4, 0}, {2, 2, 0}, {4, 3, 7}, {3, 5, 2}, {2, 1, 4}, {1, 3, 0}} {
		cfgs := asyncCfgs(c.stages, c.micro, c.inFlight, 5, true)
		a := cfgs[0].schedule()
		for seed := range uint64(20) {
			ops, ages, _ := asyncPipeline(t, cfgs, seed)
			for s := range c.stages {
				if want := a.Order(s, 5*c.micro); !reflect.DeepEqual(ops[s], want) {
					t.Fatalf("%+v seed %d stage %d:\n got  %v\n want %v", c, seed, s, ops[s], want)
				}
				// Each forward runs on the current weights; each backward, stashing,
				// on its forward's: as old as the schedule's delay, never more than kept.
				fi := 0
				for k, op := range ops[s] {
					if op.Kind == AsyncUpdate {
						continue
					}
					age := ages[s][fi]
					fi++
					if op.Kind == AsyncForward && age != 0 {
						t.Fatalf("%+v stage %d: forward %v of age %d", c, s, op, age)
					}
					if op.Kind == AsyncBackward && (age != op.Version-a.ForwardVersion(s, op.Micro) || age > a.MaxDelay(s)) {
						t.Fatalf("%+v stage %d: backward %v (op %d) of age %d", c, s, op, k, age)
					}
				}
			}
		}
	}
}

func TestAsyncCoreEvaluatesAndCheckpointsAtUpdateCounts(t *testing.T) {
	cfgs := asyncCfgs(3, 2, 0, 5, false)
	_, ages, logs := asyncPipeline(t, cfgs, 1)
	for s, log := range logs {
		for _, age := range ages[s] {
			if age != 0 {
				t.Fatalf("stage %d: delay none runs every backward on the current weights, got age %d", s, age)
			}
		}
		var got []Action
		updates := 0
		for _, a := range log {
			switch a := a.(type) {
			case Optimize:
				updates++
			case StepDone, Checkpoint, EvalDone, Finished:
				got = append(got, a)
			case EvalForward:
				if a.Step != updates {
					t.Fatalf("stage %d: evaluation of update %d after %d updates", s, a.Step, updates)
				}
			}
		}
		want := []Action{StepDone{1}, StepDone{2}, EvalDone{2}, StepDone{3}, Checkpoint{3}, StepDone{4}, EvalDone{4}, StepDone{5}, EvalDone{5}, Finished{}}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("stage %d:\n got  %v\n want %v", s, got, want)
		}
	}
}

func TestAsyncCoreTakesOuterStepsAfterItsUpdates(t *testing.T) {
	cfgs := asyncCfgs(2, 2, 0, 4, true)
	for i := range cfgs {
		cfgs[i].Outer = streaming(4)
	}
	_, _, logs := asyncPipeline(t, cfgs, 3)
	for i := range cfgs {
		cfgs[i].Async = false
	}
	sync := simulate(t, cfgs, 3)
	// Between an update and the next forward: the outer steps a sync run takes after
	// the same step (Streaming DiLoCo: begun now, applied after the next update).
	outerActs := func(log []Action) []Action {
		var got []Action
		for _, a := range log {
			switch a := a.(type) {
			case Optimize:
				got = append(got, Optimize{Step: a.Step})
			case StartReduce, ApplyOuter, OuterDone:
				got = append(got, a)
			}
		}
		return got
	}
	for s, log := range logs {
		got := outerActs(log)
		if len(got) < 10 {
			t.Fatalf("stage %d: too few outer steps: %v", s, got)
		}
		want := outerActs(sync[s])
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("stage %d:\n got  %v\n want %v", s, got, want)
		}
	}
}

func TestAsyncCoreWaitsForALateActivationRatherThanReorder(t *testing.T) {
	// Stage 1 of 3, two micro-batches an update: bound 2. The gradient of micro-batch 1
	// comes before the activation of micro-batch 2, which the order runs first: the
	// stage waits for it, so micro-batch 2's forward stays on the version it has.
	c := mustNew(t, Config{Async: true, Stash: true, Stage: 1, Stages: 3, MicroBatches: 2, Steps: 3})
	script(t, c,
		[2]any{Start{}, nil},
		[2]any{ActivationIn{1, 0}, acts{Forward{Step: 1, Micro: 0, Slot: 0, Send: true}}},
		[2]any{Done{}, nil},
		[2]any{ActivationIn{1, 1}, acts{Forward{Step: 1, Micro: 1, Slot: 1, Send: true}}},
		[2]any{Done{}, nil},
		[2]any{GradientIn{1, 0}, acts{Backward{Step: 1, Micro: 0, Slot: 0, Send: true}}},
		[2]any{GradientIn{1, 1}, nil}, // early: the forward of micro-batch 2 comes first
		[2]any{Done{}, nil},
		[2]any{ActivationIn{2, 0}, acts{Forward{Step: 2, Micro: 0, Slot: 0, Send: true}}},
		[2]any{Done{}, acts{Backward{Step: 1, Micro: 1, Slot: 1, Send: true}}},
		[2]any{Done{}, acts{Optimize{Step: 1, Own: true}}},
		[2]any{Done{}, acts{StepDone{1}}},
		[2]any{ActivationIn{2, 1}, acts{Forward{Step: 2, Micro: 1, Slot: 1, Send: true}}},
		[2]any{Done{}, nil},
		// Micro-batch 2 ran forward before the update, micro-batch 3 after: stashing,
		// the first's backward runs on the weights one update old.
		[2]any{GradientIn{2, 0}, acts{Backward{Step: 2, Micro: 0, Slot: 0, Send: true, Age: 1}}},
		[2]any{Done{}, nil},
		[2]any{GradientIn{2, 1}, nil}, // the forward of micro-batch 4 comes first again
		[2]any{ActivationIn{3, 0}, acts{Forward{Step: 3, Micro: 0, Slot: 0, Send: true}}},
		[2]any{Done{}, acts{Backward{Step: 2, Micro: 1, Slot: 1, Send: true}}},
	)
	// A frame resent after it was used is stale and changes nothing.
	for _, e := range []Event{ActivationIn{1, 1}, GradientIn{1, 0}, GradientIn{2, 1}} {
		if _, err := c.Handle(e); !errors.Is(err, ErrStale) {
			t.Fatalf("%#v: %v, want ErrStale", e, err)
		}
	}
	if _, err := c.Handle(GradientIn{3, 1}); !errors.Is(err, ErrProtocol) {
		t.Fatalf("a gradient for a micro-batch never sent: %v, want ErrProtocol", err)
	}
}

func TestAsyncCorePeerDown(t *testing.T) {
	cfg := Config{Async: true, Stage: 1, Stages: 3, MicroBatches: 2, Steps: 3}
	// The previous stage goes down once every forward of update 1 is out: the stage
	// finishes update 1 without it, runs no forward of update 2, and stops after it.
	c := mustNew(t, cfg)
	script(t, c,
		[2]any{Start{}, nil},
		[2]any{ActivationIn{1, 0}, acts{Forward{Step: 1, Micro: 0, Slot: 0, Send: true}}},
		[2]any{Done{}, nil},
		[2]any{ActivationIn{1, 1}, acts{Forward{Step: 1, Micro: 1, Slot: 1, Send: true}}},
		[2]any{Done{}, nil},
		[2]any{PeerDown{Stage: 0}, nil},
		[2]any{GradientIn{1, 0}, acts{Backward{Step: 1, Micro: 0, Slot: 0, Send: true}}},
		[2]any{Done{}, nil},
		[2]any{GradientIn{1, 1}, acts{Backward{Step: 1, Micro: 1, Slot: 1, Send: true}}},
		[2]any{Done{}, acts{Optimize{Step: 1, Own: true}}},
		[2]any{Done{}, acts{StepDone{1}, Stalled{Step: 1, Stage: 0, Wait: WaitActivation, Down: true}}},
	)
	// The next stage going down mid-update stalls the stage at once: it needs its
	// gradients.
	c = mustNew(t, cfg)
	script(t, c,
		[2]any{Start{}, nil},
		[2]any{ActivationIn{1, 0}, acts{Forward{Step: 1, Micro: 0, Slot: 0, Send: true}}},
		[2]any{Done{}, nil},
		[2]any{PeerDown{Stage: 2}, acts{Stalled{Step: 1, Stage: 2, Wait: WaitActivation, Down: true}}},
		[2]any{ActivationIn{1, 1}, nil},
	)
}

func TestAsyncCoreResumedRunsTheForwardsInFlightAtTheCutOnTheirVersions(t *testing.T) {
	// A run of 4 stages × 2 micro-batches resumed after update 2: every stage starts
	// again at micro-batch 4 and its order from there is the whole run's, the forwards
	// that were in flight at the cut run on the past versions the checkpoint keeps.
	cfgs := asyncCfgs(4, 2, 0, 5, true)
	whole, _, _ := asyncPipeline(t, cfgs, 5)
	for i := range cfgs {
		cfgs[i].From = 2
	}
	ops, ages, _ := asyncPipeline(t, cfgs, 5)
	a := cfgs[0].schedule()
	for s := range cfgs {
		from := 0
		for from < len(whole[s]) && !(whole[s][from].Kind == AsyncUpdate && whole[s][from].Version == 2) {
			from++
		}
		if want := whole[s][from+1:]; !reflect.DeepEqual(ops[s][len(ops[s])-len(want):], want) {
			t.Fatalf("stage %d: resumed\n got  %v\n want the end of %v", s, ops[s], want)
		}
		for k, op := range ops[s][:a.Bound(s)-1] { // the forwards in flight at the cut
			if op.Kind != AsyncForward || ages[s][k] != 2-a.ForwardVersion(s, op.Micro) || ages[s][k] > a.MaxDelay(s) {
				t.Fatalf("stage %d: op %v of age %d", s, op, ages[s][k])
			}
		}
	}
}

// joinedOrder is what a stage that joins after update from runs: the whole run's
// order restricted to the micro-batches from from·MicroBatches on and the updates
// after from, each forward on a version no older than from's (the only one it holds).
func joinedOrder(a Async, stage, n, from int) []AsyncOp {
	var out []AsyncOp
	for _, op := range a.Order(stage, n) {
		switch {
		case op.Kind == AsyncUpdate && op.Version > from:
		case op.Kind != AsyncUpdate && op.Micro >= from*a.MicroBatches:
			op.Version = max(op.Version, from)
		default:
			continue
		}
		out = append(out, op)
	}
	return out
}

func TestAsyncCoreJoinedRefillsFromItsStepOnTheWeightsItHolds(t *testing.T) {
	for _, c := range []struct{ stages, micro, inFlight, from int }{{2, 2, 4, 2}, {4, 2, 0, 2}, {4, 3, 7, 1}, {3, 1, 5, 3}, {2, 4, 0, 4}} {
		for _, stash := range []bool{true, false} {
			const steps = 6
			cfgs := asyncCfgs(c.stages, c.micro, c.inFlight, steps, stash)
			for i := range cfgs {
				cfgs[i].From, cfgs[i].Joined = c.from, true
			}
			a := cfgs[0].schedule()
			for seed := range uint64(5) {
				ops, ages, _ := asyncPipeline(t, cfgs, seed)
				for s := range c.stages {
					if want := joinedOrder(a, s, steps*c.micro, c.from); !reflect.DeepEqual(ops[s], want) {
						t.Fatalf("%+v stash %v seed %d stage %d:\n got  %v\n want %v", c, stash, seed, s, ops[s], want)
					}
					fi := 0
					for _, op := range ops[s] {
						if op.Kind == AsyncUpdate {
							continue
						}
						age := ages[s][fi]
						fi++
						// Forwards on the current weights, as at a run's start; a stashed
						// backward on its forward's, never older than the join.
						want := 0
						if op.Kind == AsyncBackward && stash {
							want = op.Version - max(a.ForwardVersion(s, op.Micro), c.from)
						}
						if age != want || op.Version-age < c.from {
							t.Fatalf("%+v stash %v stage %d: %v of age %d, want %d", c, stash, s, op, age, want)
						}
					}
				}
			}
		}
	}
}

func TestAsyncCoreJoinedAfterTheFillIsTheWholeRunsSchedule(t *testing.T) {
	// 2 stages × 2 micro-batches, stage 0 holding 4 in flight, joined after update 3:
	// stage 0 refills with micro-batches 6 to 9 on version 3, and from the backward of
	// micro-batch 6 on its work is the uninterrupted run's, versions and all.
	cfgs := asyncCfgs(2, 2, 4, 8, true)
	for i := range cfgs {
		cfgs[i].From, cfgs[i].Joined = 3, true
	}
	ops, ages, _ := asyncPipeline(t, cfgs, 1)
	if got, want := fmt.Sprint(ops[0][:12], ages[0][:11]), "[F6@3 F7@3 F8@3 F9@3 B6@3 F10@3 B7@3 U7@4 F11@4 B8@4 F12@4 B9@4] [0 0 0 0 0 0 0 0 1 0 1]"; got != want {
		t.Errorf("joined stage 0:\n got %s\nwant %s", got, want)
	}
	whole := cfgs[0].schedule().Order(0, 16)
	tail := whole[len(whole)-len(ops[0])+4:]
	if !reflect.DeepEqual(ops[0][4:], tail) {
		t.Errorf("after the fill:\n got  %v\n want %v", ops[0][4:], tail)
	}
}

func TestAsyncCoreResumedFromAJoinedStageRunsWhatItRan(t *testing.T) {
	// A joined stage's checkpoint soon after its join holds From's weights for the
	// versions before From it never had (stage.Unit.FillPast): a run resumed from it,
	// which knows nothing of the join, then runs every forward and backward on the
	// weights the joined run used.
	const from, steps = 2, 8
	// ranOn is each op with the version its weights are: a backward's is its age
	// older than the current one.
	ranOn := func(ops []AsyncOp, ages []int) []AsyncOp {
		out := append([]AsyncOp(nil), ops...)
		k := 0
		for i, op := range out {
			if op.Kind != AsyncUpdate {
				if op.Kind == AsyncBackward {
					out[i].Version -= ages[k]
				}
				k++
			}
		}
		return out
	}
	for _, c := range []struct{ stages, micro, inFlight int }{{2, 2, 4}, {4, 2, 0}, {3, 1, 5}} {
		cfgs := asyncCfgs(c.stages, c.micro, c.inFlight, steps, true)
		for i := range cfgs {
			cfgs[i].From, cfgs[i].Joined = from, true
		}
		jops, jages, _ := asyncPipeline(t, cfgs, 2)
		a := cfgs[0].schedule()
		for cut := from + 1; cut <= from+a.MaxDelay(0)+1 && cut < steps; cut++ {
			for i := range cfgs {
				cfgs[i].From, cfgs[i].Joined = cut, false
			}
			rops, rages, _ := asyncPipeline(t, cfgs, 3)
			for s := range c.stages {
				// The joined run's ops on the micro-batches from the cut's, in order.
				var want []AsyncOp
				for _, op := range ranOn(jops[s], jages[s]) {
					if (op.Kind == AsyncUpdate && op.Version > cut) || (op.Kind != AsyncUpdate && op.Micro >= cut*c.micro) {
						want = append(want, op)
					}
				}
				got := ranOn(rops[s], rages[s])
				for k := range got {
					got[k].Version = max(got[k].Version, from) // what the filled versions hold
				}
				if !reflect.DeepEqual(got, want) {
					t.Fatalf("%+v cut %d stage %d:\n got  %v\n want %v", c, cut, s, got, want)
				}
			}
		}
	}
}
