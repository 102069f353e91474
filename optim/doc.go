// Package optim holds the optimisers and training-loop arithmetic of a pipeswarm
// stage, all over flat []float32 buffers:
//
//   - AdamW, the inner optimiser, with decoupled weight decay restricted to the
//     parameter ranges (Segments) that hold matrices;
//   - Nesterov, the DiLoCo outer optimiser, SGD with Nesterov momentum applied to a
//     pseudo-gradient (the snapshot minus the parameters after the inner steps);
//   - SumSquares, ClipFactor and Scale for clipping by a global gradient norm that
//     may span several buffers;
//   - Cosine, a linear-warmup cosine-decay learning-rate schedule.
//
// Parameters, gradients and pseudo-gradients are flat slices owned by the caller;
// the optimisers own only their state (moments, momentum, step count), which they
// expose as live flat slices so a checkpoint is a copy of a few buffers. Update
// rules follow the PyTorch optimisers of the same name, so a run can be checked
// against a reference implementation step by step.
//
// A length mismatch between a buffer and the size an optimiser was built for is a
// programmer error and panics; invalid configuration and bad checkpoint state are
// returned as errors. The package does no I/O and does not log.
package optim
