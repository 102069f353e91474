package faults

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/config"
	"github.com/pipeswarm/pipeswarm/node/launcher"
)

// recoverSpec evaluates only at the end: every checkpoint a restarted node finds was
// written by the checkpoint rules or by the stop, none by an evaluation.
const recoverSpec = `name: recover
seed: 29
eval_interval: 200
checkpoint_interval: 5
checkpoint_seconds: 0
model: {d_model: 64, n_layers: 2, n_heads: 2, d_ff: 128, seq_len: 64}
pipeline: {stages: 2, micro_batches: 2, in_flight: 2, pause_timeout: 120}
train: {batch_size: 4, steps: 40, lr: 0.003, warmup: 2}
data: {val_fraction: 0.005}
`

// restartMidRun launches a run of spec src on two nodes that have already run an
// earlier launch by the same key (its launcher gone, at another address), waits
// until ready says so, stops the stage-1 node with stop, restarts it on its data
// directory with restart, and checks that the run finishes with the
// uninterrupted run's losses, bit for bit, and went on as check says of its pause.
func restartMidRun(t *testing.T, src string, ready func(*launch, *simNode), stop func(*simNode), restart func(*simNode), check func(launcher.Pause) bool) {
	t.Helper()
	sw := newSwarm(t, 2)
	sp := mustSpec(t, src)
	earlier := *sp
	earlier.Train.Steps = 3
	if _, err := sw.launch(&earlier, filepath.Join(sw.dir, "earlier"), false, sw.peers()).wait(t, 60*time.Second); err != nil {
		t.Fatalf("the earlier launch: %v", err)
	}
	out := filepath.Join(sw.dir, "launched")
	l := sw.launch(sp, out, false, sw.peers())
	ready(l, sw.nodes[1])
	stop(sw.nodes[1])
	if !l.log.wait("run paused", 60*time.Second) {
		t.Fatal("the launcher did not pause the run")
	}
	restart(sw.nodes[1])
	res, err := l.wait(t, 180*time.Second)
	if err != nil {
		t.Fatalf("launch: %v", err)
	}
	if len(res.Pauses) != 1 || !check(res.Pauses[0]) {
		t.Errorf("pauses %+v; want one that went on as the test says", res.Pauses)
	} else {
		p := res.Pauses[0]
		t.Logf("paused after step %d (%s); resumed from step %d (restarted %v) after %.1f s", p.Recorded, p.Why, p.ResumedAt, p.Restarted, p.WaitedS)
	}
	sameAsTrain(t, sp, out)
}

func afterStep(t *testing.T, n int) func(*launch, *simNode) {
	return func(l *launch, _ *simNode) { l.steps.wait(t, 0, n, 90*time.Second) }
}

func resumed(p launcher.Pause) bool { return p.ResumedAt > 0 }

// A node stopped (as by SIGTERM) mid-run, with no evaluation since the start, and
// restarted on its data directory after an earlier run by the same launcher key: it
// tells the launcher, which stops the other stage after the same step; restarted,
// the node finds the launcher again and the run finishes exactly as if uninterrupted.
func TestNodeStoppedAndRestartedAfterAnEarlierLaunchResumesExactly(t *testing.T) {
	restartMidRun(t, strings.Replace(recoverSpec, "checkpoint_interval: 5\n", "", 1), afterStep(t, 12), (*simNode).stop, (*simNode).restartElsewhere, resumed)
}

// The same with a kill: the run resumes from the last checkpoint every stage took by
// the count rule.
func TestNodeKilledAndRestartedAfterAnEarlierLaunchRejoins(t *testing.T) {
	restartMidRun(t, recoverSpec, afterStep(t, 12), (*simNode).kill, (*simNode).restart, func(p launcher.Pause) bool { return p.ResumedAt == 10 })
}

// With the time rule only, every stage checkpoints the step the launcher picked; a
// node killed after it resumes from there.
func TestNodeKilledAfterATimedCheckpointResumesFromIt(t *testing.T) {
	src := strings.NewReplacer("checkpoint_interval: 5\ncheckpoint_seconds: 0\n", "checkpoint_seconds: 1\n", "steps: 40", "steps: 400").Replace(recoverSpec)
	restartMidRun(t, src, afterTimedCheckpoint(t), (*simNode).kill, (*simNode).restart, resumed)
}

// The same in an async run, whose stages sit at different update counts when the
// launcher orders the checkpoint (stage 0 trails, its forwards spanning two updates),
// and whose stage-1 node, the last stage, is killed once it holds it.
func TestAsyncNodeKilledAfterATimedCheckpointResumesFromIt(t *testing.T) {
	src := strings.NewReplacer("checkpoint_interval: 5\ncheckpoint_seconds: 0\n", "checkpoint_seconds: 1\n", "steps: 40", "steps: 400",
		"in_flight: 2, pause_timeout: 120}", "in_flight: 4, pause_timeout: 120, schedule: async}").Replace(recoverSpec)
	restartMidRun(t, src, afterTimedCheckpoint(t), (*simNode).kill, (*simNode).restart, resumed)
}

// afterTimedCheckpoint waits until the stage-1 node holds the run's first checkpoint
// by time and the launcher has recorded its step.
func afterTimedCheckpoint(t *testing.T) func(*launch, *simNode) {
	return func(l *launch, nd *simNode) {
		deadline := time.Now().Add(60 * time.Second)
		for {
			// The earlier run's and this one's (the state is written last).
			if ck, _ := filepath.Glob(filepath.Join(nd.dir, "runs", "*", "stage-1.state.safetensors")); len(ck) == 2 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("no checkpoint by time on the stage-1 node in 60 s")
			}
			time.Sleep(10 * time.Millisecond)
		}
		// A run resumes from no step later than the launcher has recorded: the kill
		// comes once it holds the row of the step checkpointed, as it soon would.
		m := regexp.MustCompile(`checkpoint due by time; every stage takes it at a step ahead" step=(\d+)`).FindStringSubmatch(l.log.String())
		if m == nil {
			t.Fatal("the launcher did not say which step the checkpoint by time is at")
		}
		step, _ := strconv.Atoi(m[1])
		l.steps.wait(t, 0, step, 60*time.Second)
	}
}

// No checkpoint at all before the kill: the run starts again from its beginning, says
// so, and still ends as the uninterrupted run.
func TestNodeKilledBeforeAnyCheckpointRestartsTheRunFromItsStart(t *testing.T) {
	restartMidRun(t, strings.Replace(recoverSpec, "checkpoint_interval: 5\n", "", 1), afterStep(t, 12), (*simNode).kill, (*simNode).restart,
		func(p launcher.Pause) bool { return p.Restarted && p.ResumedAt == 0 })
}

// A node whose disk is full cannot write its checkpoint: it says so, and the launcher
// stops the run with that reason at once, rather than pause for a node that is there.
// The stage-1 node's data directory is a tmpfs of 1 MiB (it needs root to mount).
func TestACheckpointThatCannotBeWrittenStopsTheRunSayingWhy(t *testing.T) {
	small := filepath.Join(t.TempDir(), "small")
	if err := os.MkdirAll(small, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", small).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a small tmpfs (needs root): %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", small).Run() })
	sw := newSwarm(t, 1)
	sw.add(func(c *config.Config) { c.DataDir = filepath.Join(small, "node") })
	sp := mustSpec(t, strings.Replace(recoverSpec, "pause_timeout: 120", "pause_timeout: 600", 1))
	l := sw.launch(sp, filepath.Join(sw.dir, "launched"), false, sw.peers())
	_, err := l.wait(t, 120*time.Second)
	t.Logf("launch: %v", err)
	if err == nil {
		t.Fatal("the launch succeeded with a stage that could not checkpoint")
	}
	if msg := err.Error(); !strings.Contains(msg, "stage 1") || !strings.Contains(msg, "could not write its checkpoint") || !strings.Contains(msg, "no space left on device") {
		t.Errorf("the launch's error does not say stage 1 could not write its checkpoint for want of space: %v", err)
	}
	if strings.Contains(l.log.String(), "run paused") {
		t.Error("the run was paused, waiting for a node that is there")
	}
}
