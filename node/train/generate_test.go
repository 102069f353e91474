package train

import (
	"context"
	"math"
	"slices"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/shard"
)

// trainedStages trains smallSpec's model (2 stages) for steps steps on the built-in
// corpus and returns its stages.
func trainedStages(t *testing.T, steps int) []*shard.Stage {
	t.Helper()
	sp := testSpec(t, smallSpec)
	sp.Pipeline.Stages = 2
	m, err := newModel(sp)
	if err != nil {
		t.Fatal(err)
	}
	text, _, err := Corpus("")
	if err != nil {
		t.Fatal(err)
	}
	sampler, err := data.NewSampler(data.Widen(text), sp.Model.SeqLen, sp.Seed, 0)
	if err != nil {
		t.Fatal(err)
	}
	n := sp.Train.BatchSize * sp.Model.SeqLen
	inputs, targets := make([]int32, n), make([]int32, n)
	for range steps {
		m.step(sampler, inputs, targets, 3e-3, 1, nil)
	}
	return m.stages
}

func bytesOf(s string) []int32 {
	out := make([]int32, len(s))
	for i := range len(s) {
		out[i] = int32(s[i])
	}
	return out
}

// Greedy generation is the argmax of the model's own forward over the text so far, at
// every token, whatever the seed; the logits it reads are those of a forward over the
// whole text at that position.
func TestGreedyGenerationFollowsTheModelsForward(t *testing.T) {
	stages := trainedStages(t, 30)
	g := NewGenerator(stages)
	prompt := bytesOf("The ")
	const n = 20 // prompt and output within seq_len 32: the context is never cut
	out := gen(t, g, prompt, n, Sampling{Seed: 1})
	if again := gen(t, NewGenerator(stages), prompt, n, Sampling{Seed: 99}); !slices.Equal(again, out) {
		t.Fatalf("greedy output %q, then %q with another seed", string(bytesFrom(out)), string(bytesFrom(again)))
	}
	// One forward over prompt and output, as training runs it.
	all := append(slices.Clone(prompt), out...)
	c := stages[0].Config
	var x []float32
	for _, s := range stages {
		x = s.Forward(s.NewTape(1, len(all)), all, x)
	}
	for p := len(prompt) - 1; p < len(all)-1; p++ {
		row := x[p*c.Vocab : (p+1)*c.Vocab]
		best := 0
		for i, v := range row {
			if v > row[best] {
				best = i
			}
		}
		if int32(best) != all[p+1] {
			t.Errorf("token %d: generated %d, the forward's argmax is %d", p+1, all[p+1], best)
		}
		got := g.Logits(all[:p+1])
		for i := range row {
			if d := math.Abs(float64(got[i] - row[i])); d > 1e-5*(1+math.Abs(float64(row[i]))) {
				t.Fatalf("position %d: logit %d is %v generating, %v in the whole forward", p, i, got[i], row[i])
			}
		}
	}
	t.Logf("greedy after %q: %q", "The ", string(bytesFrom(out)))
}

func bytesFrom(ids []int32) []byte {
	b := make([]byte, len(ids))
	for i, id := range ids {
		b[i] = byte(id)
	}
	return b
}

// Sampling is deterministic for a seed, differs between seeds, and top-k 1 is greedy.
func TestSamplingIsDeterministicForASeed(t *testing.T) {
	stages := trainedStages(t, 10)
	prompt := bytesOf("To be")
	const n = 40
	o := Sampling{Temperature: 1, TopK: 50, TopP: 0.95, Seed: 7}
	a := gen(t, NewGenerator(stages), prompt, n, o)
	if b := gen(t, NewGenerator(stages), prompt, n, o); !slices.Equal(a, b) {
		t.Errorf("seed 7 gave %q, then %q", bytesFrom(a), bytesFrom(b))
	}
	o.Seed = 8
	if b := gen(t, NewGenerator(stages), prompt, n, o); slices.Equal(a, b) {
		t.Errorf("seeds 7 and 8 gave the same %d tokens %q", n, bytesFrom(a))
	}
	greedy := gen(t, NewGenerator(stages), prompt, n, Sampling{})
	if k1 := gen(t, NewGenerator(stages), prompt, n, Sampling{Temperature: 0.8, TopK: 1, Seed: 3}); !slices.Equal(k1, greedy) {
		t.Errorf("top-k 1 gave %q, greedy %q", bytesFrom(k1), bytesFrom(greedy))
	}
	if tiny := gen(t, NewGenerator(stages), prompt, n, Sampling{Temperature: 1, TopP: 1e-9, Seed: 3}); !slices.Equal(tiny, greedy) {
		t.Errorf("top-p 1e-9 gave %q, greedy %q", bytesFrom(tiny), bytesFrom(greedy))
	}
	for _, bad := range []Sampling{{Temperature: -1}, {TopK: -1}, {TopP: 1.5}, {Temperature: math.NaN()}} {
		if bad.Validate() == nil {
			t.Errorf("%+v validated", bad)
		}
	}
}

func gen(t *testing.T, g *Generator, prompt []int32, n int, o Sampling) []int32 {
	t.Helper()
	out, err := g.Generate(context.Background(), prompt, n, o)
	if err != nil || len(out) != n {
		t.Fatalf("Generate: %d tokens, %v; want %d", len(out), err, n)
	}
	return out
}
