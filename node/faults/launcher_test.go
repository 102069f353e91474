package faults

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// killSpec is a 2 × 2 DiLoCo run whose checkpoints fall on outer steps.
const killSpec = `name: launcher-kill
seed: 31
eval_interval: 80
checkpoint_interval: 10
checkpoint_seconds: 0
model: {d_model: 64, n_layers: 2, n_heads: 2, d_ff: 128, seq_len: 64}
pipeline: {stages: 2, replicas: 2, micro_batches: 2}
train: {batch_size: 8, steps: 80, lr: 0.003, warmup: 2}
diloco: {inner_steps: 10, outer_lr: 1.0, outer_momentum: 0, sync: int8/32}
data: {val_fraction: 0.005}
`

// The launcher of a 2 × 2 DiLoCo run killed mid-run (its link cut the moment it
// records a step, then its process gone): its nodes stop the run on their own,
// keeping their checkpoints, and a resumed launch continues it; every replica's
// every step then has the loss of the uninterrupted run (train's), bit for bit.
// Three kills of one run, after steps 25, 47 and 64 of replica 0.
func TestLauncherKilledMidRunResumesExactly(t *testing.T) {
	sw := newSwarm(t, 4)
	sp := mustSpec(t, killSpec)
	out := filepath.Join(sw.dir, "launched")
	var l *launch
	for i, at := range []int{25, 47, 64} {
		l = sw.launch(sp, out, i > 0, sw.peers())
		l.steps.on(0, at, func() { l.cut(t, sw.net) })
		l.steps.wait(t, 0, at, 120*time.Second)
		l.cancel()
		<-l.done
		// Each node stops the run when it finds its launcher gone, or finishes it
		// first; before this kill each had ended one part per earlier kill.
		for _, nd := range sw.nodes {
			if !nd.log.waitFor(func(s string) bool {
				return strings.Count(s, "launcher gone; stopping the run")+strings.Count(s, "run finished") >= i+1
			}, 90*time.Second) {
				t.Fatalf("%s did not stop the run %d of its launcher gone", nd.name, i)
			}
		}
		if i == 0 {
			// Every stage, not only the first, keeps its checkpoint of the run.
			for k, nd := range sw.nodes {
				name := fmt.Sprintf("stage-%d-replica-%d.safetensors", k%2, k/2)
				if ck, _ := filepath.Glob(filepath.Join(nd.dir, "runs", "*", name)); len(ck) != 1 {
					t.Errorf("%s holds %d %s, want 1", nd.name, len(ck), name)
				}
			}
		}
		last := l.steps.wait(t, 0, at, 0)
		gone := strings.Count(sw.nodes[0].log.String(), "launcher gone; stopping the run")
		t.Logf("kill %d: launcher killed after step %d of replica 0 (replica 1 at step %d); node0 has stopped %d run part(s) of its launcher gone so far", i, at, last[1], gone)
	}
	res, err := sw.launch(sp, out, true, sw.peers()).wait(t, 120*time.Second)
	if err != nil {
		t.Fatalf("the last resumed launch: %v", err)
	}
	t.Logf("the last resumed launch went on from step %d", res.FromStep)
	sameAsTrain(t, sp, out)
}

// A launcher killed in the middle of a run (its link cut: no goodbye, as a machine
// gone) does not leave its nodes training for nobody: they stop the run, keep their
// checkpoints, free their slots and take the next run.
func TestNodesStopARunWhoseLauncherDied(t *testing.T) {
	sw := newSwarm(t, 2)
	sp := mustSpec(t, strings.Replace(killSpec, "replicas: 2, ", "", 1))
	sp.Train.Steps = 100000
	l := sw.launch(sp, filepath.Join(sw.dir, "orphaned"), false, sw.peers())
	l.steps.on(0, 12, func() { l.cut(t, sw.net) }) // after the checkpoint of step 10
	l.steps.wait(t, 0, 12, 90*time.Second)
	killed := time.Now()
	l.cancel()
	<-l.done
	// A node stops the run when it cannot reach its launcher for its grace, or when
	// its neighbour, having done so, stops: either way it keeps its checkpoint.
	for _, nd := range sw.nodes {
		if !nd.log.waitFor(func(s string) bool {
			return strings.Contains(s, "launcher gone; stopping the run") || strings.Contains(s, `msg="run stopped"`)
		}, 120*time.Second) {
			t.Fatalf("%s did not stop the orphaned run", nd.name)
		}
	}
	t.Logf("the nodes stopped the orphaned run %s after its launcher died", time.Since(killed).Round(time.Millisecond))
	gone := 0
	for i, nd := range sw.nodes {
		if strings.Contains(nd.log.String(), "launcher gone; stopping the run") {
			gone++
		}
		if ck, _ := filepath.Glob(filepath.Join(nd.dir, "runs", "*", fmt.Sprintf("stage-%d.safetensors", i))); len(ck) != 1 {
			t.Errorf("%s kept %d stage checkpoints, want 1", nd.name, len(ck))
		}
	}
	if gone == 0 {
		t.Error("no node said it stopped the run for want of its launcher")
	}
	// The slots are free again, and the stage that stopped first did not ban the one
	// still sending it frames: a new run on the same nodes goes through.
	sp2 := mustSpec(t, strings.Replace(killSpec, "replicas: 2, ", "", 1))
	sp2.Train.Steps = 6
	if _, err := sw.launch(sp2, filepath.Join(sw.dir, "next"), false, sw.peers()).wait(t, 60*time.Second); err != nil {
		t.Fatalf("a run after the orphaned one: %v", err)
	}
}
