package main

import (
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
