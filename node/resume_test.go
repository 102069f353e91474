package node

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/shard"
)

func resumeTestSpec(t *testing.T, stages, replicas int) *spec.Spec {
	t.Helper()
	sp, err := spec.Parse([]byte(strings.NewReplacer("S", string(rune('0'+stages)), "R", string(rune('0'+replicas))).Replace(`name: r
model: {d_model: 32, n_layers: 4, n_heads: 2, d_ff: 64, seq_len: 16}
pipeline: {stages: S, replicas: R, micro_batches: 2}
train: {batch_size: 4, steps: 50, lr: 0.001}
`)), "test")
	if err != nil {
		t.Fatal(err)
	}
	return sp
}

func TestResumePointIsTheNewestStepEveryCellHolds(t *testing.T) {
	sp := resumeTestSpec(t, 2, 1)
	offers := []assign.Offer{{Peer: "b"}, {Peer: "a"}, {Peer: "c"}}
	held := map[string][]Held{
		"a": {{Stage: 0, Steps: []int{18, 10}}},
		"b": {{Stage: 1, Steps: []int{17, 10}}},
	}
	rp, ordered, err := resumePoint(sp, 7, 50, offers, held)
	if err != nil {
		t.Fatal(err)
	}
	if rp.Step != 10 || rp.Run != 7 {
		t.Errorf("resume point %+v, want run 7 step 10 (the newest step both stages hold)", rp)
	}
	if ordered[0].Peer != "a" || ordered[1].Peer != "b" {
		t.Errorf("offers ordered %v, want a (stage 0) then b (stage 1)", ordered)
	}

	held["b"] = append(held["b"], Held{Stage: 1, Steps: []int{18}})
	held["b"] = held["b"][1:]
	if rp, _, err := resumePoint(sp, 7, 50, offers, held); err != nil || rp.Step != 18 {
		t.Errorf("with both at 18: %+v, %v; want step 18", rp, err)
	}

	// Only steps whose rows are all recorded count; the error says which stage lacks
	// which step, and blames no node.
	if _, _, err := resumePoint(sp, 7, 17, offers, held); !errors.Is(err, errNoCommonStep) || err.Error() !=
		"no common checkpoint: no step of run 0000000000000007 has a checkpoint of every stage on the nodes offered: "+
			"stage 0 holds step 10; stage 1 holds only step 18, after step 17 "+
			"(metrics.jsonl records every step only up to step 17; a run resumes from no later step)" {
		t.Errorf("stage 1 held only after the recorded steps: %v", err)
	}
	delete(held, "b")
	if _, _, err := resumePoint(sp, 7, 50, offers, held); err == nil || !strings.Contains(err.Error(), "stage 1 holds none") ||
		strings.Contains(err.Error(), "()") || strings.Contains(err.Error(), "restart") {
		t.Errorf("stage 1's state nowhere: %v, want an error saying stage 1 holds none", err)
	}
}

func TestResumePointGivesEachReplicaItsOwnHolder(t *testing.T) {
	sp := resumeTestSpec(t, 1, 2)
	offers := []assign.Offer{{Peer: "a"}, {Peer: "b"}}
	// Both nodes hold a checkpoint of stage 0 (one per replica); each cell needs its own.
	held := map[string][]Held{
		"a": {{Stage: 0, Replica: 1, Steps: []int{20}}},
		"b": {{Stage: 0, Replica: 0, Steps: []int{20}}},
	}
	rp, ordered, err := resumePoint(sp, 3, 50, offers, held)
	if err != nil || rp.Step != 20 {
		t.Fatalf("%+v, %v", rp, err)
	}
	if ordered[0].Peer != "b" || ordered[1].Peer != "a" {
		t.Errorf("offers ordered %v, want b (replica 0) then a (replica 1)", ordered)
	}
}

func TestResumeStopsAtTheLastStepWhoseRowsAreAllRecorded(t *testing.T) {
	path := filepath.Join(t.TempDir(), "metrics.jsonl")
	// Step 3's row (an evaluated step) never came; a torn row ends the file.
	rows := `{"step":1,"loss":5}
{"step":2,"loss":4.5}
{"step":4,"loss":4}
{"step":5,"lo`
	if err := os.WriteFile(path, []byte(rows), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := recordedThrough(path); got != 2 {
		t.Errorf("recordedThrough = %d, want 2: step 3's row is missing", got)
	}
	// With replicas, replica 1's last row (step 4) bounds it too: its step 5 never came.
	reps := `{"step":4,"loss":4,"replica":0}
{"step":4,"loss":4,"replica":1}
{"step":5,"loss":4,"replica":0}
{"step":6,"loss":4,"replica":0}
`
	if err := os.WriteFile(path, []byte(strings.Replace(strings.Replace(rows, `{"step":4,"loss":4}`+"\n", "", 1), `{"step":5,"lo`, "", 1)+`{"step":3,"loss":4.2,"replica":0}
{"step":1,"loss":5,"replica":1}
{"step":2,"loss":4.5,"replica":1}
{"step":3,"loss":4.2,"replica":1}
`+reps), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := recordedThrough(path); got != 4 {
		t.Errorf("with replicas, recordedThrough = %d, want 4: replica 1 has no row after step 4", got)
	}
	if got := recordedThrough(filepath.Join(t.TempDir(), "none.jsonl")); got != 0 {
		t.Errorf("no metrics file: %d, want 0", got)
	}
}

// A restarted node dials each launcher once, the latest run's first, with every address
// its runs recorded: an earlier launch by the same key, at a port now dead, must not
// hide the launcher of the run the node was in.
func TestLauncherTargetsMergeRunsOfOneLauncherLatestFirst(t *testing.T) {
	dir := t.TempDir()
	const a = "12D3KooWLRPJAA5o6Gp5PvTRWjWMDbfcmKXnu2Zh3ztz6UYFXmG9"
	const b = "12D3KooWRpXgfSPBJLhavAgZQADKH27s33oT2bHNDKEtPdWVHaiB"
	now := time.Now()
	write := func(run, launcher, addr string, age time.Duration) {
		d := filepath.Join(dir, run)
		if err := writeLauncherRecord(d, &Plan{Launcher: launcher, LauncherAddrs: []string{addr}}); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(filepath.Join(d, launcherFile), now.Add(-age), now.Add(-age)); err != nil {
			t.Fatal(err)
		}
	}
	// Run directories sort by ID, not by age: the earlier run of launcher a sorts first.
	write("00aa", a, "/ip4/127.0.0.1/tcp/1001", time.Hour)
	write("00bb", b, "/ip4/127.0.0.1/tcp/2001", 30*time.Minute)
	write("ffaa", a, "/ip4/127.0.0.1/tcp/1002", time.Minute)
	write("ffcc", b, "/ip4/127.0.0.1/tcp/2002", 48*time.Hour) // too old to dial
	got := launcherTargets(filepath.Join(dir, "*"), now)
	if len(got) != 2 || got[0].id.String() != a || got[1].id.String() != b {
		t.Fatalf("targets %+v, want launcher a (latest run) then b", got)
	}
	if want := []string{"/ip4/127.0.0.1/tcp/1002", "/ip4/127.0.0.1/tcp/1001"}; !slices.Equal(got[0].addrs, want) {
		t.Errorf("launcher a's addresses %v, want %v (the latest run's first)", got[0].addrs, want)
	}
	if filepath.Base(got[0].runDir) != "ffaa" || !slices.Equal(got[1].addrs, []string{"/ip4/127.0.0.1/tcp/2001"}) {
		t.Errorf("targets %+v: want a's latest run ffaa, b without its stale record", got)
	}
}

// A stage checkpoint whose bytes changed since it was written is named in the node's
// log and not offered; the older good one beside it is.
func TestACorruptCheckpointIsLoggedAndTheOlderGoodOneOffered(t *testing.T) {
	dir := t.TempDir()
	const sp = "name: x\n"
	base := stageBase(0, 0, 1)
	for i, p := range []ckPair{pairAt(dir, base), pairAt(dir, base+".step-60")} {
		meta := map[string]string{train.MetaStep: strconv.Itoa(120 - 60*i), metaResumable: "1", train.MetaSpec: sp}
		vals := []float32{1, 2, 3, float32(i)}
		if err := errors.Join(shard.SaveTensors(p.weights, meta, []shard.Named{{Name: "w", Data: vals}}),
			shard.SaveTensors(p.state, meta, []shard.Named{{Name: "adam_m", Data: vals}})); err != nil {
			t.Fatal(err)
		}
	}
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	if got := heldIn(dir, sp, 1, 1, log); len(got) != 1 || !slices.Equal(got[0].Steps, []int{120, 60}) {
		t.Fatalf("held before the corruption: %+v", got)
	}
	newest := stagePairs(dir, base)[0].weights
	b, err := os.ReadFile(newest)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-2] ^= 0x10 // one bit of one weight
	if err := os.WriteFile(newest, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if got := heldIn(dir, sp, 1, 1, log); len(got) != 1 || !slices.Equal(got[0].Steps, []int{60}) {
		t.Fatalf("held after the newest weights changed: %+v, want step 60 only", got)
	}
	if !strings.Contains(logs.String(), "corrupt checkpoint") || !strings.Contains(logs.String(), newest) {
		t.Fatalf("the node's log does not name the corrupt file:\n%s", logs.String())
	}
}

// A stage keeps every checkpoint until the launcher says which step it has recorded
// through; then only that one and those after.
func TestStageKeepsCheckpointsBackToTheRecordedStep(t *testing.T) {
	dir := t.TempDir()
	base := stageBase(0, 0, 1)
	write := func(step int, whole bool) {
		t.Helper()
		if err := rotate(dir, base, step, whole); err != nil {
			t.Fatal(err)
		}
		meta := map[string]string{train.MetaStep: strconv.Itoa(step), train.MetaSpec: "s"}
		if whole {
			meta[metaResumable] = "1"
		}
		p := pairAt(dir, base)
		ts := []shard.Named{{Name: "x", Data: []float32{float32(step)}}}
		if err := errors.Join(shard.SaveTensors(p.weights, meta, ts), shard.SaveTensors(p.state, meta, ts)); err != nil {
			t.Fatal(err)
		}
	}
	held := func() []int {
		hs := heldIn(dir, "s", 1, 1, slog.New(slog.NewTextHandler(io.Discard, nil)))
		if len(hs) != 1 {
			return nil
		}
		return hs[0].Steps
	}
	for _, s := range []int{5, 10, 12, 12} {
		write(s, true)
	}
	if got := held(); !slices.Equal(got, []int{12, 10, 5}) {
		t.Fatalf("held %v, want [12 10 5]", got)
	}
	write(13, false) // stopped mid-step: kept beside, never instead of, the whole ones
	if got := held(); !slices.Equal(got, []int{12, 10, 5}) {
		t.Fatalf("after a mid-step checkpoint, held %v, want [12 10 5]", got)
	}
	if n := prune(dir, base, 11); n != 0 || !slices.Equal(held(), []int{12, 10, 5}) {
		t.Errorf("pruned %d for a step not held here; held %v", n, held())
	}
	if n := prune(dir, base, 10); n != 1 || !slices.Equal(held(), []int{12, 10}) {
		t.Errorf("pruned %d back to step 10; held %v, want [12 10]", n, held())
	}
}
