package main

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/launcher"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
)

// A launch interrupted mid-run and resumed with the command it prints: each summary
// gives the steps that launch took, a real time and tokens/s, the same bytes per
// token at the boundary as an uninterrupted run (fp32 frames: equal to the byte),
// and every checkpoint's path.
func TestLaunchSummariesAfterAnInterruptAndAResume(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	src := strings.Replace(pipeSpec, "stages: 4, micro_batches: 4, in_flight: 4", "stages: 2, micro_batches: 2", 1)
	src = strings.Replace(src, "steps: 6,", "steps: 30,", 1)
	// Every stage checkpoints at every step: whichever step each stopped after, they
	// share one.
	src = strings.Replace(src, "eval_interval: 3", "eval_interval: 0\ncheckpoint_interval: 1", 1)
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, src, 2)
	defer func() {
		for _, n := range nodes {
			_ = n.cmd.Process.Signal(syscall.SIGTERM)
			<-n.exited
		}
	}()
	boundary := regexp.MustCompile(`boundary 0→1: [0-9.]+ bytes/token forward, [0-9.]+ bytes/token backward`)

	whole := filepath.Join(dir, "whole")
	code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", whole, "--quiet"}, peerArgs...)...)
	if code != 0 {
		t.Fatalf("launch exited %d:\n%s\n%s", code, stdout, stderr)
	}
	want := boundary.FindString(stdout)
	if want == "" {
		t.Fatalf("no boundary line:\n%s", stdout)
	}
	t.Logf("uninterrupted:\n%s", stdout)

	out := filepath.Join(dir, "interrupted")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	args := append([]string{"launch", specPath, "--key", keyPath, "--out", out}, peerArgs...)
	var o1, e1 bytes.Buffer
	exited := make(chan int, 1)
	go func() { exited <- run(ctx, args, &o1, &e1) }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if rows, _ := metrics.ReadFile(filepath.Join(out, "metrics.jsonl")); len(rows) >= 5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no progress in 60 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	if code := <-exited; code != 130 {
		t.Fatalf("interrupted launch exited %d, want 130:\n%s\n%s", code, o1.String(), e1.String())
	}
	t.Logf("interrupted:\n%s%s", o1.String(), e1.String())
	first := checkSummary(t, o1.String(), want, 2)

	// The command it says resumes the run.
	m := regexp.MustCompile(`(?m)^resume with: pipeswarm (.*)$`).FindStringSubmatch(e1.String())
	if m == nil {
		t.Fatalf("the interrupt printed no resume command:\n%s", e1.String())
	}
	if wantCmd := resumeCommand("launch", args[1:], out); "pipeswarm "+m[1] != wantCmd || !strings.HasSuffix(wantCmd, "--out "+out+" --resume") {
		t.Errorf("resume command %q, want %q", m[1], wantCmd)
	}
	code, stdout, stderr = runCLI(t, append(strings.Fields(m[1]), "--quiet")...)
	if code != 0 {
		t.Fatalf("resumed launch exited %d:\n%s\n%s", code, stdout, stderr)
	}
	t.Logf("resumed:\n%s", stdout)
	second := checkSummary(t, stdout, want, 2)
	from := regexp.MustCompile(`\(resumed from step (\d+), now at step 30 of 30\)`).FindStringSubmatch(stdout)
	if from == nil {
		t.Fatalf("the resumed summary does not say where it went on from:\n%s", stdout)
	}
	var k int
	fmt.Sscan(from[1], &k)
	// The stages may have stopped a step apart: it goes on from the newest step all hold.
	if k < first-1 || k > first || second+k != 30 {
		t.Errorf("interrupted after %d steps, resumed from step %d and took %d: want it to go on from step %d or the one before, to 30", first, k, second, first)
	}
}

// checkSummary checks a launch summary's figures and returns the steps it says it took.
func checkSummary(t *testing.T, out, boundaryLine string, stages int) int {
	t.Helper()
	head := regexp.MustCompile(`(?m)^run [0-9a-f]{16}: (\d+) (?:of 30 )?steps.* in ([0-9.]+)(m?s): loss [0-9.]+(, val_loss [0-9.]+)?, ([0-9]+) tokens/s$`).FindStringSubmatch(out)
	if head == nil {
		t.Fatalf("summary has no run line with steps, time and tokens/s:\n%s", out)
	}
	var steps int
	var secs, tps float64
	fmt.Sscan(head[1], &steps)
	fmt.Sscan(head[2], &secs)
	fmt.Sscan(head[5], &tps)
	if steps == 0 || secs == 0 || tps <= 0 || math.IsInf(tps, 0) || strings.Contains(out, "NaN") || strings.Contains(out, "Inf") {
		t.Errorf("summary figures: %d steps in %s%s, %v tokens/s:\n%s", steps, head[2], head[3], tps, out)
	}
	if got := regexp.MustCompile(`boundary 0→1: .*`).FindString(out); got != boundaryLine {
		t.Errorf("summary says %q, the uninterrupted run %q", got, boundaryLine)
	}
	cks := regexp.MustCompile(`(?m)^stage \d checkpoint: (.*)$`).FindAllStringSubmatch(out, -1)
	if len(cks) != stages {
		t.Errorf("%d checkpoint lines, want %d:\n%s", len(cks), stages, out)
	}
	for _, c := range cks {
		if _, err := os.Stat(c[1]); err != nil {
			t.Errorf("checkpoint %q: %v", c[1], err)
		}
	}
	return steps
}

// A DiLoCo summary lists every replica's checkpoints, and says so of one its node
// did not report; a pause that did not resume says so.
func TestLaunchSummaryListsEveryReplicasCheckpoints(t *testing.T) {
	sp, err := spec.Parse([]byte(strings.Replace(testSpec, "stages: 2, micro_batches: 2", "stages: 2, replicas: 2, micro_batches: 2", 1)+
		"diloco: {inner_steps: 4}\n"), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	res := &launcher.Result{RunID: 1, Steps: 8, Loss: 5, ValLoss: math.NaN(), StepsRun: 8, TokensRun: 2 * 8 * 128, TimeRun: 1500 * time.Millisecond,
		BoundaryFwd: []int64{8 * 128 * 514}, BoundaryBwd: []int64{8 * 128 * 512}, BoundaryFwdSteps: []int{8}, BoundaryBwdSteps: []int{8}, SyncBytes: [][]int64{{1, 2}, {3, 4}},
		Checkpoints: [][]string{{"/n0/stage-0-replica-0.safetensors", "/n1/stage-1-replica-0.safetensors"}, {"/n2/stage-0-replica-1.safetensors", ""}},
		Pauses:      []launcher.Pause{{Why: "stage 1 gone", Recorded: 8}}}
	var b bytes.Buffer
	printLaunchSummary(&b, sp, res, "runs/x")
	got := b.String()
	for _, w := range []string{
		"run 0000000000000001: 8 steps in 1.5s: loss 5.0000, 1365 tokens/s\n",
		"boundary 0→1: 514.0 bytes/token forward, 512.0 bytes/token backward\n",
		"paused after step 8 for 0s (stage 1 gone); not resumed\n",
		"stage 0 of replica 0 checkpoint: /n0/stage-0-replica-0.safetensors\n",
		"stage 1 of replica 0 checkpoint: /n1/stage-1-replica-0.safetensors\n",
		"stage 0 of replica 1 checkpoint: /n2/stage-0-replica-1.safetensors\n",
		"stage 1 of replica 1 checkpoint: not reported (its node stopped without saying; launch --resume finds the newest on the nodes)\n",
	} {
		if !strings.Contains(got, w) {
			t.Errorf("summary:\n%s\nwant it to contain %q", got, w)
		}
	}
}

// The progress line shows no validation loss before the first evaluation, and with
// replicas says whose step it is.
func TestProgressLineHasNoValBeforeTheFirstEvaluationAndNamesTheReplica(t *testing.T) {
	var b bytes.Buffer
	p := newProgress(&b, 2, false)
	one, v := 1, 4.25
	p.step(metrics.Step{Step: 1, Loss: 5, TokensPerS: 100, ElapsedS: 1})
	p.step(metrics.Step{Step: 2, Loss: 4.5, TokensPerS: 100, ElapsedS: 2, ValLoss: &v, Replica: &one})
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("progress printed %q", lines)
	}
	if strings.Contains(lines[0], "val") || strings.Contains(lines[0], "NaN") || !strings.HasPrefix(lines[0], "step 1/2  loss 5.0000  100 tok/s") {
		t.Errorf("before the first evaluation: %q", lines[0])
	}
	if !strings.HasPrefix(lines[1], "step 2/2  replica 1  loss 4.5000  val 4.2500  100 tok/s") {
		t.Errorf("a replica's evaluated step: %q", lines[1])
	}
}

func TestResumeCommandRepeatsTheArgumentsWithOutAndResume(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"tiny2", "--key", "l.key", "--peer", "n0", "--steps", "40"},
			"pipeswarm launch tiny2 --key l.key --peer n0 --steps 40 --out runs/tiny2 --resume"},
		{[]string{"--out", "old", "my spec.yaml", "--force", "--out=x", "--resume"},
			"pipeswarm launch 'my spec.yaml' --out runs/tiny2 --resume"},
	} {
		if got := resumeCommand("launch", tc.args, "runs/tiny2"); got != tc.want {
			t.Errorf("resumeCommand(%q) = %q, want %q", tc.args, got, tc.want)
		}
	}
}

// --steps that leave no room for the warmup shorten it and say so; a spec file whose
// steps do, too, naming its line.
func TestAShortenedWarmupIsSaid(t *testing.T) {
	dir := t.TempDir()
	specPath := filepath.Join(dir, "run.yaml")
	must(t, os.WriteFile(specPath, []byte(strings.Replace(testSpec, "steps: 8, lr: 0.003, warmup: 2", "steps: 2, lr: 0.003, warmup: 5", 1)), 0o644))
	code, _, stderr := runCLI(t, "train", specPath, "--out", filepath.Join(dir, "a"), "--quiet", "--log-level", "warn")
	if code != 0 || !strings.Contains(stderr, `run.yaml:6: train.warmup: 5 is not less than train.steps 2; shortened to 0`) {
		t.Errorf("spec file with warmup 5 over 2 steps: exit %d, stderr:\n%s", code, stderr)
	}
	src := filepath.Join(dir, "fits.yaml")
	must(t, os.WriteFile(src, []byte(testSpec), 0o644))
	code, _, stderr = runCLI(t, "train", src, "--steps", "2", "--out", filepath.Join(dir, "c"), "--quiet", "--log-level", "warn")
	if code != 0 || !strings.Contains(stderr, `train.warmup 2 is not less than --steps 2; shortened to 0 (a tenth of the steps)`) {
		t.Errorf("--steps 2 with warmup 2: exit %d, stderr:\n%s", code, stderr)
	}
}

// A run that paused when a stage's node died and was not resumed in time still
// sums up what it did: real figures, the pause, the checkpoint the live stage
// reported and a sentence for the dead one's, and the command that resumes it.
func TestLaunchSummaryOfARunPausedAndNotResumed(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	src := strings.Replace(pipeSpec, "stages: 4, micro_batches: 4, in_flight: 4, pause_timeout: 0", "stages: 2, micro_batches: 2, pause_timeout: 2", 1)
	src = strings.Replace(src, "steps: 6,", "steps: 100000,", 1)
	src = strings.Replace(src, "eval_interval: 3", "eval_interval: 0", 1)
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, src, 2)
	out := filepath.Join(dir, "paused")
	var o, e bytes.Buffer
	exited := make(chan int, 1)
	go func() {
		exited <- run(context.Background(), append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--quiet"}, peerArgs...), &o, &e)
	}()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if rows, _ := metrics.ReadFile(filepath.Join(out, "metrics.jsonl")); len(rows) >= 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no progress in 60 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = nodes[1].cmd.Process.Kill()
	<-nodes[1].exited
	var code int
	select {
	case code = <-exited:
	case <-time.After(60 * time.Second):
		t.Fatal("launch still running 60 s after its stage 1 died, with a pause timeout of 2 s")
	}
	_ = nodes[0].cmd.Process.Signal(syscall.SIGTERM)
	<-nodes[0].exited
	t.Logf("exit %d:\n%s%s", code, o.String(), e.String())
	got := o.String()
	if code != 1 {
		t.Fatalf("exit %d, want 1", code)
	}
	head := regexp.MustCompile(`(?m)^run [0-9a-f]{16}: (\d+) of 100000 steps in ([0-9.]+m?s): loss [0-9.]+, ([0-9]+) tokens/s$`).FindStringSubmatch(got)
	if head == nil || head[1] == "0" || head[2] == "0s" || strings.Contains(got, "Inf") || strings.Contains(got, "NaN") {
		t.Errorf("summary line: %q", head)
	}
	for _, re := range []string{
		`(?m)^boundary 0→1: [0-9.]+ bytes/token forward, (backward not reported \(its stage stopped without saying what it sent\)|[0-9.]+ bytes/token backward)$`,
		`(?m)^paused after step \d+ for [0-9]+s \(.*\); not resumed$`,
		`(?m)^stage 1 checkpoint: not reported \(its node stopped without saying; launch --resume finds the newest on the nodes\)$`,
	} {
		if !regexp.MustCompile(re).MatchString(got) {
			t.Errorf("summary does not match %s", re)
		}
	}
	if m := regexp.MustCompile(`(?m)^stage 0 checkpoint: (.*)$`).FindStringSubmatch(got); m == nil {
		t.Error("no stage 0 checkpoint line")
	} else if _, err := os.Stat(m[1]); err != nil {
		t.Errorf("stage 0 checkpoint: %v", err)
	}
	if !strings.Contains(e.String(), "resume with: pipeswarm launch "+specPath) || !strings.Contains(e.String(), "--out "+out+" --resume") {
		t.Errorf("no resume command:\n%s", e.String())
	}
}

// An interrupted train prints the command that resumes it, and that command
// finishes the run.
func TestInterruptedTrainPrintsTheCommandThatResumesIt(t *testing.T) {
	dir := t.TempDir()
	specPath := filepath.Join(dir, "run.yaml")
	must(t, os.WriteFile(specPath, []byte(strings.Replace(strings.Replace(testSpec, "eval_interval: 4", "eval_interval: 0", 1),
		"steps: 8,", "steps: 400,", 1)), 0o644))
	out := filepath.Join(dir, "out")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var o, e bytes.Buffer
	exited := make(chan int, 1)
	go func() { exited <- run(ctx, []string{"train", specPath, "--out", out, "--quiet"}, &o, &e) }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if rows, _ := metrics.ReadFile(filepath.Join(out, "metrics.jsonl")); len(rows) >= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no progress in 60 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if code := <-exited; code != 130 {
		t.Fatalf("interrupted train exited %d, want 130:\n%s", code, e.String())
	}
	want := "resume with: pipeswarm train " + specPath + " --quiet --out " + out + " --resume\n"
	if !strings.Contains(e.String(), want) {
		t.Fatalf("stderr:\n%s\nwant %q", e.String(), want)
	}
	code, _, stderr := runCLI(t, strings.Fields(strings.TrimPrefix(strings.TrimSpace(want), "resume with: pipeswarm "))...)
	if code != 0 {
		t.Fatalf("the resume command exited %d:\n%s", code, stderr)
	}
	if rows, _ := metrics.ReadFile(filepath.Join(out, "metrics.jsonl")); len(rows) != 400 {
		t.Errorf("%d rows after resuming, want 400", len(rows))
	}
}
