package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/ckpt"
	"github.com/pipeswarm/pipeswarm/node/config"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/status"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/corpus"
	"github.com/pipeswarm/pipeswarm/shard"
)

// writeRunFolder makes DIR/runs/ID with a checkpoint of size bytes written at
// when, and a launcher record naming the run it resumed from.
func writeRunFolder(t *testing.T, dataDir, id, resumedFrom string, size int, when time.Time) {
	t.Helper()
	dir := filepath.Join(dataDir, "runs", id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	rec, _ := json.Marshal(launcherRecord{Launcher: "L", ResumedFrom: resumedFrom})
	for name, b := range map[string][]byte{ckpt.LauncherFile: rec, "stage-0.safetensors": make([]byte, size)} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, when, when); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chtimes(dir, when, when); err != nil {
		t.Fatal(err)
	}
}

// Pruning keeps the newest runs, the runs held now, and every run a kept one
// resumed from, and back along that chain; the rest go, largest and oldest alike.
func TestPruneKeepsTheNewestHeldAndResumedFromRuns(t *testing.T) {
	dir := t.TempDir()
	t0 := time.Now().Add(-time.Hour)
	// Oldest first: a, b (resumed from a), c, d, e (resumed from b), f (held now).
	writeRunFolder(t, dir, "000000000000000a", "", 100, t0)
	writeRunFolder(t, dir, "000000000000000b", "000000000000000a", 100, t0.Add(time.Minute))
	writeRunFolder(t, dir, "000000000000000c", "", 300, t0.Add(2*time.Minute))
	writeRunFolder(t, dir, "000000000000000d", "", 400, t0.Add(3*time.Minute))
	writeRunFolder(t, dir, "000000000000000e", "000000000000000b", 100, t0.Add(4*time.Minute))
	writeRunFolder(t, dir, "000000000000000f", "", 100, t0.Add(-time.Hour)) // accepted long ago, still running

	runs, err := RunFolders(dir)
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	for _, r := range runs {
		order = append(order, r.ID[15:])
	}
	if strings.Join(order, "") != "edcbaf" || runs[0].ResumedFrom != "000000000000000b" || runs[1].Bytes < 400 {
		t.Fatalf("run folders newest first: %s; %+v", order, runs)
	}
	if got := Prunable(runs, 0, nil); got != nil {
		t.Errorf("keep 0 prunes %v, want nothing", got)
	}
	removed, err := PruneRuns(dir, 1, map[string]bool{"000000000000000f": true})
	if err != nil {
		t.Fatal(err)
	}
	var gone []string
	for _, r := range removed {
		gone = append(gone, r.ID[15:])
	}
	if slices.Sort(gone); strings.Join(gone, "") != "cd" {
		t.Errorf("pruned %v, want c and d (e is newest, b and a are what e resumed from, f is held)", gone)
	}
	left, _ := RunFolders(dir)
	if len(left) != 4 {
		t.Errorf("%d run folders left, want 4: %+v", len(left), left)
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "runs")); len(ents) != 4 {
		t.Errorf("runs/ holds %d entries, want the 4 kept (nothing half-removed)", len(ents))
	}
}

// A daemon prunes its data directory at start by keep_runs.
func TestADaemonPrunesOldRunFoldersAtStart(t *testing.T) {
	data := filepath.Join(t.TempDir(), "node")
	t0 := time.Now().Add(-time.Hour)
	for i := range 4 {
		writeRunFolder(t, data, fmt.Sprintf("%016x", i+1), "", 10, t0.Add(time.Duration(i)*time.Minute))
	}
	cfg := &config.Config{DataDir: data, Listen: []string{"/ip4/127.0.0.1/tcp/0"}, Open: true, KeepRuns: 2}
	cfg.EnsureDefaults()
	d, err := New(context.Background(), cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	left, _ := RunFolders(data)
	if len(left) != 2 || left[0].ID != fmt.Sprintf("%016x", 4) || left[1].ID != fmt.Sprintf("%016x", 3) {
		t.Errorf("left %+v, want the two newest", left)
	}
}

// An open node says so at WARN, naming the risk; its status shows open, the trust
// list, the memory budget and what it computes with, on the data directory's unix
// socket, with no --status.
func TestStatusOnTheDataDirectorysSocketShowsTrustOpenBudgetAndCompute(t *testing.T) {
	var logs bytes.Buffer
	cfg := &config.Config{DataDir: filepath.Join(t.TempDir(), "node"), Listen: []string{"/ip4/127.0.0.1/tcp/0"}, Open: true,
		Trust: []string{"12D3KooWAkC88sNgQmYS6s3EBH4yw18uirscCMtJKXUhufsxoe7V"}, MemoryBudget: "2GiB"}
	cfg.EnsureDefaults()
	d, err := New(context.Background(), cfg, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), "ANY launcher") ||
		!strings.Contains(logs.String(), "anyone who can reach it can make it train their run") {
		t.Errorf("an open node's log does not warn about it:\n%s", logs.String())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	snap, err := status.FetchUnix(ctx, filepath.Join(d.dir.Path, "status.sock"))
	if err != nil {
		t.Fatal(err)
	}
	if snap.Peer != d.ID().String() || !snap.Open || !slices.Equal(snap.Trust, cfg.Trust) || snap.MemoryBudget != "2GiB" ||
		snap.MaxStages != 1 || snap.KeepRuns != config.DefaultKeepRuns || len(snap.Compute) == 0 || snap.Compute[0].Impl == "" || !snap.CPUOnly {
		t.Errorf("snapshot settings: peer %s open %v trust %v budget %q max %d keep %d compute %+v cpu only %v", snap.Peer, snap.Open, snap.Trust,
			snap.MemoryBudget, snap.MaxStages, snap.KeepRuns, snap.Compute, snap.CPUOnly)
	}
	var text bytes.Buffer
	if err := status.WriteText(&text, snap); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"open           true: ANY launcher can make this node train its run", "trust          " + cfg.Trust[0],
		"memory budget  2GiB, 1 stage(s) at most", "CPU only: this build has no GPU backend"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("status text lacks %q:\n%s", want, text.String())
		}
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(d.dir.Path, "status.sock")); !os.IsNotExist(err) {
		t.Errorf("status.sock left behind by a closed node: %v", err)
	}
}

// planFor signs a plan of run id giving d stage 0 of 2 and peer last stage 1.
func planFor(t *testing.T, d *Daemon, id uint64, last string) *p2p.Signed {
	t.Helper()
	k, err := p2p.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	lid, _ := p2p.PeerID(k)
	sp, err := spec.Parse([]byte(`name: p
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 16}
pipeline: {stages: 2, micro_batches: 1}
train: {batch_size: 2, steps: 20, lr: 0.001}
`), "p.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ranges, _ := shard.SplitLayers(2, 2)
	plan := wire.Plan{ID: id, Spec: sp.String(), Launcher: lid.String(), Created: time.Now(), Expires: time.Now().Add(time.Minute),
		Stages: []assign.Assignment{{Stage: 0, Peer: d.ID().String(), Range: ranges[0]}, {Stage: 1, Peer: last, Range: ranges[1]}},
		Data:   &wire.DataPlan{Train: []corpus.Blob{corpus.BlobOf([]byte("some text"))}, Val: corpus.BlobOf([]byte("more text"))}}
	b, _ := json.Marshal(plan)
	signed, err := p2p.Sign(k, b)
	if err != nil {
		t.Fatal(err)
	}
	return signed
}

// A first stage never computes the loss; its status shows the loss its run's last
// stage announces in heartbeats on gossip, and only that peer's. Runs are listed
// newest first.
func TestAFirstStageShowsTheLossItsLastStageAnnounces(t *testing.T) {
	defer func(i time.Duration) { wire.HeartbeatInterval = i }(wire.HeartbeatInterval)
	wire.HeartbeatInterval = 200 * time.Millisecond
	cfg := &config.Config{DataDir: filepath.Join(t.TempDir(), "node"), Listen: []string{"/ip4/127.0.0.1/tcp/0"}, Open: true, MaxStages: 2}
	cfg.EnsureDefaults()
	d, err := New(context.Background(), cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	last := testHost(t)
	for _, id := range []uint64{0xa1, 0xa2} {
		time.Sleep(2 * time.Millisecond) // a2 planned after a1
		signed := planFor(t, d, id, last.ID().String())
		from, err := signed.Verify()
		if err != nil {
			t.Fatal(err)
		}
		if err := d.accept(from, signed); err != nil {
			t.Fatalf("plan %x: %v", id, err)
		}
	}
	snap := d.Snapshot()
	if len(snap.Runs) != 2 || snap.Runs[0].Run != "00000000000000a2" {
		t.Errorf("runs %+v, want the newest (a2) first", snap.Runs)
	}
	beat := func(h *p2p.Host, loss float64, step int) wire.Heartbeat {
		return wire.Heartbeat{Peer: h.ID().String(), Runs: []wire.HeartbeatRun{{Run: "00000000000000a1", Stage: 1, State: "running", Step: step, Loss: loss, LossStep: step}}}
	}
	// A peer that does not hold the run's last stage is not believed.
	other := testHost(t)
	d.noteHeartbeat(other.ID(), beat(other, 9.5, 99))
	if snap := d.Snapshot(); slices.ContainsFunc(snap.Runs, func(r status.Run) bool { return r.LossFrom != "" }) {
		t.Fatalf("a loss from a peer outside the run is shown: %+v", snap.Runs)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	runCtx, stop := context.WithCancel(context.Background())
	ran := make(chan struct{})
	go func() { d.Run(runCtx); close(ran) }()
	defer func() { stop(); <-ran }()
	if _, err := last.Connect(ctx, d.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	topic, err := last.PubSub.Join(p2p.TopicHeartbeats)
	if err != nil {
		t.Fatal(err)
	}
	defer topic.Close()
	b, _ := json.Marshal(beat(last, 4.25, 7))
	for !slices.ContainsFunc(d.Snapshot().Runs, func(r status.Run) bool { return r.LossStep == 7 }) {
		if ctx.Err() != nil {
			t.Fatal("the node never showed the loss its last stage announced")
		}
		_ = topic.Publish(ctx, b)
		time.Sleep(100 * time.Millisecond)
	}
	snap = d.Snapshot()
	for _, r := range snap.Runs {
		switch r.Run {
		case "00000000000000a1":
			if r.Loss != 4.25 || r.LossStep != 7 || !strings.Contains(r.LossFrom, "stage 1") {
				t.Errorf("run a1 on stage 0: loss %v at %d from %q, want 4.25 at 7 from stage 1's heartbeat", r.Loss, r.LossStep, r.LossFrom)
			}
		case "00000000000000a2":
			if r.LossFrom != "" {
				t.Errorf("run a2 shows a loss nobody announced: %+v", r)
			}
		}
	}
	var text bytes.Buffer
	_ = status.WriteText(&text, &snap)
	if !strings.Contains(text.String(), "run 00000000000000a1 loss 4.2500 at step 7, from the heartbeat of stage 1") {
		t.Errorf("status text:\n%s", text.String())
	}
}

// Runs that ended are listed newest first, after those held now.
func TestEndedRunsAreListedNewestFirst(t *testing.T) {
	d := testDaemon(t)
	for _, id := range []string{"0000000000000001", "0000000000000002", "0000000000000003"} {
		d.endRun(0, status.Run{Run: id, State: status.RunFinished})
	}
	var got []string
	for _, r := range d.Snapshot().Runs {
		got = append(got, r.Run[15:])
	}
	if strings.Join(got, "") != "321" {
		t.Errorf("ended runs listed %v, want newest first", got)
	}
}

// A data directory deeper than a unix socket address can name still gets its
// status socket, and `status` reaches it; a closed node removes it.
func TestStatusSocketInADeepDataDirectory(t *testing.T) {
	data := filepath.Join(t.TempDir(), strings.Repeat("d", 60), strings.Repeat("e", 60), "node")
	cfg := &config.Config{DataDir: data, Listen: []string{"/ip4/127.0.0.1/tcp/0"}, Open: true}
	cfg.EnsureDefaults()
	d, err := New(context.Background(), cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(data, "status.sock")
	if len(sock) <= 107 {
		t.Fatalf("socket path %d bytes: the test wants one longer than 107", len(sock))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	snap, err := status.FetchUnix(ctx, sock)
	if err != nil || snap.Peer != d.ID().String() {
		t.Fatalf("status over %s: %v", sock, err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
}
