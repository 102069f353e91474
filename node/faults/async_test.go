package faults

import (
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// asyncPauseSpec is an async run whose stage 0 holds six forwards ahead of its
// backwards over updates of two micro-batches: forwards span three updates, and the
// first stage takes an update up to three updates after the last has reported it.
const asyncPauseSpec = `name: async-pause
seed: 37
eval_interval: 10
checkpoint_interval: 5
model: {d_model: 32, n_layers: 3, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 3, micro_batches: 2, in_flight: 6, pause_timeout: 120, schedule: async}
train: {batch_size: 4, steps: 60, lr: 0.003, warmup: 2, delay: nesterov}
data: {val_fraction: 0.005}
`

// The only node of the middle stage of an async run killed the moment the launcher
// records update 25, a checkpoint step: the last stage has taken it, and goes on
// with the forwards it already has, but stage 0, trailing it, waits for gradients
// that no longer come and never takes it. The run pauses, naming stage 1's node, and
// when the node is back on its data directory it resumes from the newest update
// every stage checkpointed (the last stage kept it, although a later one was
// recorded), running again, on the past weight versions that checkpoint keeps, the
// forwards that were in flight at it. Every update's loss is then the uninterrupted
// run's (train's), bit for bit.
func TestAsyncRunPausesWhileAStageHasNoNodeAndResumesExactlyWhenItIsBack(t *testing.T) {
	killMiddleStageAtStep25(t, asyncPauseSpec)
}

// killMiddleStageAtStep25 launches a run of src (3 stages, a checkpoint every 5 steps,
// an evaluation every 10) on three nodes, kills stage 1's the moment the launcher
// records step 25, restarts it once the run has paused, and checks that the pause
// names it and that the run resumed from a checkpoint step stage 0 could hold, 20 or
// 25, and took train's steps.
func killMiddleStageAtStep25(t *testing.T, src string) {
	t.Helper()
	sw := newSwarm(t, 3)
	sp := mustSpec(t, src)
	out := filepath.Join(sw.dir, "launched")
	l := sw.launch(sp, out, false, sw.peers())
	const at = 25         // not an evaluated step: its row is recorded at once
	victim := sw.nodes[1] // first fit in peer order: stage 1
	l.steps.on(0, at, victim.kill)
	l.steps.wait(t, 0, at, 90*time.Second)
	if !l.log.wait("run paused", 60*time.Second) {
		t.Fatal("the launcher did not pause the run after stage 1's only node was killed")
	}
	victim.restart()
	res, err := l.wait(t, 180*time.Second)
	if err != nil {
		t.Fatalf("launch: %v", err)
	}
	// Both neighbours wait for the middle stage: whichever reports first names it.
	if len(res.Pauses) != 1 || !strings.Contains(res.Pauses[0].Why, "stage 1 (node "+victim.id()+")") || res.Pauses[0].Restarted {
		t.Fatalf("pauses %+v; want one, for stage 1's node %s, resumed from a checkpoint", res.Pauses, victim.id())
	}
	p := res.Pauses[0]
	t.Logf("paused after step %d (%s); resumed from step %d after %.1f s", p.Recorded, p.Why, p.ResumedAt, p.WaitedS)
	// Stage 0 had taken step 20's checkpoint when the row of 25 came (it trails the
	// last stage by train.Trail steps, three at most here), and 25's at the latest.
	if p.ResumedAt != 20 && p.ResumedAt != 25 {
		t.Errorf("resumed from step %d; want 20 or 25, the checkpoint steps every stage could hold", p.ResumedAt)
	}
	sameAsTrain(t, sp, out)
}
