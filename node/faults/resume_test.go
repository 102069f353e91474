package faults

import (
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

const resumeSpec = `name: resume
seed: 5
eval_interval: 10
model: {d_model: 32, n_layers: 3, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 3, micro_batches: 4, in_flight: 4, pause_timeout: 0}
train: {batch_size: 4, steps: 60, lr: 0.003, warmup: 2}
data: {val_fraction: 0.005}
`

// Every node stopped (as by SIGTERM) in the middle of a run, and started again on
// its data directory: a resumed launch continues from their checkpoints, and every
// step's loss is the uninterrupted run's, which is train's, bit for bit.
func TestLaunchResumeAfterEveryNodeStoppedContinuesExactly(t *testing.T) {
	sw := newSwarm(t, 3)
	sp := mustSpec(t, resumeSpec)
	out := filepath.Join(sw.dir, "launched")

	// A resume with nothing to resume is refused before any node is asked.
	if _, err := sw.launch(sp, out, true, sw.peers()).wait(t, 30*time.Second); err == nil || !strings.Contains(err.Error(), "nothing to resume") {
		t.Fatalf("resume of an empty directory: %v; want a refusal saying there is nothing to resume", err)
	}

	first := sw.launch(sp, out, false, sw.peers())
	recorded := first.steps.wait(t, 0, 15, 90*time.Second)[0]
	var wg sync.WaitGroup
	for _, nd := range sw.nodes {
		wg.Go(nd.stop)
	}
	wg.Wait()
	if _, err := first.wait(t, 30*time.Second); err == nil {
		t.Fatal("the launch whose nodes all stopped succeeded")
	}

	for _, nd := range sw.nodes {
		nd.restart()
	}
	res, err := sw.launch(sp, out, true, sw.peers()).wait(t, 120*time.Second)
	if err != nil {
		t.Fatalf("resumed launch: %v", err)
	}
	t.Logf("stopped with %d steps recorded; resumed after step %d", recorded, res.FromStep)
	// The stages stop on a common step, so nothing recorded is taken again.
	if res.FromStep < recorded {
		t.Errorf("resumed after step %d, but %d steps had been recorded: the stages did not stop on a common step", res.FromStep, recorded)
	}
	sameAsTrain(t, sp, out)
}

const pauseSpec = `name: pause
seed: 23
eval_interval: 10
checkpoint_interval: 10
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 2, micro_batches: 2, in_flight: 2, pause_timeout: 120}
train: {batch_size: 4, steps: 80, lr: 0.003, warmup: 2}
data: {val_fraction: 0.005}
`

// The only node of a stage killed mid-run: the run pauses rather than fails, saying
// which stage, and when the node is back on its data directory it resumes from the
// newest step both stages checkpointed. Every step's loss is then the uninterrupted
// run's (train's), bit for bit.
func TestRunPausesWhileAStageHasNoNodeAndResumesExactlyWhenItIsBack(t *testing.T) {
	sw := newSwarm(t, 2)
	sp := mustSpec(t, pauseSpec)
	out := filepath.Join(sw.dir, "launched")
	l := sw.launch(sp, out, false, sw.peers())
	l.steps.wait(t, 0, 25, 90*time.Second)
	victim := sw.nodes[1]
	victim.kill()
	if !l.log.wait("run paused", 60*time.Second) {
		t.Fatal("the launcher did not pause the run after stage 1's only node was killed")
	}
	victim.restart()
	res, err := l.wait(t, 180*time.Second)
	if err != nil {
		t.Fatalf("launch: %v", err)
	}
	if len(res.Pauses) != 1 || !strings.Contains(res.Pauses[0].Why, "stage 1") || res.Pauses[0].ResumedAt == 0 {
		t.Fatalf("pauses %+v; want one, for stage 1, resumed from a checkpoint", res.Pauses)
	}
	p := res.Pauses[0]
	t.Logf("paused after step %d (%s); resumed from step %d after %.1f s", p.Recorded, p.Why, p.ResumedAt, p.WaitedS)
	if p.ResumedAt%10 != 0 || p.ResumedAt < 20 {
		t.Errorf("resumed from step %d; want a checkpoint step (a multiple of 10) at or after 20, the node was killed after step 25", p.ResumedAt)
	}
	if !strings.Contains(l.log.String(), "run resumed") {
		t.Errorf("the launcher did not log that the run resumed")
	}
	sameAsTrain(t, sp, out)
}

// The same in a sync run that does not clip: each stage steps on its own backwards,
// so the last stage takes step 25 while stage 0 waits for the gradients of its last
// micro-batches, which the killed middle stage never sends: the last stage keeps
// step 20's checkpoint until every stage has taken a later one.
func TestRunWithoutClippingPausedAtAStepStage0NeverTookResumesFromTheOneBefore(t *testing.T) {
	src := strings.NewReplacer("name: async-pause", "name: sync-pause", ", schedule: async}", "}", "in_flight: 6", "in_flight: 2",
		"delay: nesterov}", "grad_clip: 0}").Replace(asyncPauseSpec)
	killMiddleStageAtStep25(t, src)
}

// A node that hangs (its link silent: its connections stay up, it sends nothing) is
// found by its neighbours' deadlines, and the launch fails naming its stage and node.
func TestHungNodeIsDetectedWithinItsDeadlineAndNamed(t *testing.T) {
	sw := newSwarm(t, 3)
	sp := mustSpec(t, strings.Replace(resumeSpec, "steps: 60", "steps: 100000", 1))
	l := sw.launch(sp, filepath.Join(sw.dir, "launched"), false, sw.peers())
	l.steps.wait(t, 0, 20, 90*time.Second)
	hung := sw.nodes[1] // first fit in peer order: stage 1
	hung.hang(true)
	hungAt := time.Now()
	_, err := l.wait(t, 60*time.Second)
	t.Logf("the run failed %s after the node hung: %v", time.Since(hungAt).Round(time.Millisecond), err)
	if err == nil {
		t.Fatal("the launch succeeded with a hung node")
	}
	if msg := err.Error(); !strings.Contains(msg, "stalled") || !strings.Contains(msg, "stage 1") || !strings.Contains(msg, hung.id()) {
		t.Errorf("the launch's error does not name stage 1 and its node %s as stalled: %v", hung.id(), err)
	}
}
