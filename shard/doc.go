// Package shard holds the model split into pipeline stages: a Llama-style decoder
// (token embedding, RoPE, pre-norm RMSNorm, causal multi-head attention, SwiGLU MLP,
// final RMSNorm, LM head, cross-entropy) computed exactly as Hugging Face's
// LlamaForCausalLM computes it, cut by layer ranges into stages that each allocate only
// their own parameters.
//
// Every layer is a forward/backward pair over flat row-major float32 buffers, in the
// manner of llm.c, computed by a shard/backend.Backend (cpu32 or bf16) on buffers it
// owns: a stage's forward and backward do no arithmetic of their own. A stage's
// parameters, and its gradients, each live in one flat host buffer so optimiser
// steps, all-reduce and checkpoints are loops over one slice.
// Initialisation is a pure function of (run seed, tensor name), so any replica of a
// stage starts identical without a download. The package does no logging and no
// network I/O.
package shard
