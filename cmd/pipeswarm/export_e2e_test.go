package main

import (
	"bytes"
	"context"
	"encoding/json"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/examples"
	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
)

// A launched 4-stage run of examples/tiny4.yaml (which says export: allowed) ends with
// its model assembled in the run's directory: `eval` of it gives the run's final
// validation loss exactly, the independent PyTorch Llama gives the same, and `export`
// later, from the nodes' checkpoints, assembles the same file.
func TestLaunchedFourStageRunIsExportedAndEvalReproducesItsValLoss(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	src, err := examples.FS.ReadFile("tiny4.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, string(src), 4)
	out := filepath.Join(dir, "launched")
	code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--steps", "3", "--quiet"}, peerArgs...)...)
	if code != 0 {
		t.Fatalf("launch exited %d:\n%s\n%s", code, stdout, stderr)
	}
	model := filepath.Join(out, "model.safetensors")
	if !strings.Contains(stdout, "model of step 3: "+model+" and "+filepath.Join(out, "config.json")) {
		t.Fatalf("launch did not say it assembled the model:\n%s", stdout)
	}
	steps, err := metrics.ReadFile(filepath.Join(out, "metrics.jsonl"))
	if err != nil || len(steps) != 3 || steps[2].ValLoss == nil {
		t.Fatalf("metrics: %d rows, %v; want 3, the last with val_loss", len(steps), err)
	}
	runVal := *steps[2].ValLoss

	// eval of the run directory: the same windows (eval_batches), the same loss.
	code, evalOut, stderr := runCLI(t, "eval", "--checkpoint", out, "--json")
	if code != 0 {
		t.Fatalf("eval exited %d: %s", code, stderr)
	}
	var ev struct {
		ValLoss float64 `json:"val_loss"`
		Windows int     `json:"windows"`
		Step    string  `json:"step"`
	}
	if err := json.Unmarshal([]byte(evalOut), &ev); err != nil {
		t.Fatalf("eval printed %q: %v", evalOut, err)
	}
	if ev.ValLoss != runVal || ev.Step != "3" {
		t.Errorf("eval of the exported model: val_loss %.9f at step %s; the run's final val_loss %.9f at step 3", ev.ValLoss, ev.Step, runVal)
	}
	if ev.Windows != spec.DefaultEvalBatches*train.EvalBatch {
		t.Errorf("eval covered %d windows, want eval_batches × %d = %d", ev.Windows, train.EvalBatch, spec.DefaultEvalBatches*train.EvalBatch)
	}

	// The independent PyTorch transcription of LlamaForCausalLM on the same windows.
	if out, err := exec.Command("/usr/bin/python3", "-c", "import torch").CombinedOutput(); err != nil {
		t.Logf("skipping the PyTorch check: /usr/bin/python3 has no torch (apt install python3-torch): %v %s", err, bytes.TrimSpace(out))
	} else {
		text, _ := data.Builtin()
		_, val := data.Split(text, 0.1)
		valPath := filepath.Join(dir, "val.txt")
		if err := os.WriteFile(valPath, val, 0o644); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "/usr/bin/python3", "../../bench/hf_llama_loss.py", "--checkpoint", model,
			"--data", valPath, "--seq-len", "128", "--windows", strconv.Itoa(ev.Windows))
		var errb bytes.Buffer
		cmd.Stderr = &errb
		pyOut, err := cmd.Output()
		if err != nil {
			t.Fatalf("hf_llama_loss.py: %v\n%s", err, errb.Bytes())
		}
		var py struct {
			Loss float64 `json:"loss"`
		}
		if err := json.Unmarshal(pyOut, &py); err != nil {
			t.Fatalf("hf_llama_loss.py printed %q: %v", pyOut, err)
		}
		t.Logf("final val_loss %.7f; PyTorch Llama on the exported model %.7f", runVal, py.Loss)
		if math.Abs(py.Loss-runVal) > 2e-3 {
			t.Errorf("PyTorch loss %.7f of the exported model, the run's %.7f: more than 2e-3 apart", py.Loss, runVal)
		}
	}

	// Later, from the nodes' checkpoints: the same bytes.
	first, err := os.ReadFile(model)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(model); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr = runCLI(t, append([]string{"export", out, "--key", keyPath}, peerArgs...)...)
	if code != 0 || !strings.Contains(stdout, "model of step 3: "+model) {
		t.Fatalf("export exited %d:\n%s\n%s", code, stdout, stderr)
	}
	if again, err := os.ReadFile(model); err != nil || !bytes.Equal(again, first) {
		t.Errorf("export assembled %d bytes (%v), launch %d: want the same file", len(again), err, len(first))
	}
	for _, n := range nodes {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
		<-n.exited
	}
}

// Export is refused, with who refused and what to change, by a spec that says
// export: never (launch and export both say so) and by a node whose config says
// export: deny.
func TestExportIsRefusedBySpecNeverAndByADenyingNode(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	// Another launcher the nodes trust, but not the one of the runs below.
	other := filepath.Join(dir, "other.key")
	code, otherID, errs := runCLI(t, "keygen", "--out", other)
	if code != 0 {
		t.Fatal(errs)
	}
	twoStages := strings.Replace(pipeSpec, "stages: 4, micro_batches: 4, in_flight: 4", "stages: 2, micro_batches: 2", 1)
	specPath, keyPath, nodes, peerArgs := startSwarmWith(t, dir, twoStages, 2, func(i int) []string {
		args := []string{"--trust", strings.TrimSpace(otherID)}
		if i == 1 {
			args = append(args, "--export", "deny")
		}
		return args
	})
	// The spec leaves export out: never, the protocol-model default.
	never := filepath.Join(dir, "never")
	code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", never, "--steps", "2", "--quiet"}, peerArgs...)...)
	if code != 0 {
		t.Fatalf("launch exited %d:\n%s\n%s", code, stdout, stderr)
	}
	if !strings.Contains(stdout, "model not assembled: the spec says export: never") {
		t.Errorf("launch of an export: never run did not say why there is no model:\n%s", stdout)
	}
	if _, err := os.Stat(filepath.Join(never, "model.safetensors")); err == nil {
		t.Error("a run whose spec says export: never has a model.safetensors")
	}
	code, _, stderr = runCLI(t, append([]string{"export", never, "--key", keyPath}, peerArgs...)...)
	if code == 0 || !strings.Contains(stderr, "export refused: "+filepath.Join(never, "spec.yaml")+" says export: never") {
		t.Errorf("export of an export: never run: exit %d, stderr %q; want a refusal naming the spec field", code, stderr)
	}

	// export: allowed, but node 1 denies: the run finishes, its model is not assembled,
	// and the message names the node and the setting.
	allowed := filepath.Join(dir, "allowed.yaml")
	if err := os.WriteFile(allowed, []byte("export: allowed\n"+twoStages), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "denied")
	code, stdout, stderr = runCLI(t, append([]string{"launch", allowed, "--key", keyPath, "--out", out, "--steps", "2", "--quiet"}, peerArgs...)...)
	if code != 0 {
		t.Fatalf("launch exited %d:\n%s\n%s", code, stdout, stderr)
	}
	denier := strings.TrimPrefix(peerArgs[3][strings.LastIndex(peerArgs[3], "/p2p/"):], "/p2p/")
	want := "model not assembled: export: stage 1 on " + denier + ": export refused: this node's config says export: deny (its owner can set export: allow in its config, or start it with --export allow)"
	if !strings.Contains(stdout, want) {
		t.Errorf("launch with a denying node:\n%s\nwant it to say:\n%s", stdout, want)
	}
	if !strings.Contains(stderr, "the node holding stage 1 does not consent to export") {
		t.Errorf("launch did not warn, before the run, of the node that denies export:\n%s", stderr)
	}
	if _, err := os.Stat(filepath.Join(out, "model.safetensors")); err == nil {
		t.Error("a model was assembled although a node denied")
	}
	code, _, stderr = runCLI(t, append([]string{"export", out, "--key", keyPath}, peerArgs...)...)
	if code == 0 || !strings.Contains(stderr, "stage 1 on "+denier+": export refused: this node's config says export: deny") {
		t.Errorf("export with a denying node: exit %d, stderr %q", code, stderr)
	}
	// Only the run's launcher may collect: another key, trusted or not, is refused.
	code, _, stderr = runCLI(t, append([]string{"export", out, "--key", other}, peerArgs...)...)
	if code == 0 || !strings.Contains(stderr, "export refused: only the run's launcher") {
		t.Errorf("export with another key: exit %d, stderr %q", code, stderr)
	}
	for _, n := range nodes {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
		<-n.exited
	}
}
