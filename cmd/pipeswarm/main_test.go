package main

import (
	"bytes"
	"context"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/build"
	"github.com/pipeswarm/pipeswarm/node/metrics"
)

const testSpec = `name: cli-test
seed: 3
eval_interval: 4
model: {vocab: 256, d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 2, micro_batches: 2}
train: {batch_size: 4, steps: 8, lr: 0.003, warmup: 2}
data: {val_fraction: 0.01}
`

func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestTrainWritesRunFilesAndEvalReproducesValLoss(t *testing.T) {
	dir := t.TempDir()
	specPath := filepath.Join(dir, "run.yaml")
	if err := os.WriteFile(specPath, []byte(testSpec), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	code, _, stderr := runCLI(t, "train", specPath, "--out", out, "--steps", "6")
	if code != 0 {
		t.Fatalf("train exited %d:\n%s", code, stderr)
	}
	for _, f := range []string{"metrics.jsonl", "spec.yaml", "model.safetensors", "config.json", "loss.png"} {
		if st, err := os.Stat(filepath.Join(out, f)); err != nil || st.Size() == 0 {
			t.Errorf("%s missing or empty: %v", f, err)
		}
	}
	steps, err := metrics.ReadFile(filepath.Join(out, "metrics.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	if len(steps) != 6 {
		t.Fatalf("%d metric lines, want 6 (--steps overrides the spec)", len(steps))
	}
	last := steps[len(steps)-1]
	if last.ValLoss == nil || steps[3].ValLoss == nil || steps[0].ValLoss != nil {
		t.Fatalf("val_loss should appear on steps 4 and 6 only: %+v", steps)
	}
	if last.Tokens != 6*4*32 || last.TokensPerS <= 0 || last.ElapsedS <= 0 {
		t.Fatalf("last step record %+v", last)
	}
	code, stdout, stderr := runCLI(t, "eval", "--checkpoint", filepath.Join(out, "model.safetensors"), "--json")
	if code != 0 {
		t.Fatalf("eval exited %d:\n%s", code, stderr)
	}
	var r struct {
		ValLoss float64 `json:"val_loss"`
	}
	if err := json.Unmarshal([]byte(stdout), &r); err != nil {
		t.Fatalf("eval --json printed %q: %v", stdout, err)
	}
	if math.Abs(r.ValLoss-*last.ValLoss) > 1e-9 {
		t.Fatalf("eval val_loss %.9f, training's final val_loss %.9f", r.ValLoss, *last.ValLoss)
	}
	saved, _ := os.ReadFile(filepath.Join(out, "spec.yaml"))
	if !strings.Contains(string(saved), "steps: 6") {
		t.Fatalf("spec.yaml does not record the effective steps:\n%s", saved)
	}
}

func TestTrainRefusesABadSpecNamingFieldAndLine(t *testing.T) {
	specPath := filepath.Join(t.TempDir(), "bad.yaml")
	bad := strings.Replace(testSpec, "n_heads: 2", "n_heads: 3", 1)
	if err := os.WriteFile(specPath, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, stderr := runCLI(t, "train", specPath, "--out", t.TempDir())
	if code != 1 || !strings.Contains(stderr, "bad.yaml:4") || !strings.Contains(stderr, "n_heads") {
		t.Fatalf("exit %d, stderr %q: want exit 1 naming bad.yaml:4 and n_heads", code, stderr)
	}
}

func TestEveryCommandHasHelp(t *testing.T) {
	for _, c := range commands {
		code, _, stderr := runCLI(t, c.name, "--help")
		if code != 0 || !strings.Contains(stderr, "Usage: pipeswarm "+c.name) {
			t.Errorf("%s --help: exit %d, %q", c.name, code, stderr)
		}
	}
	if code, _, stderr := runCLI(t, "frobnicate"); code != 2 || !strings.Contains(stderr, "unknown command") {
		t.Errorf("unknown command: exit %d, %q", code, stderr)
	}
}

func TestEvalWithoutCheckpointIsAUsageError(t *testing.T) {
	code, _, stderr := runCLI(t, "eval")
	if code != 2 || !strings.Contains(stderr, "--checkpoint") {
		t.Fatalf("exit %d, %q", code, stderr)
	}
}

func TestVersionNamesGEMMProvidersAndProtocols(t *testing.T) {
	code, stdout, stderr := runCLI(t, "version")
	if code != 0 {
		t.Fatalf("version exited %d: %s", code, stderr)
	}
	for _, want := range []string{"go1.", "gemm", "go        pipeswarm Go kernels", "/pipeswarm/reduce/1", "/pipeswarm/data/1", "/pipeswarm/weights/1"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("version output lacks %q:\n%s", want, stdout)
		}
	}
	code, stdout, _ = runCLI(t, "version", "--json")
	var v build.Info
	if code != 0 || json.Unmarshal([]byte(stdout), &v) != nil || v.Go == "" || v.GEMM == "" || len(v.Providers) != 3 || len(v.Protocols) != 6 {
		t.Errorf("version --json: exit %d, %q", code, stdout)
	}
}

func TestLogFlagsChooseFormatAndLevel(t *testing.T) {
	dir := t.TempDir()
	specPath := filepath.Join(dir, "run.yaml")
	if err := os.WriteFile(specPath, []byte(testSpec), 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, stderr := runCLI(t, "train", specPath, "--out", filepath.Join(dir, "json"), "--steps", "1", "--quiet", "--log-format", "json")
	if code != 0 {
		t.Fatalf("train exited %d: %s", code, stderr)
	}
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	for _, l := range lines {
		var rec map[string]any
		if err := json.Unmarshal([]byte(l), &rec); err != nil || rec["level"] == nil || rec["msg"] == nil {
			t.Errorf("--log-format json wrote %q, not a JSON record with level and msg", l)
		}
	}
	if !strings.Contains(stderr, `"msg":"compute"`) {
		t.Errorf("no info record at the default level:\n%s", stderr)
	}
	code, _, stderr = runCLI(t, "train", specPath, "--out", filepath.Join(dir, "warn"), "--steps", "1", "--quiet", "--log-level", "warn")
	if code != 0 || strings.Contains(stderr, "compute") {
		t.Errorf("--log-level warn: exit %d, info records shown:\n%s", code, stderr)
	}
	for _, args := range [][]string{
		{"train", specPath, "--log-format", "xml"},
		{"train", specPath, "--log-level", "loud"},
		{"node", "--data-dir", filepath.Join(dir, "node"), "--open", "--log-format", "xml"},
		{"launch", specPath, "--log-level", "verbose"},
	} {
		if code, _, stderr := runCLI(t, args...); code != 2 || !strings.Contains(stderr, "--log-") {
			t.Errorf("%v: exit %d, %q; want a usage error naming the flag", args, code, stderr)
		}
	}
}
