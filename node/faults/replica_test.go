package faults

import (
	"fmt"
	"math"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/config"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
)

const rejoinSpec = `name: rejoin
seed: 17
eval_interval: 100
model: {d_model: 64, n_layers: 4, n_heads: 4, d_ff: 128, seq_len: 64}
pipeline: {stages: 2, micro_batches: 2, replicas: 2}
train: {batch_size: 8, steps: %d, lr: 0.003, warmup: 2}
diloco: {inner_steps: 20, outer_lr: 1.0, outer_momentum: 0, sync: int8/32}
data: {val_fraction: 0.01}
`

// A node killed mid-run and restarted on its data directory: its replica pipeline
// breaks, the other goes on, and when the node is back the pipeline rejoins at the
// next outer step with the stage's state fetched from the live replica, and trains
// to the end in agreement with it.
func TestKilledNodeRestartsAndItsPipelineRejoins(t *testing.T) {
	sw := newSwarmOn(t, 4, paced)
	const last = 1000 // long enough for the node to come back (see restart)
	sp := mustSpec(t, fmt.Sprintf(rejoinSpec, last))
	_, back := killedAfterStep45AndRejoined(t, sw, sp, last)
	t.Logf("replica 1 lost after step 45 and trained again from step %d to %d", back, last)
}

// killedAfterStep45AndRejoined launches sp on sw's four nodes, kills the node of stage
// 1 of replica 1 after its step 45 and restarts it once its pipeline has stopped, and
// checks that the pipeline rejoined and trained to step last in agreement with replica
// 0. It returns the run's directory and the step replica 1 trained again from.
func killedAfterStep45AndRejoined(t *testing.T, sw *swarm, sp *spec.Spec, last int) (string, int) {
	t.Helper()
	out := filepath.Join(sw.dir, "launched")
	l := sw.launch(sp, out, false, sw.peers())
	// First fit in peer order, replica by replica: node 3 holds stage 1 of replica 1.
	victim := sw.nodes[3]
	// Killed between outer steps: in the step after one, a neighbour's deadline
	// allows for the outer step too.
	l.steps.on(1, 45, victim.kill)
	l.steps.wait(t, 1, 45, 120*time.Second)
	sw.nodes[2].waitLog("idle: this replica pipeline cannot go on", 30*time.Second)
	victim.restart()
	res, err := l.wait(t, 300*time.Second)
	if err != nil {
		t.Fatalf("launch: %v", err)
	}
	if !slices.Contains(res.Rejoined, 1) {
		t.Errorf("replica pipelines rejoined: %v; want 1", res.Rejoined)
	}
	for _, nd := range sw.nodes[2:] {
		nd.waitLog("rejoined: state fetched and verified", 5*time.Second)
	}
	return out, rejoinedInAgreement(t, out, last, 45, sp.DiLoCo.InnerSteps)
}

// The async schedule with 4 forwards in flight on stage 0 (two updates' worth) and
// the delay-corrected update rule, on rejoinSpec's model and replicas, with an outer
// step every 100 updates: an async update on paced takes 25 ms, and a rejoining
// pipeline must fetch its state before the live replicas take the next outer step
// (20 updates, 0.5 s, are too few: they moved on every time, and it never rejoined).
func asyncRejoinSpec(last int) string {
	s := fmt.Sprintf(rejoinSpec, last)
	s = strings.Replace(s, "replicas: 2}", "replicas: 2, schedule: async, in_flight: 4}", 1)
	s = strings.Replace(s, "inner_steps: 20,", "inner_steps: 100,", 1)
	return strings.Replace(s, "warmup: 2}", "warmup: 2, delay: nesterov}", 1)
}

// The same in an async run: the restarted node's replica pipeline rejoins at an outer
// step, every stage of it refilling its pipeline from there on the state fetched
// (weights, NAdam's moments, outer state), and trains to the end in agreement with
// the other replica.
func TestKilledNodeOfAnAsyncRunRestartsAndItsPipelineRejoins(t *testing.T) {
	sw := newSwarmOn(t, 4, paced)
	// An async update takes 25 ms (an idle machine) to 50 ms (a loaded one) on paced,
	// measured: the restarted node, about 30 s after the kill (see restart), is back
	// before update 1300 either way, well before the end.
	const last = 2500
	sp := mustSpec(t, asyncRejoinSpec(last))
	if !sp.Pipeline.Async() || sp.Pipeline.InFlight != 4 || sp.Train.Delay != spec.DelayNesterov || sp.DiLoCo.InnerSteps != 100 {
		t.Fatalf("spec: schedule %q, in flight %d, delay %q; want async, 4, nesterov", sp.Pipeline.Schedule, sp.Pipeline.InFlight, sp.Train.Delay)
	}
	out, back := killedAfterStep45AndRejoined(t, sw, sp, last)
	// The hashes agree whatever replica 1 contributed: its losses say it trained on
	// sound weights, as well as replica 0 on its own shard of the data, from the
	// refill on (forwards on weights it does not hold would show there at once).
	steps, _ := rows(t, out)
	mean := func(r, from, to int) float64 {
		var sum float64
		for step := from; step <= to; step++ {
			sum += steps[[2]int{step, r}].Loss
		}
		return sum / float64(to-from+1)
	}
	for _, c := range []struct {
		to  int
		tol float64
	}{{back + 19, 0.10}, {last, 0.05}} {
		m0, m1 := mean(0, back, c.to), mean(1, back, c.to)
		if math.IsNaN(m1) || math.Abs(m1-m0) > c.tol*m0 {
			t.Errorf("mean loss of updates %d to %d: replica 1 %.4f, replica 0 %.4f; want within %g%%", back, c.to, m1, m0, 100*c.tol)
		}
		t.Logf("mean loss of updates %d to %d: replica 1 %.4f, replica 0 %.4f", back, c.to, m1, m0)
	}
	t.Logf("replica 1 lost after update 45 and trained again from update %d to %d", back, last)
}

// A node killed for good, and a new node that joins the swarm after the run started
// (bootstrapped from a node of it, not one of the launcher's peers): the launcher
// hears it on the heartbeat topic, it takes the gone node's cell (the stage's other
// replica counts it into its all-reduce), fetches the stage's state from the live
// replica, and the pipeline trains on in agreement.
func TestNewcomerTakesTheCellOfAKilledNode(t *testing.T) {
	sw := newSwarmOn(t, 4, paced)
	const last = 400
	sp := mustSpec(t, fmt.Sprintf(rejoinSpec, last))
	out := filepath.Join(sw.dir, "launched")
	l := sw.launch(sp, out, false, sw.peers())
	boot := sw.nodes[0].addr
	spare := sw.add(func(c *config.Config) { c.Bootstrap = []string{boot} })
	l.steps.on(1, 45, sw.nodes[3].kill) // stage 1 of replica 1
	l.steps.wait(t, 1, 45, 120*time.Second)
	res, err := l.wait(t, 300*time.Second)
	if err != nil {
		t.Fatalf("launch: %v", err)
	}
	if log := l.log.String(); !strings.Contains(log, "a newcomer takes the cell of a node gone") || !strings.Contains(log, spare.id()) {
		t.Errorf("the launcher does not say the newcomer %s took the cell", spare.id())
	}
	if !slices.Contains(res.Rejoined, 1) {
		t.Errorf("replica pipelines rejoined: %v; want 1", res.Rejoined)
	}
	spare.waitLog("rejoined: state fetched and verified", 5*time.Second)
	sw.nodes[1].waitLog("member replaced", 5*time.Second) // stage 1 of replica 0
	back := rejoinedInAgreement(t, out, last, 45, 20)
	t.Logf("replica 1 trained again, with the newcomer, from step %d", back)
}

// Two replica pipelines broken at different stages, their nodes gone for good: the
// idle survivor of the later one takes the gone cell of the earlier one (its own cell
// passes to the node gone), so the two make one whole pipeline again, which fetches
// the state, rejoins at the next outer step and trains to the end in agreement with
// replica 0.
func TestSurvivorsOfTwoBrokenPipelinesArePairedIntoOne(t *testing.T) {
	sw := newSwarmOn(t, 6, paced)
	const last = 400
	sp := mustSpec(t, strings.Replace(fmt.Sprintf(rejoinSpec, last), "replicas: 2", "replicas: 3", 1))
	out := filepath.Join(sw.dir, "launched")
	l := sw.launch(sp, out, false, sw.peers())
	// First fit in peer order, replica by replica: node 2r+s holds stage s of replica r.
	l.steps.wait(t, 1, 50, 120*time.Second)
	sw.nodes[3].kill() // stage 1 of replica 1
	sw.nodes[2].waitLog("idle: this replica pipeline cannot go on", 30*time.Second)
	sw.nodes[4].kill() // stage 0 of replica 2
	sw.nodes[5].waitLog("idle: this replica pipeline cannot go on", 30*time.Second)
	survivor := sw.nodes[5]
	res, err := l.wait(t, 300*time.Second)
	if err != nil {
		t.Fatalf("launch: %v", err)
	}
	if log := l.log.String(); !strings.Contains(log, "re-paired: the idle survivor of a broken replica pipeline takes the cell of a node gone") ||
		!strings.Contains(log, survivor.id()) {
		t.Errorf("the launcher does not say the survivor %s took the gone cell", survivor.id())
	}
	if res.Repaired != 1 || !slices.Equal(res.Rejoined, []int{1}) {
		t.Errorf("cells re-paired %d, replica pipelines rejoined %v; want 1 and [1]", res.Repaired, res.Rejoined)
	}
	survivor.waitLog("rejoined: state fetched and verified", 5*time.Second)
	back := rejoinedInAgreement(t, out, last, 50, 20)
	_, outers := rows(t, out)
	for _, o := range outers {
		if o.Replica == 2 && o.Step > 60 {
			t.Errorf("stage %d after step %d: replica 2, whose nodes are gone, reported an outer step", o.Stage, o.Step)
		}
	}
	t.Logf("replica 1 trained again, re-paired, from step %d of %d", back, last)
}

// rejoinedInAgreement checks the end of a rejoinSpec run of last steps launched into
// out whose replica pipeline 1 broke after step lost and came back: replica 0 has
// every step, replica 1 is back well before the end, and every outer step since has
// replicas 0 and 1 of both stages with equal weight hashes (the state fetched was
// the live replica's; inner is the run's outer-step interval). It returns the first
// step replica 1 trained again.
func rejoinedInAgreement(t *testing.T, out string, last, lost, inner int) int {
	t.Helper()
	steps, outers := rows(t, out)
	var back int
	for step := last; step > 0; step-- {
		if _, ok := steps[[2]int{step, 1}]; !ok {
			back = step + 1
			break
		}
	}
	if back > last-inner || back <= lost {
		t.Errorf("replica 1 trained again from step %d; want it back, after step %d, well before the end", back, lost)
	}
	for step := 1; step <= last; step++ {
		if _, ok := steps[[2]int{step, 0}]; !ok {
			t.Fatalf("replica 0 has no loss at step %d", step)
		}
	}
	by := map[[2]int]map[int]string{}
	for _, o := range outers {
		k := [2]int{o.Stage, o.Step}
		if by[k] == nil {
			by[k] = map[int]string{}
		}
		by[k][o.Replica] = o.WeightsHash
	}
	for step := back + inner - 1; step <= last; step += inner {
		for s := range 2 {
			if hs := by[[2]int{s, step}]; hs[0] == "" || hs[0] != hs[1] {
				t.Errorf("stage %d after step %d: hashes %v, want replicas 0 and 1 equal", s, step, hs)
			}
		}
	}
	return back
}

const faultSpec = `name: faults
seed: 13
eval_interval: 4
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 2, micro_batches: 2, replicas: 3}
train: {batch_size: 4, steps: 12, lr: 0.003, warmup: 2}
diloco: {inner_steps: 2, outer_lr: 1.0, outer_momentum: 0, sync: int8/32}
data: {val_fraction: 0.01}
`

// A replica that dies or hangs in the middle of an all-reduce does not stall its
// stage: the two other replicas finish the outer step within the deadline with equal
// weight hashes, the run goes on with the replica pipelines that are still whole,
// and the broken pipeline's other stage says it is idle.
func TestReplicaLostMidAllReduceIsLeftBehind(t *testing.T) {
	for _, fault := range []string{"killed", "hung"} {
		t.Run(fault, func(t *testing.T) {
			sw := newSwarm(t, 6)
			sp := mustSpec(t, faultSpec)
			// First fit in peer order, replica by replica: node 5 holds stage 1 of
			// replica 2, node 4 stage 0 of replica 2.
			victim := sw.nodes[5]
			victim.d.SetFaultStallSync(4)
			out := filepath.Join(sw.dir, "launched")
			l := sw.launch(sp, out, false, sw.peers())
			victim.waitLog("stalling mid all-reduce", 60*time.Second)
			if fault == "killed" {
				victim.kill()
			} else {
				victim.hang(true)
			}
			res, err := l.wait(t, 120*time.Second)
			if err != nil {
				t.Fatalf("launch: %v", err)
			}
			steps, outers := rows(t, out)
			for _, rep := range []int{0, 1} {
				for step := 1; step <= 12; step++ {
					if _, ok := steps[[2]int{step, rep}]; !ok {
						t.Errorf("replica %d has no loss at step %d: the whole pipelines should run to the end", rep, step)
					}
				}
			}
			if _, ok := steps[[2]int{12, 2}]; ok {
				t.Errorf("replica 2 trained to the end despite losing a stage")
			}
			// The outer step the victim hung in: stage 1's live replicas finished it
			// without it and agree.
			var got []metrics.Outer
			for _, o := range outers {
				if o.Stage == 1 && o.Step == 4 {
					got = append(got, o)
				}
			}
			if len(got) != 2 || got[0].WeightsHash != got[1].WeightsHash || got[0].Replica == 2 || got[1].Replica == 2 {
				t.Fatalf("stage 1 after step 4: outer rows %+v; want replicas 0 and 1 with equal hashes", got)
			}
			// Every later outer step goes on with the two whole pipelines, in agreement.
			by := map[[2]int][]string{}
			for _, o := range outers {
				by[[2]int{o.Stage, o.Step}] = append(by[[2]int{o.Stage, o.Step}], o.WeightsHash)
			}
			for k, hs := range by {
				if k[0] == 1 && k[1] > 4 && len(hs) != 2 {
					t.Errorf("stage %d after step %d: %d replicas synced, want 2", k[0], k[1], len(hs))
				}
				for _, h := range hs {
					if h != hs[0] {
						t.Errorf("stage %d after step %d: hashes %v differ", k[0], k[1], hs)
					}
				}
			}
			sw.nodes[4].waitLog("idle: this replica pipeline cannot go on", 10*time.Second)
			if !slices.Equal(res.Broken, []int{2}) {
				t.Errorf("replica pipelines stopped early: %v, want [2]", res.Broken)
			}
		})
	}
}

// A replica pipeline whose node hangs a few steps before an outer step holds up the
// whole pipelines' outer step only until it is found stalled: the launcher drops it
// from every stage's all-reduce, and the round in progress finishes without it. The
// healthy replica's outer step is in before the hung node speaks again, however long
// the all-reduce would have waited for it.
func TestAHungReplicaHoldsUpTheOuterStepOnlyUntilItIsFoundStalled(t *testing.T) {
	sw := newSwarm(t, 4)
	sp := mustSpec(t, `name: hung-replica
seed: 5
eval_interval: 160
model: {d_model: 64, n_layers: 2, n_heads: 2, d_ff: 128, seq_len: 64}
pipeline: {stages: 2, micro_batches: 2, replicas: 2, staff_timeout: 30}
train: {batch_size: 8, steps: 160, lr: 0.003, warmup: 2}
diloco: {inner_steps: 80, outer_lr: 1.0, outer_momentum: 0, sync: int8/32}
data: {val_fraction: 0.05}
`)
	// First fit in peer order, replica by replica: node 3 holds stage 1 of replica 1,
	// the stage that reports replica 1's losses.
	victim := sw.nodes[3]
	out := filepath.Join(sw.dir, "launched")
	l := sw.launch(sp, out, false, sw.peers())
	// Hung three steps before the first outer step (after step 80). The all-reduce
	// waits for a replica that has not started a round three times the inner steps
	// took, much longer than the steps take to find a hung neighbour.
	var hungAt time.Time
	l.steps.on(1, 77, func() { victim.hang(true); hungAt = time.Now() })
	l.steps.wait(t, 1, 77, 120*time.Second)
	// The hang lasts until the healthy replica's outer step is in, at most stopFor.
	const stopFor = 25 * time.Second
	var healthy metrics.Outer
	in := l.steps.waitFor(func(os []metrics.Outer) bool {
		for _, o := range os {
			if o.Stage == 1 && o.Replica == 0 && o.Step == 80 {
				healthy = o
				return true
			}
		}
		return false
	}, stopFor)
	took := time.Since(hungAt)
	victim.hang(false)
	res, err := l.wait(t, 90*time.Second)
	if !in {
		t.Fatalf("replica 0's outer step after step 80 was not in %s after stage 1 of replica 1 hung: the whole pipeline waited for the hung one", stopFor)
	}
	if err != nil {
		t.Fatalf("launch: %v", err)
	}
	// How long the hang took to find: the stage that waited for the victim says.
	m := regexpFind(l.log.String(), `sent no \w+ for step \d+ in ([0-9.]+m?s) \(deadline`)
	found, perr := time.ParseDuration(m)
	if perr != nil {
		t.Fatalf("the launcher's log does not say the hung stage was found stalled (%v)", perr)
	}
	t.Logf("hung at replica 1's step 77; replica 0's outer step (stage 1) in %s later (sync_s %.3f, contributors %d); the stall was found after %s",
		took.Round(time.Millisecond), healthy.SyncS, healthy.Contributors, found)
	// The stall is timed from the victim's last gradient, a moment before the hang;
	// what follows its finding (the launcher's word to the nodes, an all-reduce of
	// one, the report) takes milliseconds. Waiting out the all-reduce's own deadline
	// for the hung replica (three times the 80 inner steps) takes seconds more.
	if took > found+2*time.Second {
		t.Errorf("replica 0's outer step came %s after the hang, %s after it was found stalled: it waited for the hung replica", took.Round(time.Millisecond), (took - found).Round(time.Millisecond))
	}
	if healthy.Contributors != 1 {
		t.Errorf("replica 0's outer step after step 80: %+v; want it made without the hung replica", healthy)
	}
	// Node 1 holds stage 1 of replica 0: the launcher told it to go on without the hung node.
	sw.nodes[1].waitLog("a broken replica pipeline is dropped from the all-reduce", time.Second)
	steps, _ := rows(t, out)
	for step := 1; step <= 160; step++ {
		if _, ok := steps[[2]int{step, 0}]; !ok {
			t.Errorf("replica 0 has no loss at step %d: the whole pipeline should run to the end", step)
		}
	}
	if !slices.Equal(res.Broken, []int{1}) {
		t.Errorf("replica pipelines stopped early: %v, want [1]", res.Broken)
	}
}

func regexpFind(s, expr string) string {
	if m := regexp.MustCompile(expr).FindStringSubmatch(s); m != nil {
		return m[1]
	}
	return ""
}
