package launcher

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/wire"
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
	held := map[string][]wire.Held{
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

	held["b"] = append(held["b"], wire.Held{Stage: 1, Steps: []int{18}})
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
	held := map[string][]wire.Held{
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
