package train

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"

	"github.com/pipeswarm/pipeswarm/shard"
)

// Sampling is how Generate picks each next token from the model's logits.
type Sampling struct {
	// Temperature divides the logits before the softmax; 0 is greedy (the most likely
	// token, the lowest id among equals).
	Temperature float64
	// TopK keeps only the K most likely tokens (0: all).
	TopK int
	// TopP keeps the fewest most likely tokens whose probabilities sum to at least P
	// (nucleus sampling; 1 or 0: all).
	TopP float64
	// Seed seeds the draws: the same seed, model and prompt give the same text.
	Seed uint64
}

// ErrSampling is wrapped by Validate's errors.
var ErrSampling = errors.New("invalid sampling")

// Validate reports the first impossible field, by its flag's name.
func (s Sampling) Validate() error {
	switch {
	case !(s.Temperature >= 0) || math.IsInf(s.Temperature, 1):
		return fmt.Errorf("%w: --temperature %v: want 0 (greedy) or a positive number", ErrSampling, s.Temperature)
	case s.TopK < 0:
		return fmt.Errorf("%w: --top-k %d: want 0 (every token) or a positive count", ErrSampling, s.TopK)
	case !(s.TopP >= 0 && s.TopP <= 1):
		return fmt.Errorf("%w: --top-p %v: want a probability in (0, 1], or 0 for every token", ErrSampling, s.TopP)
	}
	return nil
}

// Generator runs a whole model, its stages in order, forward on a growing context.
type Generator struct {
	stages []*shard.Stage
	tapes  map[int][]*shard.Tape // by context length
	probs  []float64
	order  []int
}

// NewGenerator generates from stages, a whole model in order (embedding first, head
// last), whose parameters the caller has loaded.
func NewGenerator(stages []*shard.Stage) *Generator {
	return &Generator{stages: stages, tapes: map[int][]*shard.Tape{}}
}

// Logits returns the model's logits [V] for the token after context, read from a
// forward of the last seq_len tokens of context. The result is valid until the next
// call.
func (g *Generator) Logits(context []int32) []float32 {
	c := g.stages[0].Config
	if len(context) == 0 {
		panic("train: logits of an empty context")
	}
	if len(context) > c.SeqLen {
		context = context[len(context)-c.SeqLen:]
	}
	t := len(context)
	tapes, ok := g.tapes[t]
	if !ok {
		// A context grows by one token a step: the shorter tapes are done with.
		clear(g.tapes)
		for _, s := range g.stages {
			tapes = append(tapes, s.NewTape(1, t))
		}
		g.tapes[t] = tapes
	}
	var x []float32
	for i, s := range g.stages {
		x = s.Forward(tapes[i], context, x)
	}
	return x[(t-1)*c.Vocab : t*c.Vocab]
}

// Generate appends n tokens to prompt, each drawn from the model's distribution after
// the text so far as o says, and returns them (without the prompt). It stops early,
// with what it has and ctx's error, when ctx is done.
func (g *Generator) Generate(ctx context.Context, prompt []int32, n int, o Sampling) ([]int32, error) {
	rng := rand.New(rand.NewPCG(o.Seed, 0x9e3779b97f4a7c15))
	text := slices.Clone(prompt)
	out := make([]int32, 0, n)
	for range n {
		if err := ctx.Err(); err != nil {
			return out, err
		}
		tok := g.pick(g.Logits(text), o, rng)
		text = append(text, tok)
		out = append(out, tok)
	}
	return out, nil
}

// pick draws the next token from logits as o says.
func (g *Generator) pick(logits []float32, o Sampling, rng *rand.Rand) int32 {
	if o.Temperature == 0 {
		best := 0
		for i, v := range logits {
			if v > logits[best] {
				best = i
			}
		}
		return int32(best)
	}
	// Tokens by falling logit (ties by id), so that top-k and top-p cut a prefix.
	g.order = g.order[:0]
	for i := range logits {
		g.order = append(g.order, i)
	}
	slices.SortStableFunc(g.order, func(a, b int) int {
		switch {
		case logits[a] > logits[b]:
			return -1
		case logits[a] < logits[b]:
			return 1
		}
		return 0
	})
	keep := len(g.order)
	if o.TopK > 0 {
		keep = min(keep, o.TopK)
	}
	g.probs = g.probs[:0]
	hi := float64(logits[g.order[0]])
	var sum float64
	for _, i := range g.order[:keep] {
		p := math.Exp((float64(logits[i]) - hi) / o.Temperature)
		g.probs = append(g.probs, p)
		sum += p
	}
	if o.TopP > 0 && o.TopP < 1 {
		var acc float64
		for k, p := range g.probs {
			acc += p / sum
			if acc >= o.TopP {
				keep = k + 1
				break
			}
		}
		g.probs = g.probs[:keep]
		sum = 0
		for _, p := range g.probs {
			sum += p
		}
	}
	u := rng.Float64() * sum
	for k, p := range g.probs {
		if u < p {
			return int32(g.order[k])
		}
		u -= p
	}
	return int32(g.order[len(g.probs)-1])
}
