package assign

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/stage"
	"github.com/pipeswarm/pipeswarm/shard"
)

func TestAsyncStagesCountTheirPastWeightVersions(t *testing.T) {
	// small cut in 4 stages of 2 blocks: a block holds 2d + 4d² + 3Fd = 791,040
	// parameters; stage 0 adds the embedding (Vd = 65,536), the last the final norm and
	// the head (d + Vd = 65,792). Async with 16 in flight over updates of 4
	// micro-batches: the stages run 16, 11, 6 and 1 forwards ahead, which reach back
	// ⌈15/4⌉ = 4, ⌈10/4⌉ = 3, ⌈5/4⌉ = 2 and 0 updates; each version is 4 bytes a
	// parameter.
	ranges, _ := shard.SplitLayers(small.NLayers, 4)
	for _, tc := range []struct {
		name     string
		p        Schedule
		versions []int
		stashed  []int64
	}{
		{"async, 16 in flight", Schedule{Stages: 4, MicroBatches: 4, InFlight: 16, Async: true},
			[]int{4, 3, 2, 0}, []int64{4 * 4 * 1_647_616, 3 * 4 * 1_582_080, 2 * 4 * 1_582_080, 0}},
		// In flight 0: 4, 3, 2, 1 ahead, within one update but the one before it.
		{"async, 1F1B bound", Schedule{Stages: 4, MicroBatches: 4, Async: true},
			[]int{1, 1, 1, 0}, []int64{4 * 1_647_616, 4 * 1_582_080, 4 * 1_582_080, 0}},
		{"sync", Schedule{Stages: 4, MicroBatches: 4}, []int{0, 0, 0, 0}, []int64{0, 0, 0, 0}},
		{"sync, in_flight 2", Schedule{Stages: 4, MicroBatches: 4, InFlight: 2}, []int{0, 0, 0, 0}, []int64{0, 0, 0, 0}},
	} {
		for s, r := range ranges {
			m := StageMemory(small, r, tc.p, s, microBatch, false)
			if v := tc.p.Versions(s); v != tc.versions[s] || m.Stashed != tc.stashed[s] || m.Versions() != v {
				t.Errorf("%s, stage %d: %d versions (Memory says %d), %d bytes; want %d, %d", tc.name, s, v, m.Versions(), m.Stashed, tc.versions[s], tc.stashed[s])
			}
			if m.Total() != m.Weights+m.Grads+m.Optimizer+m.Stashed+m.Activations+m.Evaluation+m.Workspace+m.Overhead {
				t.Errorf("%s, stage %d: total %d is not the sum of %+v", tc.name, s, m.Total(), m)
			}
		}
	}
}

// The sync figures are what they were before an async stage's past versions were
// counted: the totals of small cut in 4 at micro-batch 8, recomputing and not.
func TestSyncNeedIsUnchanged(t *testing.T) {
	ranges, _ := shard.SplitLayers(small.NLayers, 4)
	p := Schedule{Stages: 4, MicroBatches: 4}
	for _, tc := range []struct {
		recompute bool
		want      []int64
	}{
		{false, syncNeeds},
		{true, syncNeedsRecompute},
	} {
		for s, r := range ranges {
			if got := Need(small, r, p, s, microBatch, tc.recompute); got != tc.want[s] {
				t.Errorf("recompute %v, stage %d: need %d, want %d", tc.recompute, s, got, tc.want[s])
			}
		}
	}
}

func TestANodeThatFitsTheSyncNeedIsRefusedTheAsyncPastVersions(t *testing.T) {
	// 2 stages of 4 micro-batches: sync and async alike keep 2 and 1 in flight, and an
	// async stage 0 keeps one past version besides, the last none.
	sync := Schedule{Stages: 2, MicroBatches: 4}
	async := sync
	async.Async = true
	ranges, _ := shard.SplitLayers(small.NLayers, 2)
	syncMem := StageMemory(small, ranges[0], sync, 0, microBatch, false)
	asyncMem := StageMemory(small, ranges[0], async, 0, microBatch, false)
	params := 4 * paramCount(small, ranges[0], true, false)
	if asyncMem.Stashed != params || asyncMem.Total()-syncMem.Total() != params {
		t.Fatalf("async stage 0 needs %d more than sync, stashing %d; want one version, %d", asyncMem.Total()-syncMem.Total(), asyncMem.Stashed, params)
	}
	last := Need(small, ranges[1], async, 1, microBatch, false)
	if last != Need(small, ranges[1], sync, 1, microBatch, false) {
		t.Fatal("the last stage of an async run keeps past versions")
	}
	// B holds exactly what stage 0 needs in a sync run, C what stage 1 needs.
	offers := []Offer{offer("C", last), offer("B", syncMem.Total())}
	plan, refusals, err := Plan(small, sync, 1, microBatch, false, offers)
	if err != nil || peers(plan)[0] != "0:B" || peers(plan)[1] != "1:C" {
		t.Fatalf("sync: plan %v, %v (%q); want stage 0 on B, stage 1 on C", peers(plan), err, refusals)
	}
	plan, refusals, err = Plan(small, async, 1, microBatch, false, offers)
	if !errors.Is(err, ErrUnstaffed) || len(plan) != 1 || plan[0].Peer != "C" {
		t.Fatalf("async: plan %v, %v; want stage 0 unstaffed", peers(plan), err)
	}
	has, needs := FormatSizes(syncMem.Total(), asyncMem.Total())
	want := fmt.Sprintf("B offers %s, stage 0 needs %s, %s of it for 1 past weight version (async schedule)", has, needs, FormatBytes(params))
	if len(refusals) != 1 || refusals[0] != want || !strings.Contains(err.Error(), want) {
		t.Errorf("async: refusals %q, error %v; want %q", refusals, err, want)
	}
	if plan[0].Memory.StashedNote() != "" {
		t.Errorf("the last stage's memory says %q; it keeps no past version", plan[0].Memory.StashedNote())
	}
}

// What staffing counts of an async stage is what its unit allocates when it readies
// for the schedule: the past versions, and with delay nesterov NAdam's moments in
// place of AdamW's, two float32 buffers of the parameters' length as AdamW's are.
func TestAsyncUnitsHoldWhatStaffingCounts(t *testing.T) {
	for _, delay := range spec.Delays {
		src := fmt.Sprintf(`name: stash
model: {d_model: 128, n_layers: 4, n_heads: 4, d_ff: 352, seq_len: 16}
pipeline: {stages: 4, micro_batches: 2, in_flight: 8, schedule: async}
train: {batch_size: 4, steps: 4, lr: 0.01, warmup: 1, delay: %s}
data: {val_fraction: 0.01}
`, delay)
		sp, err := spec.Parse([]byte(src), "stash.yaml")
		if err != nil {
			t.Fatal(err)
		}
		p := Schedule{Stages: 4, MicroBatches: 2, InFlight: 8, Async: true}
		ranges, _ := shard.SplitLayers(4, 4)
		c := stage.ModelConfig(sp)
		for s, r := range ranges {
			u, err := stage.New(sp, s, r, nil)
			if err != nil {
				t.Fatal(err)
			}
			m := StageMemory(c, r, p, s, sp.Train.BatchSize/sp.Pipeline.MicroBatches, false)
			want := m.Stashed
			if delay == spec.DelayNesterov {
				want += m.Optimizer
			}
			got := allocated(func() { err = u.SetAsync(sp, p.Versions(s), p.async().Delay(s)) })
			if err != nil {
				t.Fatal(err)
			}
			if !closeTo(got, want) {
				t.Errorf("delay %s, stage %d: SetAsync allocated %d bytes, staffing counts %d", delay, s, got, want)
			}
			if u.Kept() != m.Stashed {
				t.Errorf("delay %s, stage %d: the unit keeps %d bytes of past versions, staffing counts %d", delay, s, u.Kept(), m.Stashed)
			}
			mm, vv := u.Moments()
			if got := int64(4 * (len(mm) + len(vv))); got != m.Optimizer || m.Weights != int64(4*len(u.Stage.Params)) {
				t.Errorf("delay %s, stage %d: the update rule holds %d bytes of moments for %d parameters, staffing counts %d for %d bytes of weights",
					delay, s, got, len(u.Stage.Params), m.Optimizer, m.Weights)
			}
		}
	}
}

// syncNeeds are the needs of small's 4 stages at micro-batch 8 on the sync schedule
// of 4 micro-batches, as staffing counted them before it counted past versions;
// syncNeedsRecompute the same, recomputing.
var (
	syncNeeds          = []int64{747667456, 641417216, 536264704, 444772352}
	syncNeedsRecompute = []int64{444792832, 439500800, 435306496, 444772352}
)
