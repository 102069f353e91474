package core

import (
	"fmt"
	"testing"
)

func TestAsyncFourStagesFourMicroBatches(t *testing.T) {
	a := Async{Stages: 4, MicroBatches: 4}
	var bounds, maxes []int
	var delays []float64
	for s := range 4 {
		bounds, delays, maxes = append(bounds, a.Bound(s)), append(delays, a.Delay(s)), append(maxes, a.MaxDelay(s))
	}
	if got, want := fmt.Sprint(bounds, delays, maxes), "[4 3 2 1] [0.75 0.5 0.25 0] [1 1 1 0]"; got != want {
		t.Errorf("bounds, delays, max delays = %s, want %s", got, want)
	}
	// Stage 0 of two updates, as it runs: four forwards on the initial weights, then
	// one backward, one forward.
	if got, want := fmt.Sprint(a.Order(0, 8)), "[F0@0 F1@0 F2@0 F3@0 B0@0 F4@0 B1@0 F5@0 B2@0 F6@0 B3@0 U3@1 F7@1 B4@1 B5@1 B6@1 B7@1 U7@2]"; got != want {
		t.Errorf("stage 0 order:\n got %s\nwant %s", got, want)
	}
	if got, want := fmt.Sprint(a.Order(3, 4)), "[F0@0 B0@0 F1@0 B1@0 F2@0 B2@0 F3@0 B3@0 U3@1]"; got != want {
		t.Errorf("last stage order:\n got %s\nwant %s", got, want)
	}
}

func TestAsyncBoundFollowsInFlight(t *testing.T) {
	for _, c := range []struct {
		a    Async
		want string
	}{
		{Async{Stages: 1, MicroBatches: 4}, "[1]"},
		{Async{Stages: 2, MicroBatches: 4}, "[2 1]"},
		{Async{Stages: 4, MicroBatches: 4, InFlight: 2}, "[2 2 2 1]"},
		{Async{Stages: 4, MicroBatches: 8, InFlight: 8}, "[8 6 4 1]"},
		{Async{Stages: 3, MicroBatches: 4, InFlight: 1}, "[1 1 1]"},
	} {
		var got []int
		for s := range c.a.Stages {
			got = append(got, c.a.Bound(s))
		}
		if fmt.Sprint(got) != c.want {
			t.Errorf("%+v: bounds %v, want %s", c.a, got, c.want)
		}
	}
}

// TestAsyncOrderMatchesVersionsAndRuns checks, over many shapes, that the versions
// the order gives each forward and backward are the ones ForwardVersion and
// BackwardVersion say, that the delays are within MaxDelay and average Delay, and that
// the stages' orders run to the end together: every forward's input and every
// backward's gradient is produced by an op that some stage can run first.
func TestAsyncOrderMatchesVersionsAndRuns(t *testing.T) {
	for S := 1; S <= 6; S++ {
		for M := 1; M <= 6; M++ {
			for K := 0; K <= M; K++ {
				a := Async{Stages: S, MicroBatches: M, InFlight: K}
				if err := a.Validate(); err != nil {
					t.Fatal(err)
				}
				n := M * 5
				orders := make([][]AsyncOp, S)
				for s := range S {
					orders[s] = a.Order(s, n)
					if len(orders[s]) != 2*n+n/M {
						t.Fatalf("%+v stage %d: %d ops, want %d", a, s, len(orders[s]), 2*n+n/M)
					}
					maxSeen, sum, count := 0, 0, 0
					for _, op := range orders[s] {
						switch op.Kind {
						case AsyncForward:
							if v := a.ForwardVersion(s, op.Micro); v != op.Version {
								t.Fatalf("%+v stage %d: F%d runs on %d, ForwardVersion says %d", a, s, op.Micro, op.Version, v)
							}
						case AsyncBackward:
							if v := a.BackwardVersion(op.Micro); v != op.Version {
								t.Fatalf("%+v stage %d: B%d runs on %d, BackwardVersion says %d", a, s, op.Micro, op.Version, v)
							}
							d := op.Version - a.ForwardVersion(s, op.Micro)
							maxSeen = max(maxSeen, d)
							if op.Micro >= M*(1+a.MaxDelay(s)) && op.Micro < M*(2+a.MaxDelay(s)) {
								sum, count = sum+d, count+1
							}
						}
					}
					if maxSeen > a.MaxDelay(s) {
						t.Errorf("%+v stage %d: a delay of %d, MaxDelay %d", a, s, maxSeen, a.MaxDelay(s))
					}
					if count > 0 && float64(sum)/float64(count) != a.Delay(s) {
						t.Errorf("%+v stage %d: mean delay %v, Delay %v", a, s, float64(sum)/float64(count), a.Delay(s))
					}
				}
				runTogether(t, a, orders, n)
			}
		}
	}
}

// runTogether runs the stages' orders, each stage taking its next op when what it
// needs is done, and fails if they stop before the end.
func runTogether(t *testing.T, a Async, orders [][]AsyncOp, n int) {
	t.Helper()
	S := a.Stages
	fwd, bwd := make([][]bool, S), make([][]bool, S)
	for s := range S {
		fwd[s], bwd[s] = make([]bool, n), make([]bool, n)
	}
	next := make([]int, S)
	for progress := true; progress; {
		progress = false
		for s := range S {
			if next[s] == len(orders[s]) {
				continue
			}
			op := orders[s][next[s]]
			ready := true
			switch op.Kind {
			case AsyncForward:
				ready = s == 0 || fwd[s-1][op.Micro]
			case AsyncBackward:
				ready = fwd[s][op.Micro] && (s == S-1 || bwd[s+1][op.Micro])
			}
			if !ready {
				continue
			}
			switch op.Kind {
			case AsyncForward:
				fwd[s][op.Micro] = true
			case AsyncBackward:
				bwd[s][op.Micro] = true
			}
			next[s]++
			progress = true
		}
	}
	for s := range S {
		if next[s] != len(orders[s]) {
			t.Fatalf("%+v: stage %d stuck before %v", a, s, orders[s][next[s]])
		}
	}
}

// Once the last stage has taken update k, every stage has taken k − Trail updates at
// least, and stage 0 may have taken no more: in its order the forward of k's last
// micro-batch, which the last stage needs, follows that many updates. In-flight bounds
// past micro_batches included (forwards then span updates).
func TestAsyncTrailIsHowFarAStageCanBeBehindTheLast(t *testing.T) {
	for S := 1; S <= 6; S++ {
		for M := 1; M <= 4; M++ {
			for K := 0; K <= 3*M; K++ {
				a := Async{Stages: S, MicroBatches: M, InFlight: K}
				n := M * (a.Trail() + 4)
				tight := false
				for s := range S {
					order := a.Order(s, n)
					for k := 1; k <= n/M; k++ {
						taken := 0 // updates before the forward of k's last micro-batch
						for _, op := range order {
							if op.Kind == AsyncForward && op.Micro == k*M-1 {
								break
							}
							if op.Kind == AsyncUpdate {
								taken++
							}
						}
						if taken < k-a.Trail() {
							t.Fatalf("%+v: stage %d has taken %d updates when the last stage can take update %d; Trail %d", a, s, taken, k, a.Trail())
						}
						tight = tight || (s == 0 && taken == max(0, k-a.Trail()))
					}
				}
				if !tight {
					t.Errorf("%+v: stage 0 never trails the last stage by Trail %d", a, a.Trail())
				}
			}
		}
	}
}
