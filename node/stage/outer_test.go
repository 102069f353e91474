package stage

import (
	"math"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/shard"
)

// outerSpec is fullSpec without a subspace and with a lossless outer step of plain
// averaging, whose arithmetic is then exact.
func outerSpec(t *testing.T) *spec.Spec {
	return testSpec(t, strings.NewReplacer("outer_lr: 0.7, outer_momentum: 0.9, sync: int8/32", "outer_lr: 1.0, outer_momentum: 0, sync: fp32",
		"compression: {subspace: 8, gradients: int8/32}\n", "").Replace(fullSpec))
}

func TestFragmentsCutAtTensorBoundariesAndCoverTheStage(t *testing.T) {
	sp := outerSpec(t)
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
	sp := outerSpec(t)
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
