package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/metrics"
)

// A directory that holds a run is never written over: the default --out moves on to
// runs/NAME-2, an explicit --out is refused naming --resume and --force, and --force
// overwrites.
func TestTrainNeverOverwritesARunUnasked(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	specPath := filepath.Join(dir, "run.yaml")
	if err := os.WriteFile(specPath, []byte(testSpec), 0o644); err != nil {
		t.Fatal(err)
	}
	rows := func(d string) int {
		t.Helper()
		steps, err := metrics.ReadFile(filepath.Join(d, "metrics.jsonl"))
		if err != nil {
			t.Fatal(err)
		}
		return len(steps)
	}

	// Default --out: runs/cli-test, then runs/cli-test-2, said on stderr.
	if code, stdout, stderr := runCLI(t, "train", specPath, "--steps", "3", "--quiet"); code != 0 || !strings.Contains(stdout, "wrote runs/cli-test\n") {
		t.Fatalf("first train: exit %d\n%s\n%s", code, stdout, stderr)
	}
	code, stdout, stderr := runCLI(t, "train", specPath, "--steps", "2", "--quiet")
	if code != 0 || !strings.Contains(stdout, "wrote runs/cli-test-2\n") {
		t.Fatalf("second train: exit %d\n%s\n%s", code, stdout, stderr)
	}
	if !strings.Contains(stderr, "runs/cli-test holds an earlier run; this one goes to runs/cli-test-2") {
		t.Errorf("second train did not say where it went:\n%s", stderr)
	}
	if n := rows("runs/cli-test"); n != 3 {
		t.Errorf("runs/cli-test has %d rows after a second run, want its own 3", n)
	}
	if n := rows("runs/cli-test-2"); n != 2 {
		t.Errorf("runs/cli-test-2 has %d rows, want 2", n)
	}

	// An explicit --out that holds a run: refused, unchanged; --force overwrites.
	code, _, stderr = runCLI(t, "train", specPath, "--steps", "2", "--quiet", "--out", "runs/cli-test")
	if code == 0 || !strings.Contains(stderr, "--out runs/cli-test holds a run (runs/cli-test/metrics.jsonl): continue it with --resume, overwrite it with --force") {
		t.Fatalf("train into an --out holding a run: exit %d, stderr %q; want a refusal naming --resume and --force", code, stderr)
	}
	if n := rows("runs/cli-test"); n != 3 {
		t.Errorf("the refused train changed runs/cli-test: %d rows, want 3", n)
	}
	if code, _, stderr = runCLI(t, "train", specPath, "--steps", "2", "--quiet", "--out", "runs/cli-test", "--force"); code != 0 {
		t.Fatalf("train --force: exit %d: %s", code, stderr)
	}
	if n := rows("runs/cli-test"); n != 2 {
		t.Errorf("after --force runs/cli-test has %d rows, want the new run's 2", n)
	}
	// --resume continues runs/NAME itself: nothing new is allocated.
	if code, stdout, stderr = runCLI(t, "train", specPath, "--steps", "2", "--quiet", "--resume"); code != 0 || strings.Contains(stdout, "cli-test-3") {
		t.Fatalf("train --resume: exit %d\n%s\n%s", code, stdout, stderr)
	}
}

// launch applies the same rule, before any node is asked; and a launch that fails
// before its first step leaves no run directory.
func TestLaunchNeverOverwritesARunAndLeavesNoEmptyFolder(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	keyPath := filepath.Join(dir, "k")
	if code, _, stderr := runCLI(t, "keygen", "--out", keyPath); code != 0 {
		t.Fatal(stderr)
	}
	specPath := filepath.Join(dir, "run.yaml")
	if err := os.WriteFile(specPath, []byte(strings.Replace(testSpec, "pipeline: {", "pipeline: {staff_timeout: 1, ", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	held := filepath.Join(dir, "held")
	if code, _, stderr := runCLI(t, "train", specPath, "--steps", "1", "--quiet", "--out", held); code != 0 {
		t.Fatal(stderr)
	}
	// Nothing listens there: a launch that got as far as a node would fail otherwise.
	const nobody = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWLRPJAA5o6Gp5PvTRWjWMDbfcmKXnu2Zh3ztz6UYFXmG9"
	code, _, stderr := runCLI(t, "launch", specPath, "--key", keyPath, "--peer", nobody, "--out", held, "--quiet")
	if code == 0 || !strings.Contains(stderr, "--out "+held+" holds a run") || !strings.Contains(stderr, "--resume") || !strings.Contains(stderr, "--force") {
		t.Fatalf("launch into an --out holding a run: exit %d, stderr %q", code, stderr)
	}
	if strings.Contains(stderr, "staff") || strings.Contains(stderr, "peer") {
		t.Errorf("the refusal came after asking peers: %q", stderr)
	}

	// Unstaffed (the peer is not there): the launch fails and runs/cli-test is not left behind.
	code, _, stderr = runCLI(t, "launch", specPath, "--key", keyPath, "--peer", nobody, "--quiet", "--log-level", "error")
	if code == 0 {
		t.Fatalf("launch with no live peer exited 0: %s", stderr)
	}
	if _, err := os.Stat("runs/cli-test"); !os.IsNotExist(err) {
		ents, _ := os.ReadDir("runs/cli-test")
		t.Errorf("a failed launch left runs/cli-test behind (%v, %d entries)", err, len(ents))
	}
}

// Without SPEC, train takes the built-in tiny example whatever the directory holds.
func TestTrainWithoutSpecTrainsTheBuiltInExampleFromAnyDirectory(t *testing.T) {
	t.Chdir(t.TempDir())
	if code, stdout, stderr := runCLI(t, "train", "--steps", "1", "--quiet"); code != 0 || !strings.Contains(stdout, "wrote runs/tiny\n") {
		t.Fatalf("train with no spec: exit %d\n%s\n%s", code, stdout, stderr)
	}
}
