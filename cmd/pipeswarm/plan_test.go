package main

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// The 1b preset, cut into 8 stages, is staffed on 8 nodes of 24 GiB and each stage's
// memory is printed; on nodes too small for it the plan is refused with the reason.
func TestLaunchPlanOnlyPrintsEachStagesMemory(t *testing.T) {
	code, stdout, stderr := runCLI(t, "launch", "1b", "--plan-only", "--nodes", "8", "--node-memory", "24GiB")
	if code != 0 {
		t.Fatalf("launch 1b --plan-only: exit %d\n%s%s", code, stdout, stderr)
	}
	if !strings.Contains(stdout, "1b: 1,028,737,024 parameters") || !strings.Contains(stdout, "every stage has a node (8 used)") {
		t.Errorf("plan lacks the model or the verdict:\n%s", stdout)
	}
	row := regexp.MustCompile(`(?m)^\s+(\d)\s+0\s+\[\d+,\d+\)\s+\d+\s+.*GiB\s+node\d$`)
	if got := len(row.FindAllString(stdout, -1)); got != 8 {
		t.Errorf("%d stage rows, want 8:\n%s", got, stdout)
	}
	code, stdout, stderr = runCLI(t, "launch", "1b", "--plan-only", "--nodes", "8", "--node-memory", "2GiB")
	if code == 0 || !strings.Contains(stdout, "the run cannot be staffed") || strings.Count(stdout, "none fits") != 8 || !strings.Contains(stderr, "node1 offers 2 GiB, stage") {
		t.Errorf("1b on 2 GiB nodes: exit %d\n%s%s\nwant a refusal naming what a stage needs", code, stdout, stderr)
	}
	if code, _, stderr := runCLI(t, "launch", "1b", "--plan-only", "--node-memory", "24GiB"); code == 0 || !strings.Contains(stderr, "--nodes N") {
		t.Errorf("--plan-only without --nodes: exit %d, %s", code, stderr)
	}
}

// An async run's plan shows each stage's in-flight bound and the past weight versions
// it keeps, the most at stage 0 and none at the last; a node too small for them is
// refused with them named. A sync run's plan has no such columns.
func TestLaunchPlanOnlyShowsAnAsyncStagesPastVersions(t *testing.T) {
	const src = `name: plan-async
model: {d_model: 128, n_layers: 4, n_heads: 4, d_ff: 352, seq_len: 128}
pipeline: {stages: 4, micro_batches: 4%s}
train: {batch_size: 16, steps: 10, lr: 0.003}
`
	dir := t.TempDir()
	async, sync := filepath.Join(dir, "async.yaml"), filepath.Join(dir, "sync.yaml")
	if err := os.WriteFile(async, fmt.Appendf(nil, src, ", in_flight: 16, schedule: async"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(sync, fmt.Appendf(nil, src, ""), 0o644); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr := runCLI(t, "launch", async, "--plan-only", "--nodes", "4", "--node-memory", "1GiB")
	if code != 0 {
		t.Fatalf("launch --plan-only: exit %d\n%s%s", code, stdout, stderr)
	}
	if !strings.Contains(stdout, "schedule async, delay nesterov") || !strings.Contains(stdout, " versions ") ||
		!strings.Contains(stdout, " NAdam ") || !strings.Contains(stdout, " past weights ") {
		t.Errorf("plan lacks the schedule, the versions, the update rule or the past weights:\n%s", stdout)
	}
	row := regexp.MustCompile(`(?m)^\s+(\d)\s+0\s+\[\d+,\d+\)\s+(\d+)\s+(\d+)\s`)
	var got []string
	for _, m := range row.FindAllStringSubmatch(stdout, -1) {
		got = append(got, m[1]+": "+m[2]+" in flight, "+m[3]+" versions")
	}
	want := []string{"0: 16 in flight, 4 versions", "1: 11 in flight, 3 versions", "2: 6 in flight, 2 versions", "3: 1 in flight, 0 versions"}
	if strings.Join(got, "; ") != strings.Join(want, "; ") {
		t.Errorf("stage rows %q, want %q:\n%s", got, want, stdout)
	}
	code, stdout, stderr = runCLI(t, "launch", async, "--plan-only", "--nodes", "4", "--node-memory", "184MiB")
	if code == 0 || !strings.Contains(stderr, "node4 offers 184 MiB, stage 0 needs 185 MiB, 3.6 MiB of it for 4 past weight versions (async schedule)") {
		t.Errorf("on 184 MiB nodes: exit %d\n%s%s\nwant stage 0 refused, its past versions named", code, stdout, stderr)
	}
	_, stdout, _ = runCLI(t, "launch", sync, "--plan-only", "--nodes", "4", "--node-memory", "1GiB")
	if strings.Contains(stdout, "versions") || strings.Contains(stdout, "past weights") || !strings.Contains(stdout, " AdamW ") {
		t.Errorf("a sync plan shows past versions or no AdamW:\n%s", stdout)
	}
}
