package stage

import (
	"math"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/shard"
)

const replicaSpec = `name: reps
seed: 5
eval_interval: 4
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 2, micro_batches: 2, replicas: 2}
train: {batch_size: 4, steps: 8, lr: 0.003, warmup: 1}
diloco: {inner_steps: 4, outer_lr: 1.0, outer_momentum: 0, sync: int8/32}
data: {val_fraction: 0.01}
`

func TestFragmentsCutAtTensorBoundariesAndCoverTheStage(t *testing.T) {
	sp := testSpec(t, replicaSpec)
	st, err := shard.NewStages(ModelConfig(sp), 2)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []int{1, 2, 3, 5} {
		frags, err := Fragments(st[0], f)
		if err != nil {
			t.Fatal(err)
		}
		if len(frags) != f || frags[0].Lo != 0 || frags[f-1].Hi != len(st[0].Params) {
			t.Fatalf("F=%d: fragments %v do not cover [0, %d)", f, frags, len(st[0].Params))
		}
		starts := map[int]bool{}
		for _, tn := range st[0].Tensors() {
			starts[tn.Off] = true
		}
		for i, fr := range frags {
			if fr.Len() <= 0 || !starts[fr.Lo] || (i > 0 && frags[i-1].Hi != fr.Lo) {
				t.Fatalf("F=%d: fragment %d %v is empty, not at a tensor start, or not adjacent", f, i, fr)
			}
		}
	}
	if _, err := Fragments(st[0], len(st[0].Tensors())+1); err == nil {
		t.Error("more fragments than tensors: no error")
	}
}

// An overlapped outer step (Streaming DiLoCo) keeps what the inner step taken during
// its all-reduce changed: local = new global + (local now − local when it began).
func TestOverlappedOuterStepKeepsTheInnerProgressMadeMeanwhile(t *testing.T) {
	sp := testSpec(t, strings.Replace(replicaSpec, "sync: int8/32", "sync: fp32", 1))
	st, err := shard.NewStages(ModelConfig(sp), 2)
	if err != nil {
		t.Fatal(err)
	}
	s := st[1]
	s.Init(3)
	o, err := NewOuter(sp, s)
	if err != nil {
		t.Fatal(err)
	}
	for i := range s.Params {
		s.Params[i] += 0.01 // trained a little since the last sync
	}
	y := append([]float32(nil), o.Begin(0, s.Params)...)
	began := append([]float32(nil), s.Params...)
	for i := range s.Params {
		s.Params[i] += 0.002 // the inner step taken while the all-reduce runs
	}
	avg := append([]float32(nil), y...) // alone: the average is its own change
	o.Apply(0, y, y, avg, s, true)
	for i, v := range s.Params {
		want := began[i] + 0.002 // global moved to where the replica was when it began
		if math.Abs(float64(v-want)) > 1e-6 || math.Abs(float64(o.Global[i]-began[i])) > 1e-6 {
			t.Fatalf("param %d: local %v, global %v; want local %v and global %v", i, v, o.Global[i], want, began[i])
		}
	}
}
