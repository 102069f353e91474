package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A model written by train continues a prompt: greedily the same text every time
// whatever the seed, sampled the same text for the same seed.
func TestGenerateFromATrainedCheckpoint(t *testing.T) {
	dir := t.TempDir()
	specPath := filepath.Join(dir, "run.yaml")
	src := strings.Replace(testSpec, "steps: 8", "steps: 30", 1)
	if err := os.WriteFile(specPath, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "run")
	if code, _, stderr := runCLI(t, "train", specPath, "--out", out, "--quiet"); code != 0 {
		t.Fatalf("train exited %d: %s", code, stderr)
	}
	gen := func(args ...string) string {
		t.Helper()
		code, stdout, stderr := runCLI(t, append([]string{"generate", "--checkpoint", out, "--prompt", "The ", "--max-tokens", "24"}, args...)...)
		if code != 0 {
			t.Fatalf("generate %q exited %d: %s", args, code, stderr)
		}
		if !strings.HasPrefix(stdout, "The ") || len(stdout) != len("The ")+24+1 {
			t.Fatalf("generate %q printed %q; want the prompt and 24 bytes", args, stdout)
		}
		return stdout
	}
	greedy := gen()
	if again := gen("--seed", "5"); again != greedy {
		t.Errorf("greedy: %q, then %q with another seed", greedy, again)
	}
	if file := gen("--checkpoint", filepath.Join(out, "model.safetensors")); file != greedy {
		t.Errorf("from the file %q, from its directory %q", file, greedy)
	}
	sampled := gen("--temperature", "1", "--top-k", "40", "--top-p", "0.9", "--seed", "3")
	if again := gen("--temperature", "1", "--top-k", "40", "--top-p", "0.9", "--seed", "3"); again != sampled {
		t.Errorf("seed 3: %q, then %q", sampled, again)
	}
	code, _, stderr := runCLI(t, "generate", "--checkpoint", out, "--prompt", "x", "--top-p", "2")
	if code != 1 || !strings.Contains(stderr, "--top-p 2") {
		t.Errorf("--top-p 2: exit %d, %q; want a refusal naming the flag", code, stderr)
	}
	if code, _, stderr := runCLI(t, "generate", "--checkpoint", out); code != 2 || !strings.Contains(stderr, "--prompt TEXT is required") {
		t.Errorf("no prompt: exit %d, %q", code, stderr)
	}
	t.Logf("greedy after 30 steps: %q", greedy)
}
