package shard

import (
	"errors"
	"fmt"
)

// ErrConfig is wrapped by every error about an impossible model shape.
var ErrConfig = errors.New("shard: invalid model config")

// Config is the shape of the whole model; every stage of a run shares it.
type Config struct {
	Vocab     int     // vocabulary size (256 for bytes)
	DModel    int     // residual width d
	NLayers   int     // transformer blocks L
	NHeads    int     // attention heads; head dim = DModel/NHeads
	DFF       int     // SwiGLU hidden width
	SeqLen    int     // maximum sequence length T (RoPE table size)
	RopeTheta float64 // RoPE base, 10000 in Llama
	NormEps   float32 // RMSNorm epsilon, 1e-5 in Llama
}

// HeadDim is DModel/NHeads.
func (c Config) HeadDim() int { return c.DModel / c.NHeads }

// Validate reports the first impossible field.
func (c Config) Validate() error {
	switch {
	case c.Vocab < 2:
		return fmt.Errorf("%w: vocab %d < 2", ErrConfig, c.Vocab)
	case c.DModel < 1 || c.NHeads < 1 || c.DModel%c.NHeads != 0:
		return fmt.Errorf("%w: d_model %d not a positive multiple of n_heads %d", ErrConfig, c.DModel, c.NHeads)
	case c.HeadDim()%2 != 0:
		return fmt.Errorf("%w: head dim %d is odd; RoPE rotates pairs", ErrConfig, c.HeadDim())
	case c.NLayers < 1:
		return fmt.Errorf("%w: n_layers %d < 1", ErrConfig, c.NLayers)
	case c.DFF < 1:
		return fmt.Errorf("%w: d_ff %d < 1", ErrConfig, c.DFF)
	case c.SeqLen < 1:
		return fmt.Errorf("%w: seq_len %d < 1", ErrConfig, c.SeqLen)
	case c.RopeTheta <= 0:
		return fmt.Errorf("%w: rope_theta %g <= 0", ErrConfig, c.RopeTheta)
	case c.NormEps <= 0:
		return fmt.Errorf("%w: norm_eps %g <= 0", ErrConfig, c.NormEps)
	}
	return nil
}

// Range is the half-open range of global layer indices [Lo, Hi) a stage owns.
type Range struct{ Lo, Hi int }

// Len is the number of layers in r.
func (r Range) Len() int { return r.Hi - r.Lo }

// SplitLayers cuts nLayers into stages contiguous ranges as evenly as possible; the
// first nLayers%stages stages take one layer more.
func SplitLayers(nLayers, stages int) ([]Range, error) {
	if stages < 1 || stages > nLayers {
		return nil, fmt.Errorf("%w: %d stages for %d layers, want 1..%d", ErrConfig, stages, nLayers, nLayers)
	}
	out := make([]Range, stages)
	lo := 0
	for s := range out {
		n := nLayers / stages
		if s < nLayers%stages {
			n++
		}
		out[s] = Range{lo, lo + n}
		lo += n
	}
	return out, nil
}
