package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// keygen --show prints the ID of a key that exists; keygen --out refuses to
// overwrite one and says how to read its ID.
func TestKeygenShowPrintsTheIDOfAnExistingKey(t *testing.T) {
	key := filepath.Join(t.TempDir(), "launcher.key")
	code, made, stderr := runCLI(t, "keygen", "--out", key)
	if code != 0 {
		t.Fatalf("keygen --out: %d %s", code, stderr)
	}
	code, shown, stderr := runCLI(t, "keygen", "--show", key)
	if code != 0 || shown != made || !strings.HasPrefix(shown, "12D3KooW") {
		t.Errorf("keygen --show printed %q (exit %d, %s), want %q", shown, code, stderr, made)
	}
	code, _, stderr = runCLI(t, "keygen", "--out", key)
	if code == 0 || !strings.Contains(stderr, "keygen --show "+key) {
		t.Errorf("keygen --out over a key: exit %d, %q; want a refusal naming keygen --show", code, stderr)
	}
}

// A node started with flags only (no --status) prints one ready-to-paste --peer
// line saying why it chose that address, logs that it computes on the CPU only, and
// `pipeswarm status --data-dir DIR` shows it, with its trust list, open, budget and
// compute. Errors about trust name the flags.
func TestANodeOffersAPeerLineAndItsStatusWithoutAnyStatusFlag(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "node0")
	code, _, stderr := runCLI(t, "node", "--data-dir", data)
	if code == 0 || !strings.Contains(stderr, "--trust (trust): no launcher is trusted") || !strings.Contains(stderr, "--open") {
		t.Errorf("a node with no --trust nor --open: exit %d, %q", code, stderr)
	}
	_, launcher, _ := runCLI(t, "keygen", "--out", filepath.Join(dir, "launcher.key"))
	launcher = strings.TrimSpace(launcher)
	ctx, stop := context.WithCancel(context.Background())
	out, logs := &syncBuffer{}, &syncBuffer{}
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"node", "--data-dir", data, "--listen", "/ip4/127.0.0.1/tcp/0", "--trust", launcher, "--memory-budget", "1GiB"}, out, logs)
	}()
	defer func() {
		stop()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Error("the node did not stop")
		}
	}()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(out.String(), "--peer ") || !strings.Contains(logs.String(), "node running") {
		if time.Now().After(deadline) {
			t.Fatalf("no --peer line:\n%s\n%s", out, logs)
		}
		time.Sleep(50 * time.Millisecond)
	}
	var peerLine, why string
	lines := strings.Split(out.String(), "\n")
	for i, l := range lines {
		if strings.HasPrefix(l, "to add this node to a run, give the launcher: --peer ") && i+1 < len(lines) {
			peerLine, why = strings.TrimPrefix(l, "to add this node to a run, give the launcher: "), lines[i+1]
		}
	}
	id := strings.Fields(lines[0])[2] // "peer ID 12D3KooW..."
	if peerLine != "--peer /ip4/127.0.0.1/"+peerLine[len("--peer /ip4/127.0.0.1/"):] || !strings.HasSuffix(peerLine, "/p2p/"+id) ||
		!strings.Contains(peerLine, "/tcp/") || !strings.Contains(why, "loopback: reachable from this machine only") {
		t.Errorf("peer line %q (%q), want a loopback TCP address ending in /p2p/%s and why", peerLine, why, id)
	}
	if !strings.Contains(logs.String(), "CPU only: this build has no GPU backend") {
		t.Errorf("the node does not say it computes on the CPU only:\n%s", logs)
	}
	code, text, stderr := runCLI(t, "status", "--data-dir", data)
	if code != 0 {
		t.Fatalf("status --data-dir with no --status: exit %d: %s", code, stderr)
	}
	for _, want := range []string{"peer           " + id, "trust          " + launcher, "open           false", "memory budget  1GiB",
		"compute        cpu32 (fp32): ", "CPU only: this build has no GPU backend"} {
		if !strings.Contains(text, want) {
			t.Errorf("status lacks %q:\n%s", want, text)
		}
	}
	code, js, _ := runCLI(t, "status", "--data-dir", data, "--json")
	var snap map[string]any
	if code != 0 || json.Unmarshal([]byte(js), &snap) != nil || snap["open"] != false || snap["memory_budget"] != "1GiB" {
		t.Errorf("status --json: exit %d %s", code, js)
	}
	// The directory is the node's: pruning by hand is refused while it runs.
	if code, _, stderr := runCLI(t, "node", "prune", "--data-dir", data); code == 0 || !strings.Contains(stderr, "in use by another pipeswarm node") {
		t.Errorf("prune of a running node's directory: exit %d, %q", code, stderr)
	}
}

// `pipeswarm node prune` removes old run folders from a stopped node's directory,
// newest kept, and says what it freed; `status` of a directory with no node says so.
func TestNodePruneRemovesOldRunFoldersByHand(t *testing.T) {
	data := filepath.Join(t.TempDir(), "node0")
	t0 := time.Now().Add(-time.Hour)
	for i, id := range []string{"00000000000000a1", "00000000000000a2", "00000000000000a3"} {
		p := filepath.Join(data, "runs", id)
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(p, "stage-0.safetensors"), make([]byte, 2048), 0o644); err != nil {
			t.Fatal(err)
		}
		when := t0.Add(time.Duration(i) * time.Minute)
		_ = os.Chtimes(filepath.Join(p, "stage-0.safetensors"), when, when)
		_ = os.Chtimes(p, when, when)
	}
	code, out, stderr := runCLI(t, "node", "prune", "--data-dir", data, "--keep", "1")
	if code != 0 || !strings.Contains(out, "removed run 00000000000000a1 (2 KiB") || !strings.Contains(out, "removed run 00000000000000a2") ||
		!strings.Contains(out, "pruned 2 run folder(s), freed 4 KiB; 1 kept") {
		t.Errorf("node prune: exit %d\n%s%s", code, out, stderr)
	}
	if _, err := os.Stat(filepath.Join(data, "runs", "00000000000000a3")); err != nil {
		t.Errorf("the newest run was pruned: %v", err)
	}
	if code, _, stderr := runCLI(t, "node", "prune", "--data-dir", data, "--keep", "0"); code == 0 || !strings.Contains(stderr, "--keep 0: want at least 1") {
		t.Errorf("--keep 0: exit %d %q", code, stderr)
	}
	if code, _, stderr := runCLI(t, "status", "--data-dir", data); code == 0 || !strings.Contains(stderr, "no node is running on "+data) {
		t.Errorf("status of a stopped node: exit %d %q", code, stderr)
	}
}
