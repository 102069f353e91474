package membership

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/metrics"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// grid is a run of S stages × R replicas on nodes named "s<stage>r<replica>".
func grid(S, R, steps int) Config {
	c := Config{Stages: S, Replicas: R, Steps: steps, TokensPerStep: 100, InnerSteps: 2,
		StaffTimeout: 30 * time.Second, Rejoinable: R > 1}
	for r := range R {
		for s := range S {
			c.Cells = append(c.Cells, Cell{Stage: s, Replica: r, Peer: node(s, r), Need: 1000})
		}
	}
	return c
}

func node(s, r int) string { return fmt.Sprintf("s%dr%d", s, r) }

func from(s, r int) From { return From{Stage: s, Replica: r, Peer: node(s, r)} }

func mustNew(t *testing.T, c Config) *Run {
	t.Helper()
	r, err := New(c, t0)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// at is one line of a script: at seconds after t0, event e must give the actions
// want, leaving out log lines (nil: none).
type at struct {
	s    float64
	e    Event
	want []Action
}

type acts = []Action

func script(t *testing.T, r *Run, lines ...at) {
	t.Helper()
	for i, l := range lines {
		got := quiet(r.Handle(t0.Add(time.Duration(l.s*float64(time.Second))), l.e))
		if len(got) == 0 && len(l.want) == 0 {
			continue
		}
		if !reflect.DeepEqual(got, l.want) {
			t.Fatalf("line %d at %gs %#v:\n got  %#v\n want %#v", i, l.s, l.e, got, l.want)
		}
	}
}

// quiet leaves out the log lines.
func quiet(in []Action) []Action {
	var out []Action
	for _, a := range in {
		if _, ok := a.(Log); !ok {
			out = append(out, a)
		}
	}
	return out
}

func rep(r int) *int { return &r }

func val(v float64) *float64 { return &v }

func TestAStagesReportsBecomeRowsAndTheRunFinishes(t *testing.T) {
	c := grid(2, 1, 2)
	c.CheckpointInterval = 1
	r := mustNew(t, c)
	script(t, r,
		at{1, StepTaken{From: from(1, 0), Step: 1, Loss: 3, LR: 0.1, GradNorm: 2},
			acts{WriteStep{metrics.Step{Step: 1, Loss: 3, Tokens: 100, TokensPerS: 100, ElapsedS: 1, LR: 0.1, GradNorm: 2}}, TellRecorded{1}}},
		// A report from a node that does not hold the cell is not the cell's.
		at{1.5, StepTaken{From: From{Stage: 1, Peer: "intruder"}, Step: 2, Loss: 9}, nil},
		// The last step waits for its evaluation, which gives its time.
		at{3, StepTaken{From: from(1, 0), Step: 2, Loss: 2.5}, nil},
		at{4, StageDone{from(0, 0)}, acts{KeepEnd{0, 0}}},
		at{5, Evaluated{From: from(1, 0), Step: 2, ValLoss: 2.75},
			acts{WriteStep{metrics.Step{Step: 2, Loss: 2.5, ValLoss: val(2.75), Tokens: 200, TokensPerS: 50, ElapsedS: 5}}, TellRecorded{2}}},
		at{6, StageDone{from(1, 0)}, acts{KeepEnd{1, 0}, Finish{Outcome: RunFinished}}},
		at{7, StepTaken{From: from(1, 0), Step: 3}, nil}, // over: nothing more
	)
	tl := r.Tally(t0.Add(6 * time.Second))
	if tl.Steps != 2 || tl.Loss != 2.5 || tl.ValLoss != 2.75 || tl.Tokens != 200 || tl.StepsRun != 2 || tl.Elapsed != 6*time.Second {
		t.Errorf("tally %+v", tl)
	}
}

// A run stopped before a step's evaluation leaves the row unevaluated; resumed from
// that step, it evaluates it again first and records the row with its validation loss.
func TestAStepsEvaluationLeftOutIsRunAgainOnResume(t *testing.T) {
	c := grid(1, 1, 4)
	c.EvalInterval = 2
	r := mustNew(t, c)
	script(t, r,
		at{1, StepTaken{From: from(0, 0), Step: 1, Loss: 1}, acts{WriteStep{metrics.Step{Step: 1, Loss: 1, Tokens: 100, TokensPerS: 100, ElapsedS: 1}}}},
		at{2, StepTaken{From: from(0, 0), Step: 2, Loss: 2}, nil},
		at{3, StageStopped{From: from(0, 0), Failed: true, Error: "node shutting down"}, acts{KeepEnd{0, 0}, Abort{"stage 0 on s0r0 stopped: node shutting down"},
			Finish{RunDown, "stage 0 on s0r0 stopped: node shutting down"}}},
	)
	left := r.Unevaluated()
	if want := []metrics.Step{{Step: 2, Loss: 2, Tokens: 200, TokensPerS: 100, ElapsedS: 2}}; !reflect.DeepEqual(left, want) {
		t.Fatalf("unevaluated %v, want %v", left, want)
	}
	c.Resumed, c.FromStep, c.Tokens, c.Elapsed, c.Unevaluated = true, 2, 200, 3*time.Second, left
	r = mustNew(t, c)
	script(t, r,
		at{1, Evaluated{From: from(0, 0), Step: 2, ValLoss: 2.5}, acts{WriteStep{metrics.Step{Step: 2, Loss: 2, ValLoss: val(2.5), Tokens: 200, TokensPerS: 100, ElapsedS: 4}}}},
	)
	if len(r.Unevaluated()) != 0 {
		t.Errorf("still unevaluated: %v", r.Unevaluated())
	}
}

func TestAResumedRunGoesOnFromItsStepTokensAndTime(t *testing.T) {
	c := grid(1, 1, 12)
	c.CheckpointInterval = 5
	c.Resumed, c.FromStep, c.Tokens, c.Elapsed = true, 10, 1000, 50*time.Second
	r := mustNew(t, c)
	script(t, r,
		at{2, StepTaken{From: from(0, 0), Step: 11, Loss: 1},
			acts{WriteStep{metrics.Step{Step: 11, Loss: 1, Tokens: 1100, TokensPerS: 50, ElapsedS: 52}}}},
	)
	if tl := r.Tally(t0.Add(2 * time.Second)); tl.FromStep != 10 || tl.Elapsed != 52*time.Second || tl.TimeRun != 2*time.Second {
		t.Errorf("tally %+v", tl)
	}
}

// A pipeline whose node is lost is taken out: its nodes go idle, the whole
// pipelines drop it from their all-reduce. A newcomer found by the probe takes the
// lost node's cell, and the pipeline rejoins after the next outer step of every stage.
func TestANodeLostIsReplacedByANewcomerAndItsPipelineRejoins(t *testing.T) {
	r := mustNew(t, grid(2, 3, 8))
	why := "the node holding stage 1 of replica 2 (s1r2) disconnected"
	outer := func(s, rp int) OuterTaken { return OuterTaken{From: from(s, rp), Step: 2, OuterStep: 1, Hash: "h"} }
	script(t, r,
		at{1, PeerLost{node(1, 2)}, acts{
			Idle{Replica: 2, Reason: why, Peers: []string{node(0, 2), node(1, 2)}},
			Drop{To: Cell{0, 0, node(0, 0), 1000}, Gone: Cell{0, 2, node(0, 2), 1000}, Reason: why},
			Drop{To: Cell{1, 0, node(1, 0), 1000}, Gone: Cell{1, 2, node(1, 2), 1000}, Reason: why},
			Drop{To: Cell{0, 1, node(0, 1), 1000}, Gone: Cell{0, 2, node(0, 2), 1000}, Reason: why},
			Drop{To: Cell{1, 1, node(1, 1), 1000}, Gone: Cell{1, 2, node(1, 2), 1000}, Reason: why},
		}},
		at{1.5, PeerLost{node(1, 2)}, nil}, // once is enough
		at{2, Tick{}, nil},                 // the first probe comes 2 s after
		at{2.5, NewcomersHeard{[]Candidate{{Peer: node(0, 0)}, {Peer: "new", Addrs: []string{"/ip4/1.2.3.4/tcp/1/p2p/new"}}}}, nil},
		at{3, Tick{}, acts{AskOffer{Replica: 2, Peer: node(0, 2)}}},
		at{3.1, OfferAnswered{Replica: 2, Peer: node(0, 2), Answered: true, MaxStages: 1}, acts{AskOffer{Replica: 2, Peer: node(1, 2)}}},
		// Its own node is gone; a node holding a cell is no newcomer.
		at{3.2, OfferAnswered{Replica: 2, Peer: node(1, 2)}, acts{AskOffer{Replica: 2, Peer: "new", Addrs: []string{"/ip4/1.2.3.4/tcp/1/p2p/new"}}}},
		at{3.3, OfferAnswered{Replica: 2, Peer: "new", Answered: true, MaxStages: 1, Memory: 4000}, nil},
		at{4, outer(0, 0), acts{WriteOuter{metrics.Outer{Step: 2, OuterStep: 1, Stage: 0, Replica: 0, WeightsHash: "h", ElapsedS: 4}}}},
		at{4, outer(0, 1), acts{
			WriteOuter{metrics.Outer{Step: 2, OuterStep: 1, Stage: 0, Replica: 1, WeightsHash: "h", ElapsedS: 4}},
			OuterComplete{[]metrics.Outer{
				{Step: 2, OuterStep: 1, Stage: 0, Replica: 0, WeightsHash: "h", ElapsedS: 4},
				{Step: 2, OuterStep: 1, Stage: 0, Replica: 1, WeightsHash: "h", ElapsedS: 4}}},
		}},
		at{4, outer(1, 0), acts{WriteOuter{metrics.Outer{Step: 2, OuterStep: 1, Stage: 1, Replica: 0, WeightsHash: "h", ElapsedS: 4}}}},
	)
	got := quiet(r.Handle(t0.Add(4*time.Second), outer(1, 1)))
	want := SignJoin{Replica: 2, Step: 2, Moves: []Move{{Index: 5, Peer: "new", Was: node(1, 2), Left: -1,
		Tell: []Replace{{Index: 5, To: []int{0, 1, 2, 3}}}}}}
	if len(got) != 3 || !reflect.DeepEqual(got[2], want) {
		t.Fatalf("the outer step every stage has taken gives %#v, want the rows and %#v", got, want)
	}
	if r.Cells()[5].Peer != "new" {
		t.Fatalf("cells %v: stage 1 of replica 2 not on the newcomer", r.Cells())
	}
	script(t, r,
		at{4.5, JoinDone{Replica: 2, Nonce: 77}, nil},
		// The pipeline's first incarnation is not heard any more; the new one is.
		at{5, StageStopped{From: From{Stage: 0, Replica: 2, Peer: node(0, 2)}, Failed: true, Error: "stalled: old news"}, nil},
		at{6, StepTaken{From: From{Stage: 1, Replica: 2, Peer: "new", Join: 77}, Step: 3, Loss: 2},
			acts{WriteStep{metrics.Step{Step: 3, Loss: 2, Tokens: 100, TokensPerS: 100.0 / 6, ElapsedS: 6, Replica: rep(2)}}}},
	)
	if tl := r.Tally(t0); !reflect.DeepEqual(tl.Broken, []int{2}) || !reflect.DeepEqual(tl.Rejoined, []int{2}) || tl.Repaired != 0 {
		t.Errorf("broken %v, rejoined %v, repaired %d; want replica 2 once each, no survivor taken", tl.Broken, tl.Rejoined, tl.Repaired)
	}
}

// Two broken pipelines make one whole one: the lower takes the higher's idle survivor
// for the cell whose node is gone, and the higher keeps the node gone in a swap.
func TestTheSurvivorsOfTwoBrokenPipelinesArePairedIntoOne(t *testing.T) {
	r := mustNew(t, grid(2, 3, 8))
	r.Handle(t0, PeerLost{node(1, 1)})
	second := quiet(r.Handle(t0, PeerLost{node(0, 2)}))
	// Replica 2 leaves the whole pipeline's all-reduce only; replica 1 is out already.
	want := []Action{Idle{Replica: 2, Reason: "the node holding stage 0 of replica 2 (s0r2) disconnected", Peers: []string{node(0, 2), node(1, 2)}},
		Drop{To: Cell{0, 0, node(0, 0), 1000}, Gone: Cell{0, 2, node(0, 2), 1000}, Reason: "the node holding stage 0 of replica 2 (s0r2) disconnected"},
		Drop{To: Cell{1, 0, node(1, 0), 1000}, Gone: Cell{1, 2, node(1, 2), 1000}, Reason: "the node holding stage 0 of replica 2 (s0r2) disconnected"}}
	if !reflect.DeepEqual(second, want) {
		t.Fatalf("second break: %#v, want %#v", second, want)
	}
	no := func(p string) OfferAnswered { return OfferAnswered{Replica: 1, Peer: p} }
	yes := func(rp int, p string) OfferAnswered {
		return OfferAnswered{Replica: rp, Peer: p, Answered: true, MaxStages: 1, Memory: 1000}
	}
	script(t, r,
		at{3, Tick{}, acts{AskOffer{Replica: 1, Peer: node(0, 1)}, AskOffer{Replica: 2, Peer: node(0, 2)}}},
		at{3.1, yes(1, node(0, 1)), acts{AskOffer{Replica: 1, Peer: node(1, 1)}}},
		// No newcomers: the survivors of pipelines after 1 are asked, in order.
		at{3.2, no(node(1, 1)), acts{AskOffer{Replica: 1, Peer: node(0, 2)}}},
		at{3.3, no(node(0, 2)), acts{AskOffer{Replica: 1, Peer: node(1, 2)}}},
		at{3.4, yes(1, node(1, 2)), nil},
		// Replica 2's own probe finds no one for its cell whose node is gone (no
		// pipeline after it to re-pair with) and is tried again 2 s later.
		at{3.5, OfferAnswered{Replica: 2, Peer: node(0, 2)}, nil},
		at{4, Tick{}, nil},
		at{5.5, Tick{}, acts{AskOffer{Replica: 2, Peer: node(0, 2)}}},
	)
	r.Handle(t0.Add(6*time.Second), OuterTaken{From: from(0, 0), Step: 2, Hash: "h"})
	got := quiet(r.Handle(t0.Add(6*time.Second), OuterTaken{From: from(1, 0), Step: 2, Hash: "h"}))
	want2 := SignJoin{Replica: 1, Step: 2, Moves: []Move{{Index: 3, Peer: node(1, 2), Was: node(1, 1), Left: 5,
		Tell: []Replace{{Index: 3, To: []int{0, 1}}, {Index: 5, To: []int{0, 1}}}}}}
	if len(got) == 0 || !reflect.DeepEqual(got[len(got)-1], want2) {
		t.Fatalf("got %#v, want ... %#v", got, want2)
	}
	r.Handle(t0.Add(6*time.Second), JoinDone{Replica: 1, Nonce: 5})
	cells := r.Cells()
	if cells[3].Peer != node(1, 2) || cells[5].Peer != node(1, 1) {
		t.Fatalf("cells %v: want s1r2 in stage 1 of replica 1 and the node gone in replica 2's", cells)
	}
	if tl := r.Tally(t0); tl.Repaired != 1 || !reflect.DeepEqual(tl.Rejoined, []int{1}) {
		t.Errorf("repaired %d, rejoined %v; want one cell re-paired, replica 1 back", tl.Repaired, tl.Rejoined)
	}
}

// A pipeline that missed an outer step and is gone breaks; one still connected lags,
// and is let go once the others finish.
func TestAMissedOuterStepBreaksAGonePipelineAndLetsAStalledOneLag(t *testing.T) {
	c := grid(1, 3, 2)
	c.Rejoinable = false
	r := mustNew(t, c)
	got := quiet(r.Handle(t0, OuterTaken{From: from(0, 0), Step: 2, Hash: "h", Missing: []Missing{{1, false}, {2, true}}}))
	if len(got) < 2 || !reflect.DeepEqual(got[1], Idle{Replica: 1, Reason: "stage 0 of replica 1 missed the outer step after step 2 and is gone", Peers: []string{node(0, 1)}}) {
		t.Fatalf("got %#v, want replica 1 broken", got)
	}
	script(t, r,
		at{1, StepTaken{From: from(0, 0), Step: 2}, nil},
		at{2, Evaluated{From: from(0, 0), Step: 2, ValLoss: 1}, acts{WriteStep{metrics.Step{Step: 2, Tokens: 100, TokensPerS: 100, ElapsedS: 2, ValLoss: val(1), Replica: rep(0)}}}},
	)
	got = quiet(r.Handle(t0.Add(3*time.Second), StageDone{from(0, 0)}))
	why := "replica 2 fell behind and had not caught up when the others finished"
	// Replicas 1 and 2 trained no step here: the run did not do what it was for.
	want := []Action{KeepEnd{0, 0}, Idle{Replica: 2, Reason: why, Peers: []string{node(0, 2)}},
		Drop{To: Cell{0, 0, node(0, 0), 1000}, Gone: Cell{0, 2, node(0, 2), 1000}, Reason: why},
		Finish{RunFailed, "replica pipeline 1 trained no step of 2 (stage 0 of replica 1 missed the outer step after step 2 and is gone); replica pipeline 2 trained no step of 2 (" + why + ")"}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %#v\nwant %#v", got, want)
	}
}

func TestReplicasWithDifferentWeightsFailTheRun(t *testing.T) {
	r := mustNew(t, grid(1, 2, 4))
	script(t, r,
		at{1, OuterTaken{From: from(0, 0), Step: 2, Hash: "aaaa"}, acts{WriteOuter{metrics.Outer{Step: 2, Replica: 0, WeightsHash: "aaaa", ElapsedS: 1}}}},
		at{1, OuterTaken{From: from(0, 1), Step: 2, Hash: "bbbb"}, acts{Abort{"replicas diverged"},
			Finish{RunFailed, "stage 0 after step 2: replica 1's global weights hash bbbb, another replica's aaaa: the replicas diverged"}}},
	)
}

func TestASilentRunIsAborted(t *testing.T) {
	r := mustNew(t, grid(2, 1, 100))
	for i := 1; i <= 3; i++ {
		r.Handle(t0.Add(time.Duration(i)*time.Second), StepTaken{From: from(1, 0), Step: i})
	}
	// Steps take 1 s: the deadline is 10 of them plus 5 s.
	script(t, r, at{17, Tick{}, nil})
	why := "no report from any stage for 16s (deadline 15s, from the steps measured)"
	script(t, r, at{19, Tick{}, acts{Abort{why}, Finish{RunFailed, why}}})

	// Before two steps are measured, it is twice the staffing timeout.
	r = mustNew(t, grid(2, 1, 100))
	script(t, r, at{60, Tick{}, nil})
	script(t, r, at{61, Tick{}, acts{Abort{"no report from any stage for 1m1s (deadline 1m0s, from the steps measured)"},
		Finish{RunFailed, "no report from any stage for 1m1s (deadline 1m0s, from the steps measured)"}}})
}

// A node stopping says after which step: every stage of its pipeline is told to stop
// after it, and the pipeline is out once every stage has stopped: with one replica
// the run is down (and may be resumed from that step).
func TestAGracefulStopStopsEveryStageAfterTheSameStep(t *testing.T) {
	r := mustNew(t, grid(2, 1, 40))
	why := "the node holding stage 1 (s1r0) is stopping; every stage of its pipeline stops after step 13"
	script(t, r,
		at{1, Stopping{From: from(1, 0), Step: 13}, acts{StopAt{Replica: 0, Step: 13, Reason: "the node holding stage 1 is stopping"}}},
		at{2, Stopping{From: from(0, 0), Step: 14}, nil}, // one stop at a time
		at{3, StageStopped{From: from(1, 0), Failed: true, Error: "node shutting down"}, acts{KeepEnd{1, 0}}},
		at{4, PeerLost{node(1, 0)}, nil}, // stopped already
		at{5, StageStopped{From: from(0, 0), Failed: true, Error: "stopped by the launcher after step 13"},
			acts{KeepEnd{0, 0}, Abort{why}, Finish{RunDown, why}}},
	)

	// A stage that never stops is waited for StopWait.
	r = mustNew(t, grid(2, 1, 40))
	script(t, r,
		at{1, Stopping{From: from(1, 0), Step: 13}, acts{StopAt{Replica: 0, Step: 13, Reason: "the node holding stage 1 is stopping"}}},
		at{1 + StopWait.Seconds(), Tick{}, nil},
		at{2 + StopWait.Seconds(), Tick{}, acts{Abort{why + " (not every stage had stopped 15s later)"}, Finish{RunDown, why + " (not every stage had stopped 15s later)"}}},
	)
}

func TestAFailedStageFailsTheRun(t *testing.T) {
	cases := []struct {
		name string
		c    Config
		e    StageStopped
		want []Action
	}{
		{"a refused run, replicas or not", grid(2, 3, 4), StageStopped{From: from(1, 2), Failed: true, Error: "refused: bad spec"},
			acts{KeepEnd{1, 2}, Abort{"stage 1 failed"}, Finish{RunFailed, "stage 1 of replica 2 on s1r2: refused: bad spec"}}},
		{"diverged", grid(2, 3, 4), StageStopped{From: from(1, 2), Failed: true, Error: "NaN", Diverged: true},
			acts{KeepEnd{1, 2}, Abort{"NaN"}, Finish{RunDiverged, "NaN (node s1r2)"}}},
		{"no checkpoint written", grid(2, 1, 4), StageStopped{From: from(0, 0), Failed: true, Error: "disk full", CheckpointFailed: true},
			acts{KeepEnd{0, 0}, Abort{"stage 0 could not write its checkpoint"},
				Finish{RunFailed, "stage 0 on s0r0 disk full (free space or fix the disk on that node, then continue with launch --resume)"}}},
		{"the only pipeline", grid(2, 1, 4), StageStopped{From: from(0, 0), Failed: true, Error: "stream reset"},
			acts{KeepEnd{0, 0}, Abort{"stage 0 on s0r0 stopped: stream reset"}, Finish{RunDown, "stage 0 on s0r0 stopped: stream reset"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			script(t, mustNew(t, tc.c), at{1, tc.e, tc.want})
		})
	}
	// The last whole pipeline lost, of several.
	r := mustNew(t, grid(1, 2, 4))
	r.Handle(t0, StageStopped{From: from(0, 0), Error: "idle"})
	script(t, r, at{1, StageStopped{From: from(0, 1), Error: "idle"},
		acts{KeepEnd{0, 1}, Abort{"stage 0 of replica 1 on s0r1 stopped: idle"}, Finish{RunDown, "stage 0 of replica 1 on s0r1 stopped: idle"}}})
	script(t, mustNew(t, grid(1, 1, 4)), at{1, Interrupted{}, acts{Abort{"launcher interrupted"}, Finish{RunInterrupted, "launcher interrupted"}}})
}

func TestACheckpointDueByTimeIsOrderedAndCountsOnceTaken(t *testing.T) {
	c := grid(1, 1, 100)
	c.CheckpointEvery = 10 * time.Second
	r := mustNew(t, c)
	var ordered int
	for i := 1; i <= 12; i++ {
		for _, a := range r.Handle(t0.Add(time.Duration(i)*time.Second), StepTaken{From: from(0, 0), Step: i}) {
			if o, ok := a.(OrderCheckpoint); ok {
				ordered = o.Step
			}
		}
	}
	if ordered != 13 {
		t.Fatalf("ordered a checkpoint at step %d, want 13: 10 s in, two steps ahead plus a second's lead", ordered)
	}
	script(t, r,
		at{12.5, CheckpointTaken{13}, nil},
		at{13, StepTaken{From: from(0, 0), Step: 13}, acts{WriteStep{metrics.Step{Step: 13, Tokens: 1300, TokensPerS: 100, ElapsedS: 13}}, TellRecorded{13}}},
	)
}

// In a run whose stages trail the rows (an async pipeline's first stage), a
// checkpoint step is told recorded, and the older checkpoints pruned, only once every
// stage has taken it: Trail steps after its row, by the count rule and the time rule.
func TestACheckpointIsToldRecordedOnlyOnceTheTrailingStagesHaveTakenIt(t *testing.T) {
	c := grid(3, 1, 100)
	c.CheckpointInterval, c.Trail = 10, 3
	r := mustNew(t, c)
	told := map[int]int{} // step whose row came -> step told recorded
	for step := 1; step <= 23; step++ {
		if step == 14 {
			r.Handle(t0.Add(time.Duration(step)*time.Second-time.Millisecond), CheckpointTaken{15}) // ordered by time
		}
		for _, a := range r.Handle(t0.Add(time.Duration(step)*time.Second), StepTaken{From: from(2, 0), Step: step}) {
			if tr, ok := a.(TellRecorded); ok {
				told[step] = tr.Step
			}
		}
	}
	if want := map[int]int{13: 10, 18: 15, 23: 20}; !reflect.DeepEqual(told, want) {
		t.Errorf("told recorded (at the row of: step) %v, want %v", told, want)
	}
}

func TestNewRefusesABadGrid(t *testing.T) {
	c := grid(2, 2, 4)
	c.Cells = c.Cells[:3]
	if _, err := New(c, t0); err == nil {
		t.Error("3 cells for 2×2 accepted")
	}
	c = grid(2, 2, 4)
	c.Cells[3].Replica = 0
	if _, err := New(c, t0); err == nil || !strings.Contains(err.Error(), "twice") {
		t.Errorf("a cell twice: %v", err)
	}
}

// Whatever the events, in whatever order, a Run does not panic, is deterministic, and
// says nothing once it has finished.
func TestRandomEventsAreDeterministicAndNothingFollowsFinish(t *testing.T) {
	run := func(seed uint64) string {
		rng := rand.New(rand.NewPCG(seed, 2))
		r := mustNew(t, grid(2, 3, 6))
		var trace strings.Builder
		now := t0
		finished := false
		for range 400 {
			now = now.Add(time.Duration(rng.IntN(3000)) * time.Millisecond)
			s, rp := rng.IntN(2), rng.IntN(3)
			f := from(s, rp)
			var e Event
			switch rng.IntN(10) {
			case 0:
				e = StepTaken{From: f, Step: 1 + rng.IntN(6), Loss: 1}
			case 1:
				e = Evaluated{From: f, Step: 1 + rng.IntN(6), ValLoss: 1}
			case 2:
				e = OuterTaken{From: f, Step: 2 * (1 + rng.IntN(3)), Hash: "h", Missing: []Missing{{rng.IntN(3), rng.IntN(2) == 0}}}
			case 3:
				e = StageDone{f}
			case 4:
				e = Stopping{From: f, Step: rng.IntN(6)}
			case 5:
				e = StageStopped{From: f, Error: "idle"}
			case 6:
				e = PeerLost{node(s, rp)}
			case 7:
				e = OfferAnswered{Replica: rp, Peer: node(rng.IntN(2), rng.IntN(3)), Answered: rng.IntN(2) == 0, MaxStages: 1, Memory: 2000}
			case 8:
				e = JoinDone{Replica: rp, Nonce: 0, Err: []error{nil, errors.New("no")}[rng.IntN(2)]}
			default:
				e = Tick{}
			}
			out := r.Handle(now, e)
			if finished && len(out) > 0 {
				t.Fatalf("seed %d: %#v after Finish", seed, out)
			}
			for _, a := range out {
				if _, ok := a.(Finish); ok {
					finished = true
				}
			}
			for _, a := range quiet(out) {
				b, _ := json.Marshal(a)
				fmt.Fprintf(&trace, "%T %s\n", a, b)
			}
		}
		return trace.String()
	}
	for seed := range uint64(50) {
		if a, b := run(seed), run(seed); a != b {
			t.Fatalf("seed %d: two runs of the same events differ", seed)
		}
	}
}
