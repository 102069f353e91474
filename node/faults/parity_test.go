package faults

import (
	"path/filepath"
	"testing"
	"time"
)

// With the residual subspace and lossy codecs on the wire, the pipelined run still
// takes exactly the single-process trainer's steps, bit for bit: both send every
// boundary tensor through the same frames. And the codecs shrink what crosses.
func TestCompressedPipelineMatchesTrainExactly(t *testing.T) {
	sw := newSwarm(t, 2)
	sp := mustSpec(t, `name: compressed
seed: 11
eval_interval: 3
model: {d_model: 32, n_layers: 4, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 2, micro_batches: 2}
train: {batch_size: 4, steps: 6, lr: 0.003, warmup: 2}
data: {val_fraction: 0.005}
compression: {subspace: 8, dense_tail: 1, activations: int8/32+zstd, gradients: int8/32}
`)
	out := filepath.Join(sw.dir, "launched")
	res, err := sw.launch(sp, out, false, sw.peers()).wait(t, 120*time.Second)
	if err != nil {
		t.Fatalf("launch: %v", err)
	}
	sameAsTrain(t, sp, out)
	// k = 8 int8 values with zstd plus two 1-byte token ids: far below the 4·32 bytes of fp32.
	tokens := int64(res.BoundaryFwdSteps[0]) * int64(sp.TokensPerStep())
	if fwd := float64(res.BoundaryFwd[0]) / float64(tokens); fwd <= 0 || fwd > 16 {
		t.Errorf("forward bytes per token %.1f (%d bytes over %d tokens), want at most 16", fwd, res.BoundaryFwd[0], tokens)
	} else {
		t.Logf("forward: %.1f bytes per token", fwd)
	}
}
