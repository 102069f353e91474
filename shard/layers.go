package shard

import "math"

// ropeTables returns cos and sin [T, hd/2] for positions 0..T-1, as Hugging Face's
// LlamaRotaryEmbedding computes them (inv_freq_i = theta^(-2i/hd)).
func ropeTables(seqLen, headDim int, theta float64) (cos, sin []float32) {
	h := headDim / 2
	cos, sin = make([]float32, seqLen*h), make([]float32, seqLen*h)
	for i := range h {
		inv := float64(float32(1 / math.Pow(theta, float64(2*i)/float64(headDim))))
		for t := range seqLen {
			a := float64(float32(float64(t) * inv))
			cos[t*h+i], sin[t*h+i] = float32(math.Cos(a)), float32(math.Sin(a))
		}
	}
	return cos, sin
}
