package train

import (
	"time"

	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/stage"
	"github.com/pipeswarm/pipeswarm/shard"
)

// Evaluator computes the validation loss: the mean next-byte loss over the
// consecutive non-overlapping windows of seq_len+1 bytes from the start of the
// validation split (remainder dropped), EvalBatch windows per forward pass, at most
// the spec's eval_batches batches of them.
type Evaluator struct {
	stages  []*shard.Stage
	bounds  []*stage.Boundary // between stages, as in training; nil: none
	val     []int32
	batches int                   // at most this many batches; 0: every window
	tapes   map[int][]*shard.Tape // by batch size: EvalBatch, and the last partial batch
	// trace, if set, sees each stage's forward of each batch timed, with the bytes
	// of the frame it sends on.
	trace func(stage, batch int, d time.Duration, bytes int64)
}

// NewEvaluator evaluates stages (a whole model, in order) on the first batches
// batches of windows of val (every window if batches is 0).
func NewEvaluator[T data.Token](stages []*shard.Stage, val []T, batches int) *Evaluator {
	return &Evaluator{stages: stages, val: asInt32(val), batches: batches, tapes: map[int][]*shard.Tape{}}
}

// asInt32 returns tokens as int32s: the slice itself when it holds them already.
func asInt32[T data.Token](tokens []T) []int32 {
	if t, ok := any(tokens).([]int32); ok {
		return t
	}
	out := make([]int32, len(tokens))
	for i, t := range tokens {
		out[i] = int32(t)
	}
	return out
}

// EvalWindows is how many validation windows an evaluation of the first batches
// batches (0: all) of val's windows of seqLen+1 bytes covers.
func EvalWindows[T data.Token](val []T, seqLen, batches int) int {
	n := data.ValWindows(val, seqLen)
	if batches > 0 {
		n = min(n, batches*EvalBatch)
	}
	return n
}

// Reuse lets the evaluator run on tapes the caller already holds (one per stage,
// all of one batch size) instead of allocating its own; the trainer lends its
// training tapes, which are idle between steps, and so keeps peak memory down.
func (e *Evaluator) Reuse(tapes []*shard.Tape) {
	if len(tapes) == len(e.stages) && len(tapes) > 0 && tapes[0].T == e.stages[0].Config.SeqLen {
		e.tapes[tapes[0].B] = tapes
	}
}

// Windows is the number of validation windows an evaluation covers.
func (e *Evaluator) Windows() int { return EvalWindows(e.val, e.stages[0].Config.SeqLen, e.batches) }

// Loss runs the model over every window and returns the mean loss per byte. It does
// not touch parameter gradients.
func (e *Evaluator) Loss() float64 {
	seq := e.stages[0].Config.SeqLen
	n := e.Windows()
	var sum float64
	in, tg := make([]int32, EvalBatch*seq), make([]int32, EvalBatch*seq)
	for lo := 0; lo < n; lo += EvalBatch {
		b := min(EvalBatch, n-lo)
		tapes := e.Tapes(b)
		inputs, targets := in[:b*seq], tg[:b*seq]
		for i := range b {
			data.ValWindow(e.val, seq, lo+i, inputs[i*seq:(i+1)*seq], targets[i*seq:(i+1)*seq])
		}
		var x []float32
		last := len(e.stages) - 1
		var prev time.Duration // the previous stage's forward, until its frame is carried
		for i, s := range e.stages {
			t0 := time.Now()
			if i > 0 && e.bounds != nil {
				x = e.bounds[i-1].Forward(x, inputs, targets, b, seq, false)
				if e.trace != nil {
					e.trace(i-1, lo/EvalBatch, prev+time.Since(t0), e.bounds[i-1].LastBytes)
				}
				t0 = time.Now()
			}
			x = s.Forward(tapes[i], inputs, x)
			if i == last {
				sum += s.Loss(tapes[last], targets, 1) * float64(b)
				if e.trace != nil {
					e.trace(i, lo/EvalBatch, time.Since(t0), 0)
				}
			}
			prev = time.Since(t0)
		}
	}
	return sum / float64(n)
}

// Tapes returns the evaluator's tapes (one per stage) for batches of b windows.
func (e *Evaluator) Tapes(b int) []*shard.Tape {
	if t, ok := e.tapes[b]; ok {
		return t
	}
	t := make([]*shard.Tape, len(e.stages))
	for i, s := range e.stages {
		t[i] = s.NewTape(b, s.Config.SeqLen)
	}
	e.tapes[b] = t
	return t
}
