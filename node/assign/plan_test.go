package assign

import (
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/shard"
)

// small is a model with stages of a few hundred MiB at micro-batch 8.
var small = shard.Config{Vocab: 256, DModel: 256, NLayers: 8, NHeads: 8, DFF: 688, SeqLen: 256, RopeTheta: 1e4, NormEps: 1e-5}

const (
	microBatch   = 8
	microBatches = 2
)

// needs returns what each stage of small cut in n needs, by Need.
func needs(t *testing.T, n int) []int64 {
	t.Helper()
	ranges, err := shard.SplitLayers(small.NLayers, n)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]int64, n)
	for s, r := range ranges {
		out[s] = Need(small, r, Schedule{Stages: n, MicroBatches: microBatches}, s, microBatch, false)
	}
	return out
}

func offer(peer string, mem int64) Offer {
	return Offer{Peer: peer, Addrs: []string{"/ip4/10.0.0.1/tcp/4001/p2p/" + peer}, MemoryBytes: mem, MaxStages: 1}
}

func peers(plan []Assignment) []string {
	var ps []string
	for _, a := range plan {
		ps = append(ps, fmt.Sprintf("%d:%s", a.Stage, a.Peer))
	}
	return ps
}

func TestPlanGivesEachStageTheNextOfferThatFits(t *testing.T) {
	offers := []Offer{offer("A", 8<<30), offer("B", 8<<30), offer("C", 8<<30), offer("D", 8<<30)}
	plan, refusals, err := Plan(small, Schedule{Stages: 3, MicroBatches: microBatches}, 1, microBatch, false, offers)
	if err != nil || len(refusals) != 0 {
		t.Fatalf("Plan: %v, refusals %q", err, refusals)
	}
	ranges, _ := shard.SplitLayers(small.NLayers, 3)
	n := needs(t, 3)
	want := []Assignment{
		{Stage: 0, Peer: "A", Addrs: offers[0].Addrs, Range: ranges[0], Need: n[0],
			Memory: StageMemory(small, ranges[0], Schedule{Stages: 3, MicroBatches: microBatches}, 0, microBatch, false)},
		{Stage: 1, Peer: "B", Addrs: offers[1].Addrs, Range: ranges[1], Need: n[1],
			Memory: StageMemory(small, ranges[1], Schedule{Stages: 3, MicroBatches: microBatches}, 1, microBatch, false)},
		{Stage: 2, Peer: "C", Addrs: offers[2].Addrs, Range: ranges[2], Need: n[2],
			Memory: StageMemory(small, ranges[2], Schedule{Stages: 3, MicroBatches: microBatches}, 2, microBatch, false)},
	}
	if !reflect.DeepEqual(plan, want) {
		t.Errorf("plan %+v\nwant %+v", plan, want)
	}
}

func TestStageNeedKeepsAtMostTheOneFOneBMicroBatchesInFlight(t *testing.T) {
	// With 4 stages and 2 micro-batches per step, stages 0-2 hold 2 tapes and stage 3 one.
	ranges, _ := shard.SplitLayers(small.NLayers, 4)
	plan, _, err := Plan(small, Schedule{Stages: 4, MicroBatches: microBatches}, 1, microBatch, false, []Offer{
		offer("A", 8<<30), offer("B", 8<<30), offer("C", 8<<30), offer("D", 8<<30)})
	if err != nil {
		t.Fatal(err)
	}
	for s, slots := range []int{2, 2, 2, 1} {
		in, blocks := tapeBytes(small, ranges[s], s == 0, s == 3, microBatch, small.SeqLen)
		if want := int64(slots) * (in + blocks); plan[s].Memory.Activations != want || plan[s].Need != plan[s].Memory.Total() {
			t.Errorf("stage %d: activations %d, want %d (%d slots); need %d, total of the parts %d", s, plan[s].Memory.Activations, want, slots, plan[s].Need, plan[s].Memory.Total())
		}
	}
	// The first stage holds the embedding and the last the head, but the middle ones are alike.
	if plan[1].Need != plan[2].Need {
		t.Errorf("middle stages need %d and %d, want the same", plan[1].Need, plan[2].Need)
	}
}

func TestPlanSkipsAPeerTooSmallForAnyStageWithAReason(t *testing.T) {
	n := needs(t, 2)
	offers := []Offer{offer("tiny", 256<<20), offer("A", n[0]), offer("B", n[1])}
	plan, refusals, err := Plan(small, Schedule{Stages: 2, MicroBatches: microBatches}, 1, microBatch, false, offers)
	if err != nil {
		t.Fatal(err)
	}
	if got := peers(plan); !slices.Equal(got, []string{"0:A", "1:B"}) {
		t.Errorf("plan %v, want A and B", got)
	}
	smallest := min(n[0], n[1])
	s := slices.Index(n, smallest)
	want := fmt.Sprintf("tiny offers 256 MiB, stage %d needs %s", s, FormatBytes(smallest))
	if !slices.Equal(refusals, []string{want}) {
		t.Errorf("refusals %q, want %q", refusals, want)
	}
}

func TestPlanGivesAPeerAtMostOneStage(t *testing.T) {
	offers := []Offer{offer("A", 8<<30), offer("A", 8<<30), offer("B", 8<<30)}
	plan, refusals, err := Plan(small, Schedule{Stages: 3, MicroBatches: microBatches}, 1, microBatch, false, offers)
	if got := peers(plan); !slices.Equal(got, []string{"0:A", "1:B"}) {
		t.Errorf("plan %v, want A and B only", got)
	}
	want := "run cannot be staffed: stage 2 has no peer: A offered more than once; only its first offer is used"
	if !errors.Is(err, ErrUnstaffed) || err.Error() != want {
		t.Errorf("error = %v\nwant %q", err, want)
	}
	if len(refusals) != 1 {
		t.Errorf("refusals %q, want the repeated offer", refusals)
	}
}

func TestPlanRefusesAPeerWithNoFreeStageSlot(t *testing.T) {
	full := offer("full", 8<<30)
	full.MaxStages = 0
	plan, refusals, err := Plan(small, Schedule{Stages: 1, MicroBatches: microBatches}, 1, microBatch, false, []Offer{full, offer("A", 8<<30)})
	if err != nil {
		t.Fatal(err)
	}
	if got := peers(plan); !slices.Equal(got, []string{"0:A"}) {
		t.Errorf("plan %v, want A", got)
	}
	if want := []string{"full has no free stage slot (max_stages 0)"}; !slices.Equal(refusals, want) {
		t.Errorf("refusals %q, want %q", refusals, want)
	}
}

func TestUnstaffedRunReturnsPartialPlanNamingMissingStagesAndRefusals(t *testing.T) {
	n := needs(t, 4) // stages 0-2 hold two tapes each, stage 3 one: stage 3 is the smallest
	offers := []Offer{offer("A", n[0]), offer("B", n[3]), offer("C", 256<<20)}
	if n[3] >= n[1] || n[3] >= n[2] {
		t.Fatalf("needs %v: want stage 3 smaller than stages 1 and 2", n)
	}
	plan, refusals, err := Plan(small, Schedule{Stages: 4, MicroBatches: microBatches}, 1, microBatch, false, offers)
	if got := peers(plan); !slices.Equal(got, []string{"0:A", "3:B"}) {
		t.Errorf("partial plan %v, want A on stage 0 and B on stage 3", got)
	}
	want := fmt.Sprintf("run cannot be staffed: stages 1, 2 have no peer: C offers 256 MiB, stage 1 needs %s", FormatBytes(n[1]))
	if !errors.Is(err, ErrUnstaffed) || err.Error() != want {
		t.Errorf("error = %v\nwant %q", err, want)
	}
	if len(refusals) != 1 || !strings.HasPrefix(refusals[0], "C offers") {
		t.Errorf("refusals %q, want C's", refusals)
	}
}

func TestUnstaffedForLackOfPeersSaysSo(t *testing.T) {
	_, _, err := Plan(small, Schedule{Stages: 2, MicroBatches: microBatches}, 1, microBatch, false, nil)
	if want := "run cannot be staffed: stages 0, 1 have no peer: no peer offered to train"; !errors.Is(err, ErrUnstaffed) || err.Error() != want {
		t.Errorf("no offers: %v\nwant %q", err, want)
	}
	plan, refusals, err := Plan(small, Schedule{Stages: 2, MicroBatches: microBatches}, 1, microBatch, false, []Offer{offer("A", 8<<30)})
	if want := "run cannot be staffed: stage 1 has no peer: every peer that offered holds another stage"; !errors.Is(err, ErrUnstaffed) || err.Error() != want {
		t.Errorf("one offer: %v\nwant %q", err, want)
	}
	if len(plan) != 1 || len(refusals) != 0 {
		t.Errorf("one offer: plan %+v, refusals %q", plan, refusals)
	}
}

func TestRefusalShowsExactBytesWhenRoundingHidesTheGap(t *testing.T) {
	need := needs(t, 1)[0]
	_, refusals, err := Plan(small, Schedule{Stages: 1, MicroBatches: microBatches}, 1, microBatch, false, []Offer{offer("A", need-1)})
	want := fmt.Sprintf("A offers %s (%d B), stage 0 needs %s (%d B)", FormatBytes(need), need-1, FormatBytes(need), need)
	if !errors.Is(err, ErrUnstaffed) || !slices.Equal(refusals, []string{want}) {
		t.Errorf("refusals %q (%v), want %q", refusals, err, want)
	}
}

func TestPlanRejectsImpossibleRequests(t *testing.T) {
	bad := small
	bad.NHeads = 3
	for name, tc := range map[string]struct {
		c          shard.Config
		p          Schedule
		microBatch int
	}{
		"more stages than layers": {small, Schedule{Stages: 9, MicroBatches: 1}, 1},
		"no stages":               {small, Schedule{Stages: 0, MicroBatches: 1}, 1},
		"empty micro-batch":       {small, Schedule{Stages: 2, MicroBatches: 1}, 0},
		"no micro-batches":        {small, Schedule{Stages: 2, MicroBatches: 0}, 1},
		"negative in flight":      {small, Schedule{Stages: 2, MicroBatches: 1, InFlight: -1}, 1},
		"bad model":               {bad, Schedule{Stages: 2, MicroBatches: 1}, 1},
	} {
		if _, _, err := Plan(tc.c, tc.p, 1, tc.microBatch, false, nil); err == nil || errors.Is(err, ErrUnstaffed) {
			t.Errorf("%s: error = %v, want one that is not ErrUnstaffed", name, err)
		}
	}
	if _, _, err := Plan(small, Schedule{Stages: 9, MicroBatches: 1}, 1, 1, false, nil); !errors.Is(err, shard.ErrConfig) {
		t.Errorf("more stages than layers: %v, want shard.ErrConfig", err)
	}
}

func TestPlanStaffsEveryStageOfEveryReplica(t *testing.T) {
	var offers []Offer
	for _, p := range []string{"A", "B", "C", "D", "E"} {
		offers = append(offers, offer(p, 8<<30))
	}
	plan, _, err := Plan(small, Schedule{Stages: 2, MicroBatches: microBatches}, 3, microBatch, false, offers)
	if !errors.Is(err, ErrUnstaffed) || !strings.Contains(err.Error(), "1/2") {
		t.Fatalf("5 peers for 2 stages × 3 replicas: error %v, want ErrUnstaffed naming cell 1/2 (stage/replica)", err)
	}
	offers = append(offers, offer("F", 8<<30))
	plan, _, err = Plan(small, Schedule{Stages: 2, MicroBatches: microBatches}, 3, microBatch, false, offers)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, a := range plan {
		got = append(got, fmt.Sprintf("%d/%d:%s", a.Stage, a.Replica, a.Peer))
	}
	if want := []string{"0/0:A", "1/0:B", "0/1:C", "1/1:D", "0/2:E", "1/2:F"}; !slices.Equal(got, want) {
		t.Errorf("grid %v, want %v (replica by replica, first fit in offer order)", got, want)
	}
}

func TestRecomputeStaffsAStageOnANodeTooSmallForItsTapes(t *testing.T) {
	// 4 stages, 4 micro-batches: stage 0 keeps 4 in flight, 4 full tapes without
	// recomputation, 4 inputs and one full tape with it.
	ranges, _ := shard.SplitLayers(small.NLayers, 4)
	full := Need(small, ranges[0], Schedule{Stages: 4, MicroBatches: 4}, 0, microBatch, false)
	re := Need(small, ranges[0], Schedule{Stages: 4, MicroBatches: 4}, 0, microBatch, true)
	if re >= full {
		t.Fatalf("stage 0 needs %d recomputing, %d not: recomputing should need less", re, full)
	}
	offers := []Offer{offer("A", re), offer("B", 8<<30), offer("C", 8<<30), offer("D", 8<<30), offer("E", 8<<30)}
	plan, _, err := Plan(small, Schedule{Stages: 4, MicroBatches: 4}, 1, microBatch, false, offers)
	if err != nil || plan[0].Peer == "A" {
		t.Fatalf("without recomputation stage 0 went to %v (%v); A offers %d, less than the %d it needs", peers(plan), err, re, full)
	}
	plan, _, err = Plan(small, Schedule{Stages: 4, MicroBatches: 4}, 1, microBatch, true, offers)
	if err != nil || plan[0].Peer != "A" || plan[0].Need != re {
		t.Fatalf("recomputing: plan %v, %v; want stage 0 on A, which offers exactly the %d it needs", peers(plan), err, re)
	}
	// A node one byte short is refused, recomputing or not.
	_, refusals, err := Plan(small, Schedule{Stages: 1, MicroBatches: 1}, 1, microBatch, true, []Offer{offer("A", Need(small, shard.Range{Lo: 0, Hi: small.NLayers}, Schedule{Stages: 1, MicroBatches: 1}, 0, microBatch, true)-1)})
	if !errors.Is(err, ErrUnstaffed) || len(refusals) != 1 {
		t.Errorf("an offer one byte short: %v, refusals %q; want ErrUnstaffed naming it", err, refusals)
	}
}
