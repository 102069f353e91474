package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/metrics"
)

const resumeSpec = `name: resume
seed: 5
eval_interval: 10
model: {d_model: 32, n_layers: 3, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 3, micro_batches: 4, in_flight: 4, pause_timeout: 0}
train: {batch_size: 4, steps: 60, lr: 0.003, warmup: 2}
data: {val_fraction: 0.005}
`

// All nodes SIGTERMed in the middle of a run; restarted on their data directories;
// `launch --resume` continues from their checkpoints and the losses of every step
// after are those of the uninterrupted run (which is train's, bit for bit).
func TestLaunchResumeAfterEveryNodeStoppedContinuesExactly(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, resumeSpec, 3, "--memory-budget", "512MiB")
	out := filepath.Join(dir, "launched")

	// A resume with nothing to resume is refused before any node is asked.
	if code, _, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--resume", "--quiet"}, peerArgs...)...); code == 0 || !strings.Contains(stderr, "nothing to resume") {
		t.Fatalf("resume of an empty directory: exit %d, stderr %q; want a refusal", code, stderr)
	}

	first := startLaunch(t, append([]string{specPath, "--key", keyPath, "--out", out, "--quiet"}, peerArgs...)...)
	recorded := waitSteps(t, out, 15)
	for _, n := range nodes {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
	}
	for i, n := range nodes {
		select {
		case <-n.exited:
		case <-time.After(15 * time.Second):
			t.Fatalf("node %d still running 15 s after SIGTERM", i)
		}
	}
	if r := waitLaunch(t, first, 30*time.Second, "after its nodes stopped"); r.code == 0 {
		t.Fatal("the interrupted launch exited 0")
	}

	// The same nodes, on the same data directories.
	var again []string
	for i, n := range nodes {
		nodes[i] = n.restart(t)
		again = append(again, "--peer", nodes[i].addrs(t))
	}
	code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--resume", "--quiet"}, again...)...)
	if code != 0 {
		for i, n := range nodes {
			t.Logf("node %d:\n%s", i, n.stderr)
		}
		t.Fatalf("launch --resume exited %d:\n%s\n%s", code, stdout, stderr)
	}
	var rec struct {
		Resume struct{ Step int } `json:"resumed_from"`
	}
	b, err := os.ReadFile(filepath.Join(out, "run.json"))
	if err == nil {
		err = json.Unmarshal(b, &rec)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("stopped with %d steps recorded; resumed after step %d", recorded, rec.Resume.Step)
	// The stages stop on a common step, so nothing recorded is taken again.
	if rec.Resume.Step < recorded {
		t.Errorf("resumed after step %d, but %d steps had been recorded: the stages did not stop on a common step", rec.Resume.Step, recorded)
	}

	sameAsTrain(t, specPath, out, 60)
}

// A node that hangs (SIGSTOP: its connections stay up, it sends nothing) is found by
// its neighbours' deadlines, and the launcher fails the run naming its stage and peer.
func TestHungNodeIsDetectedWithinItsDeadlineAndNamed(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, resumeSpec, 3, "--memory-budget", "512MiB")
	out := filepath.Join(dir, "launched")
	done := startLaunch(t, append([]string{specPath, "--key", keyPath, "--out", out, "--steps", "100000", "--quiet"}, peerArgs...)...)
	waitSteps(t, out, 20)
	hung := nodes[1]
	id := peerArgs[3][strings.LastIndex(peerArgs[3], "/")+1:]
	stopped := time.Now()
	if err := hung.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = hung.cmd.Process.Signal(syscall.SIGCONT) })
	r := waitLaunch(t, done, 60*time.Second, "after a node hung")
	{
		took := r.ended.Sub(stopped)
		t.Logf("hung node detected and the run failed %s after SIGSTOP: %s", took.Round(time.Millisecond), strings.TrimSpace(r.stderr[strings.LastIndex(r.stderr, "pipeswarm launch:"):]))
		if r.code == 0 {
			t.Fatal("launch exited 0 with a hung node")
		}
		if !strings.Contains(r.stderr, "stalled") || !strings.Contains(r.stderr, "stage 1") || !strings.Contains(r.stderr, id) {
			t.Errorf("launch's error does not name stage 1 and its node %s as stalled:\n%s", id, r.stderr)
		}
	}
}

const pauseSpec = `name: e2e-pause
seed: 23
eval_interval: 10
checkpoint_interval: 10
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 2, micro_batches: 2, in_flight: 2, pause_timeout: 120}
train: {batch_size: 4, steps: 80, lr: 0.003, warmup: 2}
data: {val_fraction: 0.005}
`

// The only node of a stage killed (kill -9) mid-run: the run pauses rather than fails,
// saying which stage, and when the node is back on its data directory (listening
// elsewhere now) it resumes from the newest step both stages checkpointed. Every
// step's loss is then the uninterrupted run's (train's), bit for bit.
func TestRunPausesWhileAStageHasNoNodeAndResumesExactlyWhenItIsBack(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, pauseSpec, 2, "--memory-budget", "512MiB")
	out := filepath.Join(dir, "launched")
	done := startLaunch(t, append([]string{specPath, "--key", keyPath, "--out", out, "--quiet"}, peerArgs...)...)
	waitSteps(t, out, 25)
	victim := nodes[1]
	victim.kill9()
	killed := time.Now()
	time.Sleep(3 * time.Second) // paused for a while, with nobody to hold stage 1
	nodes[1] = victim.restart(t)
	nodes[1].addrs(t)
	r := waitLaunch(t, done, 300*time.Second, "after the kill")
	if r.code != 0 {
		t.Fatalf("launch exited %d:\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	t.Logf("finished %s after the kill:\n%s", time.Since(killed).Round(time.Second), r.stdout)
	var paused string
	for _, line := range strings.Split(r.stderr, "\n") {
		if strings.Contains(line, "run paused") || strings.Contains(line, "run resumed") {
			t.Log(line)
			paused += line
		}
	}
	if !strings.Contains(paused, "run paused") || !strings.Contains(paused, "stage 1") || !strings.Contains(paused, "run resumed") {
		t.Errorf("launch did not say it paused for stage 1 and resumed:\n%s", r.stderr)
	}
	if !strings.Contains(r.stdout, "paused after step") {
		t.Errorf("the summary does not list the pause:\n%s", r.stdout)
	}

	sameAsTrain(t, specPath, out, 80)
	for _, n := range nodes {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
	}
}

const rejoinSpec = `name: e2e-rejoin
seed: 17
eval_interval: 100
model: {d_model: 64, n_layers: 4, n_heads: 4, d_ff: 128, seq_len: 64}
pipeline: {stages: 2, micro_batches: 2, replicas: 2}
train: {batch_size: 8, steps: 1000, lr: 0.003, warmup: 2}
diloco: {inner_steps: 20, outer_lr: 1.0, outer_momentum: 0, sync: int8/32}
data: {val_fraction: 0.01}
`

// A node killed mid-run and restarted on its data directory: its replica pipeline
// breaks, the others go on, and when the node is back the pipeline rejoins at the next
// outer step with the stage's state fetched from the live replica, and trains to the
// end in agreement with it.
func TestKilledNodeRestartsAndItsPipelineRejoins(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	// First fit in --peer order, replica by replica: node 3 holds stage 1 of replica 1.
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, rejoinSpec, 4, "--memory-budget", "512MiB")
	out := filepath.Join(dir, "launched")
	done := startLaunch(t, append([]string{specPath, "--key", keyPath, "--out", out, "--quiet"}, peerArgs...)...)
	waitSteps(t, out, 40)
	victim := nodes[3]
	victim.kill9()
	killed := time.Now()
	waitLog(t, nodes[2], "idle: this replica pipeline cannot go on", 30*time.Second)
	nodes[3] = victim.restart(t)
	nodes[3].addrs(t)
	r := waitLaunch(t, done, 300*time.Second, "after the kill")
	if r.code != 0 {
		t.Fatalf("launch exited %d:\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	t.Logf("launch:\n%s", r.stdout)
	for _, line := range strings.Split(r.stderr, "\n") {
		if strings.Contains(line, "replica pipeline") {
			t.Log(line)
		}
	}
	if !strings.Contains(r.stdout, "replica pipelines rejoined: [1") {
		t.Errorf("launch summary does not say replica 1 rejoined:\n%s", r.stdout)
	}
	for _, n := range nodes[2:] {
		waitLog(t, n, "rejoined: state fetched and verified", 5*time.Second)
	}
	back := rejoinedInAgreement(t, out, 1000)
	t.Logf("replica 1 lost from the kill (%s ago at the end) and trained again from step %d to 1000", time.Since(killed).Round(time.Second), back)
	for _, n := range nodes {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
	}
}

// A node killed for good, and a new node that joins the swarm after the run started
// (bootstrapped from a node of it, not one of the launcher's --peers): the launcher
// hears it on the heartbeat topic, it takes the gone node's cell (the stage's other
// replica counts it into its all-reduce), fetches the stage's state from the live
// replica, and the pipeline trains on in agreement.
func TestNewcomerTakesTheCellOfAKilledNode(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	// First fit in --peer order: node 3 holds stage 1 of replica 1.
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, rejoinSpec, 4, "--memory-budget", "512MiB")
	out := filepath.Join(dir, "launched")
	done := startLaunch(t, append([]string{specPath, "--key", keyPath, "--out", out, "--quiet", "--steps", "400"}, peerArgs...)...)
	waitSteps(t, out, 40)
	trust := nodes[0].cmd.Args[slices.Index(nodes[0].cmd.Args, "--trust")+1]
	nodes = append(nodes, startNode(t, filepath.Join(dir, "newcomer"), "--trust", trust, "--memory-budget", "512MiB", "--bootstrap", nodes[0].addrs(t)))
	spareAddr := nodes[4].addrs(t)
	spare := spareAddr[strings.LastIndex(spareAddr, "/")+1:]
	victim := nodes[3]
	victim.kill9()
	r := waitLaunch(t, done, 300*time.Second, "after the kill")
	if r.code != 0 {
		t.Fatalf("launch exited %d:\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	for _, line := range strings.Split(r.stderr, "\n") {
		if strings.Contains(line, "newcomer") || strings.Contains(line, "rejoined") {
			t.Log(line)
		}
	}
	if !strings.Contains(r.stderr, "a newcomer takes the cell of a node gone") || !strings.Contains(r.stderr, spare) {
		t.Errorf("launch does not say the spare %s took the cell:\n%s", spare, r.stderr)
	}
	if !strings.Contains(r.stdout, "replica pipelines rejoined: [1") {
		t.Errorf("launch summary does not say replica 1 rejoined:\n%s", r.stdout)
	}
	waitLog(t, nodes[4], "rejoined: state fetched and verified", 5*time.Second)
	waitLog(t, nodes[1], "member replaced", 5*time.Second) // stage 1 of replica 0
	back := rejoinedInAgreement(t, out, 400)
	t.Logf("replica 1 trained again, with the newcomer, from step %d", back)
	for _, n := range nodes {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
	}
}

// Two replica pipelines broken at different stages, their nodes gone for good: the
// idle survivor of the later one takes the gone cell of the earlier one (its own cell
// passes to the node gone), so the two make one whole pipeline again, which fetches
// the state, rejoins at the next outer step and trains to the end in agreement with
// replica 0.
func TestSurvivorsOfTwoBrokenPipelinesArePairedIntoOne(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	spec := strings.Replace(rejoinSpec, "replicas: 2", "replicas: 3", 1)
	// First fit in --peer order, replica by replica: node 2r+s holds stage s of replica r.
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, spec, 6, "--memory-budget", "512MiB")
	out := filepath.Join(dir, "launched")
	const last = 300
	done := startLaunch(t, append([]string{specPath, "--key", keyPath, "--out", out, "--quiet", "--steps", strconv.Itoa(last)}, peerArgs...)...)
	waitSteps(t, out, 60)
	nodes[3].kill9() // stage 1 of replica 1
	waitLog(t, nodes[2], "idle: this replica pipeline cannot go on", 30*time.Second)
	nodes[4].kill9() // stage 0 of replica 2
	waitLog(t, nodes[5], "idle: this replica pipeline cannot go on", 30*time.Second)
	survivor := nodes[5].addrs(t)
	survivor = survivor[strings.LastIndex(survivor, "/")+1:]
	r := waitLaunch(t, done, 300*time.Second, "after the kills")
	if r.code != 0 {
		t.Fatalf("launch exited %d:\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	for _, line := range strings.Split(r.stderr, "\n") {
		if strings.Contains(line, "re-paired") || strings.Contains(line, "rejoined") || strings.Contains(line, "broken") {
			t.Log(line)
		}
	}
	if !strings.Contains(r.stderr, "re-paired: the idle survivor of a broken replica pipeline takes the cell of a node gone") ||
		!strings.Contains(r.stderr, survivor) {
		t.Errorf("launch does not say the survivor %s took the gone cell:\n%s", survivor, r.stderr)
	}
	if !strings.Contains(r.stdout, "cells re-paired (taken by the survivor of another broken pipeline): 1") ||
		!strings.Contains(r.stdout, "replica pipelines rejoined: [1]") {
		t.Errorf("launch summary does not report the re-pairing and replica 1's return:\n%s", r.stdout)
	}
	waitLog(t, nodes[5], "rejoined: state fetched and verified", 5*time.Second)
	steps, outers := readRun(t, out)
	back := 0
	for step := last; step > 0; step-- {
		if _, ok := steps[[2]int{step, 1}]; !ok {
			back = step + 1
			break
		}
	}
	if back > last-20 || back < 21 {
		t.Fatalf("replica 1 trained again from step %d; want it back well before the end", back)
	}
	t.Logf("replica 1 trained again, re-paired, from step %d of %d", back, last)
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
	for step := back + 19; step <= last; step += 20 {
		for s := range 2 {
			hs := by[[2]int{s, step}]
			if hs[0] == "" || hs[0] != hs[1] {
				t.Errorf("stage %d after step %d: hashes %v, want replicas 0 and 1 equal", s, step, hs)
			}
			if _, ok := hs[2]; ok {
				t.Errorf("stage %d after step %d: replica 2, whose nodes are gone, reported an outer step", s, step)
			}
		}
	}
	for _, n := range nodes {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
	}
}

// rejoinedInAgreement checks the end of a rejoinSpec run of last steps launched into
// out whose replica pipeline 1 broke after step 40 and came back: replica 0 has every step,
// replica 1 is back well before the end, and every outer step since has both replicas
// of both stages with equal weight hashes (the state fetched was the live replica's).
// It returns the first step replica 1 trained again.
func rejoinedInAgreement(t *testing.T, out string, last int) int {
	t.Helper()
	steps, outers := readRun(t, out)
	var back int
	for step := last; step > 0; step-- {
		if _, ok := steps[[2]int{step, 1}]; !ok {
			back = step + 1
			break
		}
	}
	if back > last-10 || back < 41 {
		t.Errorf("replica 1 trained again from step %d; want it back well before the end", back)
	}
	for step := 1; step <= last; step++ {
		if _, ok := steps[[2]int{step, 0}]; !ok {
			t.Fatalf("replica 0 has no loss at step %d", step)
		}
	}
	by := map[[2]int][]string{}
	for _, o := range outers {
		by[[2]int{o.Stage, o.Step}] = append(by[[2]int{o.Stage, o.Step}], o.WeightsHash)
	}
	for step := back + 19; step <= last; step += 20 {
		for s := range 2 {
			if hs := by[[2]int{s, step}]; len(hs) != 2 || hs[0] != hs[1] {
				t.Errorf("stage %d after step %d: hashes %v, want both replicas' and equal", s, step, hs)
			}
		}
	}
	return back
}

// kill9 kills the node without warning (SIGKILL) and waits until it has exited.
func (p *nodeProc) kill9() {
	_ = p.cmd.Process.Kill()
	<-p.exited
}

// restart starts a stopped node again on its data directory with the arguments it
// was given, on a new port.
func (p *nodeProc) restart(t *testing.T) *nodeProc {
	t.Helper()
	_ = os.Remove(filepath.Join(p.dir, "addrs")) // the old process's; the new one writes its own
	return startNode(t, p.dir, p.cmd.Args[6:]...)
}

// waitSteps waits, at most 90 s, until the run launched into out has recorded at
// least n step rows, and returns how many it has.
func waitSteps(t *testing.T, out string, n int) int {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		steps, _ := metrics.ReadFile(filepath.Join(out, "metrics.jsonl"))
		if len(steps) >= n {
			return len(steps)
		}
		if time.Now().After(deadline) {
			t.Fatalf("the run made %d steps in 90 s", len(steps))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// launchRun is a `launch` run in the background, as it ended.
type launchRun struct {
	code           int
	stdout, stderr string
	ended          time.Time
}

// startLaunch runs `pipeswarm launch args...` in the background.
func startLaunch(t *testing.T, args ...string) <-chan launchRun {
	done := make(chan launchRun, 1)
	go func() {
		code, stdout, stderr := runCLI(t, append([]string{"launch"}, args...)...)
		done <- launchRun{code, stdout, stderr, time.Now()}
	}()
	return done
}

// waitLaunch waits at most within for a background launch to end.
func waitLaunch(t *testing.T, ch <-chan launchRun, within time.Duration, when string) launchRun {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(within):
		t.Fatalf("launch still running %s %s", within, when)
		return launchRun{}
	}
}

// sameAsTrain checks that the run launched into out recorded its steps (steps of
// them) with the losses, validation losses and tokens `train` of specPath records,
// bit for bit: whatever happened to the run, the pipeline computed what train does.
func sameAsTrain(t *testing.T, specPath, out string, steps int) {
	t.Helper()
	launched, err := metrics.ReadFile(filepath.Join(out, "metrics.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	ref := t.TempDir()
	if code, _, stderr := runCLI(t, "train", specPath, "--out", ref, "--quiet"); code != 0 {
		t.Fatalf("train exited %d: %s", code, stderr)
	}
	trained, err := metrics.ReadFile(filepath.Join(ref, "metrics.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	if len(launched) != len(trained) || len(trained) != steps {
		t.Fatalf("the launched run's metrics.jsonl holds %d steps, train's %d; want %d each", len(launched), len(trained), steps)
	}
	for i := range trained {
		a, b := launched[i], trained[i]
		if a.Step != b.Step {
			t.Fatalf("row %d is step %d, want %d", i, a.Step, b.Step)
		}
		if a.Loss != b.Loss {
			t.Errorf("step %d: launched run's loss %.8f, train's %.8f", b.Step, a.Loss, b.Loss)
		}
		if (a.ValLoss == nil) != (b.ValLoss == nil) || (a.ValLoss != nil && *a.ValLoss != *b.ValLoss) {
			t.Errorf("step %d: validation loss differs: %v, %v", b.Step, a.ValLoss, b.ValLoss)
		}
		if a.Tokens != b.Tokens {
			t.Errorf("step %d: %d tokens recorded, train %d", b.Step, a.Tokens, b.Tokens)
		}
	}
}
