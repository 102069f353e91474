package ckpt

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/stage"
	"github.com/pipeswarm/pipeswarm/shard"
)

// A stage checkpoint whose bytes changed since it was written is named in the node's
// log and not offered; the older good one beside it is.
func TestACorruptCheckpointIsLoggedAndTheOlderGoodOneOffered(t *testing.T) {
	dir := t.TempDir()
	const sp = "name: x\n"
	base := Base(0, 0, 1)
	for i, p := range []Pair{PairAt(dir, base), PairAt(dir, base+".step-60")} {
		meta := map[string]string{stage.MetaStep: strconv.Itoa(120 - 60*i), MetaResumable: "1", stage.MetaSpec: sp}
		vals := []float32{1, 2, 3, float32(i)}
		if err := errors.Join(shard.SaveTensors(p.Weights, meta, []shard.Named{{Name: "w", Data: vals}}),
			shard.SaveTensors(p.State, meta, []shard.Named{{Name: "adam_m", Data: vals}})); err != nil {
			t.Fatal(err)
		}
	}
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	if got := HeldIn(dir, sp, 1, 1, log); len(got) != 1 || !slices.Equal(got[0].Steps, []int{120, 60}) {
		t.Fatalf("held before the corruption: %+v", got)
	}
	newest := Pairs(dir, base)[0].Weights
	b, err := os.ReadFile(newest)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-2] ^= 0x10 // one bit of one weight
	if err := os.WriteFile(newest, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if got := HeldIn(dir, sp, 1, 1, log); len(got) != 1 || !slices.Equal(got[0].Steps, []int{60}) {
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
	base := Base(0, 0, 1)
	write := func(step int, whole bool) {
		t.Helper()
		if err := Rotate(dir, base, step, whole); err != nil {
			t.Fatal(err)
		}
		meta := map[string]string{stage.MetaStep: strconv.Itoa(step), stage.MetaSpec: "s"}
		if whole {
			meta[MetaResumable] = "1"
		}
		p := PairAt(dir, base)
		ts := []shard.Named{{Name: "x", Data: []float32{float32(step)}}}
		if err := errors.Join(shard.SaveTensors(p.Weights, meta, ts), shard.SaveTensors(p.State, meta, ts)); err != nil {
			t.Fatal(err)
		}
	}
	held := func() []int {
		hs := HeldIn(dir, "s", 1, 1, slog.New(slog.NewTextHandler(io.Discard, nil)))
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
	if n := Prune(dir, base, 11); n != 0 || !slices.Equal(held(), []int{12, 10, 5}) {
		t.Errorf("pruned %d for a step not held here; held %v", n, held())
	}
	if n := Prune(dir, base, 10); n != 1 || !slices.Equal(held(), []int{12, 10}) {
		t.Errorf("pruned %d back to step 10; held %v, want [12 10]", n, held())
	}
}
