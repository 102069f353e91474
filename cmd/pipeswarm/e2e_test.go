package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/metrics"
)

// TestMain lets the test binary stand in for the pipeswarm binary: run with
// PIPESWARM_AS_CLI=1 it is the CLI, so end-to-end tests start real node processes
// without a separate build.
func TestMain(m *testing.M) {
	if spec := os.Getenv(attackEnv); spec != "" {
		os.Exit(attackMain(spec))
	}
	if os.Getenv("PIPESWARM_AS_CLI") == "1" {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
		stop()
		os.Exit(code)
	}
	os.Exit(m.Run())
}

// nodeProc is a `pipeswarm node` child process.
type nodeProc struct {
	cmd    *exec.Cmd
	dir    string
	stderr *syncBuffer
	exited chan error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startNode(t *testing.T, dir string, args ...string) *nodeProc {
	t.Helper()
	cmd := exec.Command(os.Args[0], append([]string{"node", "--data-dir", dir, "--listen", "/ip4/127.0.0.1/tcp/0"}, args...)...)
	cmd.Env = append(os.Environ(), "PIPESWARM_AS_CLI=1")
	p := &nodeProc{cmd: cmd, dir: dir, stderr: &syncBuffer{}, exited: make(chan error, 1)}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.exited <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
		}
	})
	return p
}

// addrs waits until the node has written its addresses (it does so once listening).
func (p *nodeProc) addrs(t *testing.T) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if b, err := os.ReadFile(filepath.Join(p.dir, "addrs")); err == nil && len(b) > 0 {
			return strings.Fields(string(b))[0]
		}
		select {
		case err := <-p.exited:
			t.Fatalf("node exited before listening: %v\n%s", err, p.stderr)
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatalf("node did not write %s/addrs in 30 s:\n%s", p.dir, p.stderr)
	return ""
}

// startSwarm writes spec into dir, makes a launcher key, and starts n node processes
// that trust it; it returns the spec and key paths, the nodes, and --peer arguments.
func startSwarm(t *testing.T, dir, spec string, n int, nodeArgs ...string) (specPath, keyPath string, nodes []*nodeProc, peerArgs []string) {
	t.Helper()
	return startSwarmWith(t, dir, spec, n, func(int) []string { return nodeArgs })
}

// launcherKeyAndSpec makes a launcher key in dir (keyPath, its peer ID launcherID, for
// the nodes to trust) and writes spec to specPath there.
func launcherKeyAndSpec(t *testing.T, dir, spec string) (keyPath, launcherID, specPath string) {
	t.Helper()
	keyPath = filepath.Join(dir, "launcher.key")
	code, idOut, stderr := runCLI(t, "keygen", "--out", keyPath)
	if code != 0 {
		t.Fatalf("keygen exited %d: %s", code, stderr)
	}
	launcherID = strings.TrimSpace(idOut)
	if !strings.HasPrefix(launcherID, "12D3KooW") {
		t.Fatalf("keygen printed %q, want a peer ID", launcherID)
	}
	specPath = filepath.Join(dir, "run.yaml")
	if err := os.WriteFile(specPath, []byte(spec), 0o644); err != nil {
		t.Fatal(err)
	}
	return keyPath, launcherID, specPath
}

// startSwarmWith is startSwarm with each node's extra arguments given by args(i).
func startSwarmWith(t *testing.T, dir, spec string, n int, args func(i int) []string) (specPath, keyPath string, nodes []*nodeProc, peerArgs []string) {
	t.Helper()
	keyPath, launcherID, specPath := launcherKeyAndSpec(t, dir, spec)
	for i := range n {
		nodes = append(nodes, startNode(t, filepath.Join(dir, fmt.Sprintf("node%d", i)), append([]string{"--trust", launcherID}, args(i)...)...))
	}
	for _, nd := range nodes {
		peerArgs = append(peerArgs, "--peer", nd.addrs(t))
	}
	t.Cleanup(func() {
		if t.Failed() {
			for i, nd := range nodes {
				t.Logf("node %d:\n%s", i, nd.stderr)
			}
		}
	})
	return specPath, keyPath, nodes, peerArgs
}

const pipeSpec = `name: e2e
seed: 11
eval_interval: 3
model: {d_model: 32, n_layers: 4, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 4, micro_batches: 4, in_flight: 4, pause_timeout: 0}
train: {batch_size: 4, steps: 6, lr: 0.003, warmup: 2}
data: {val_fraction: 0.005}
`

func TestPipelinedRunOnFourNodeProcessesMatchesTrainAndShutsDownCleanly(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, pipeSpec, 4, "--memory-budget", "512MiB")

	// A second node on a data directory in use refuses to start.
	dup := startNode(t, nodes[0].dir, "--open")
	select {
	case err := <-dup.exited:
		if err == nil || !strings.Contains(dup.stderr.String(), "in use") {
			t.Fatalf("second node on %s: exit %v, stderr %q; want a refusal saying the directory is in use", nodes[0].dir, err, dup.stderr)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("a second node on a locked data directory kept running")
	}

	out := filepath.Join(dir, "launched")
	code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--quiet"}, peerArgs...)...)
	if code != 0 {
		for i, n := range nodes {
			t.Logf("node %d:\n%s", i, n.stderr)
		}
		t.Fatalf("launch exited %d:\n%s\n%s", code, stdout, stderr)
	}
	launched, err := metrics.ReadFile(filepath.Join(out, "metrics.jsonl"))
	if err != nil {
		t.Fatal(err)
	}

	ref := filepath.Join(dir, "trained")
	if code, _, stderr := runCLI(t, "train", specPath, "--out", ref, "--quiet"); code != 0 {
		t.Fatalf("train exited %d: %s", code, stderr)
	}
	trained, err := metrics.ReadFile(filepath.Join(ref, "metrics.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	if len(launched) != len(trained) || len(trained) != 6 {
		t.Fatalf("launch recorded %d steps, train %d; want 6 each", len(launched), len(trained))
	}
	// Bit for bit: the stages compute what train computes, in the same order.
	for i := range trained {
		a, b := launched[i], trained[i]
		if a.Loss != b.Loss {
			t.Errorf("step %d: pipelined loss %.9g, single-process %.9g", b.Step, a.Loss, b.Loss)
		}
		if (a.ValLoss == nil) != (b.ValLoss == nil) {
			t.Errorf("step %d: val_loss present %v pipelined, %v single-process", b.Step, a.ValLoss != nil, b.ValLoss != nil)
		} else if a.ValLoss != nil && *a.ValLoss != *b.ValLoss {
			t.Errorf("step %d: pipelined val_loss %.9g, single-process %.9g", b.Step, *a.ValLoss, *b.ValLoss)
		}
	}
	if _, err := os.Stat(filepath.Join(out, "loss.png")); err != nil {
		t.Errorf("launch wrote no loss.png: %v", err)
	}
	for i, n := range nodes {
		ck, _ := filepath.Glob(filepath.Join(n.dir, "runs", "*", fmt.Sprintf("stage-%d.safetensors", i)))
		if len(ck) != 1 {
			t.Errorf("node %d holds no stage-%d checkpoint", i, i)
		}
	}

	// A run signed by a key the nodes do not trust is refused by every node.
	otherKey := filepath.Join(dir, "other.key")
	if code, _, stderr := runCLI(t, "keygen", "--out", otherKey); code != 0 {
		t.Fatal(stderr)
	}
	code, _, stderr = runCLI(t, append([]string{"launch", specPath, "--key", otherKey, "--out", filepath.Join(dir, "refused"), "--quiet"}, peerArgs...)...)
	if code == 0 || !strings.Contains(stderr, "does not trust") {
		t.Fatalf("launch with an untrusted key: exit %d, stderr %q; want a refusal", code, stderr)
	}
	for i, n := range nodes {
		if !strings.Contains(n.stderr.String(), "untrusted key") {
			t.Errorf("node %d did not log why it refused:\n%s", i, n.stderr)
		}
	}

	// SIGTERM in the middle of a run: every node stops within a few seconds, keeps its
	// stage checkpoint, and leaves nothing behind; the launcher fails with the reason.
	longOut := filepath.Join(dir, "interrupted")
	type result struct {
		code   int
		stderr string
	}
	launched2 := make(chan result, 1)
	go func() {
		var out, errb bytes.Buffer
		code := run(context.Background(), append([]string{"launch", specPath, "--key", keyPath, "--out", longOut, "--steps", "100000", "--quiet"}, peerArgs...), &out, &errb)
		launched2 <- result{code, errb.String()}
	}()
	deadline := time.Now().Add(60 * time.Second)
	for {
		steps, _ := metrics.ReadFile(filepath.Join(longOut, "metrics.jsonl"))
		if len(steps) >= 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the second run made no progress in 60 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, n := range nodes {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
	}
	for i, n := range nodes {
		select {
		case err := <-n.exited:
			if err != nil {
				t.Errorf("node %d exited with %v after SIGTERM:\n%s", i, err, n.stderr)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("node %d still running 10 s after SIGTERM", i)
		}
		left, _ := filepath.Glob(filepath.Join(n.dir, ".*"))
		if _, err := os.Stat(filepath.Join(n.dir, "lock")); err == nil {
			left = append(left, "lock")
		}
		if len(left) > 0 {
			t.Errorf("node %d left %v in its data directory", i, left)
		}
		if ck, _ := filepath.Glob(filepath.Join(n.dir, "runs", "*", fmt.Sprintf("stage-%d.safetensors", i))); len(ck) != 2 {
			t.Errorf("node %d holds %d stage-%d checkpoints after the interrupted run, want 2 (one per run)", i, len(ck), i)
		}
	}
	select {
	case r := <-launched2:
		t.Logf("interrupted launch: exit %d: %s", r.code, r.stderr)
		if r.code == 0 || !strings.Contains(r.stderr, "stage") {
			t.Errorf("launch of the interrupted run: exit %d, stderr %q; want a failure naming the stage", r.code, r.stderr)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("launch did not notice its nodes had stopped")
	}
}

func TestLaunchRefusesABadSpecBeforeContactingPeers(t *testing.T) {
	dir := t.TempDir()
	keyPath := filepath.Join(dir, "k")
	if code, _, stderr := runCLI(t, "keygen", "--out", keyPath); code != 0 {
		t.Fatal(stderr)
	}
	cases := map[string]string{
		"more stages than layers": strings.Replace(pipeSpec, "stages: 4", "stages: 5", 1),
		"unknown field":           strings.Replace(pipeSpec, "seq_len: 32", "seq_len: 32, sequence: 9", 1),
		"malformed":               strings.Replace(pipeSpec, "model: {", "model: {{", 1),
	}
	for name, src := range cases {
		specPath := filepath.Join(dir, "bad.yaml")
		if err := os.WriteFile(specPath, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
		// The peer does not exist: a refusal that names the spec proves nothing was sent.
		code, _, stderr := runCLI(t, "launch", specPath, "--key", keyPath, "--peer", "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWLRPJAA5o6Gp5PvTRWjWMDbfcmKXnu2Zh3ztz6UYFXmG9")
		if code == 0 || !strings.Contains(stderr, "bad.yaml:") {
			t.Errorf("%s: exit %d, stderr %q; want a refusal naming bad.yaml and its line", name, code, stderr)
		}
	}
}

// A run that does not clip exchanges no gradient norms between its stages (each steps
// as soon as its own backwards are done) and still takes exactly train's steps.
func TestUnclippedPipelineMatchesTrainWithoutANormExchange(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes; skipped in -short mode")
	}
	dir := t.TempDir()
	spec := strings.Replace(pipeSpec, "stages: 4, micro_batches: 4, in_flight: 4", "stages: 2, micro_batches: 2", 1)
	spec = strings.Replace(spec, "warmup: 2}", "warmup: 2, grad_clip: 0}", 1)
	specPath, keyPath, nodes, peerArgs := startSwarm(t, dir, spec, 2)
	out := filepath.Join(dir, "launched")
	if code, stdout, stderr := runCLI(t, append([]string{"launch", specPath, "--key", keyPath, "--out", out, "--quiet"}, peerArgs...)...); code != 0 {
		t.Fatalf("launch exited %d:\n%s\n%s", code, stdout, stderr)
	}
	ref := filepath.Join(dir, "trained")
	if code, _, stderr := runCLI(t, "train", specPath, "--out", ref, "--quiet"); code != 0 {
		t.Fatal(stderr)
	}
	launched, _ := metrics.ReadFile(filepath.Join(out, "metrics.jsonl"))
	trained, _ := metrics.ReadFile(filepath.Join(ref, "metrics.jsonl"))
	if len(launched) != 6 || len(trained) != 6 {
		t.Fatalf("%d and %d steps recorded, want 6", len(launched), len(trained))
	}
	for i, b := range trained {
		a := launched[i]
		if a.Loss != b.Loss || (a.ValLoss == nil) != (b.ValLoss == nil) || (a.ValLoss != nil && *a.ValLoss != *b.ValLoss) {
			t.Errorf("step %d: launched loss %.9f (val %v), trained %.9f (val %v)", i+1, a.Loss, a.ValLoss, b.Loss, b.ValLoss)
		}
		if a.GradNorm != 0 {
			t.Errorf("step %d: launched grad_norm %g; the stages exchanged no norms to know it", i+1, a.GradNorm)
		}
	}
	for _, n := range nodes {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
		<-n.exited
	}
}
