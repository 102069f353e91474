// Package assign staffs a run: it estimates the memory a peer needs to hold one pipeline
// stage and gives each stage of a run one of the peers that offered to train.
//
// Need counts, arithmetically, what the shard package allocates for a stage (parameters,
// gradients, optimiser moments, activation tapes, backward workspace), so a launcher can
// plan a model far larger than itself without allocating any of it.
package assign

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/pipeswarm/pipeswarm/shard"
)

// ErrUnstaffed is wrapped by Plan's error when some stage has no peer to hold it.
var ErrUnstaffed = errors.New("run cannot be staffed")

// Overhead is the fixed memory Need adds for everything that is not a stage buffer: the Go
// runtime, libp2p, message buffers, the codec's scratch, and the GEMM kernels' packing
// buffers (compute.GemmPackBytes per computing goroutine, about 1.4 MB).
const Overhead = 64 << 20

// Memory is what a peer needs to hold one stage, by part, in bytes.
type Memory struct {
	Weights     int64 // the stage's parameters, float32
	Grads       int64 // their gradients, float32
	Optimizer   int64 // AdamW's two moments, float32
	Activations int64 // the activation tapes of the micro-batches in flight
	Evaluation  int64 // the tape of a validation batch, where it is not a training tape's shape
	Workspace   int64 // the backward workspace and the RoPE tables, shared by the tapes
	Overhead    int64 // Overhead: the runtime, libp2p, buffers
}

// Total is the sum of the parts.
func (m Memory) Total() int64 {
	return m.Weights + m.Grads + m.Optimizer + m.Activations + m.Evaluation + m.Workspace + m.Overhead
}

// StageMemory estimates the memory a peer needs to hold the stage owning layers r of a
// model shaped c (with the embedding if first, the final norm and head if last), training
// micro-batches of microBatch sequences of c.SeqLen tokens with up to slots of them in
// flight at once:
//
//   - parameters, gradients and AdamW's two moments: 4 float32 buffers of the stage's
//     parameter count;
//   - one activation tape per slot, as shard's Stage.NewTape allocates it; with
//     recompute, a tape holds the stage's input (and the head's activations), and the
//     blocks' activations are held once, for the micro-batch being recomputed;
//   - the tape of a validation batch of EvalBatch sequences, unless that is the
//     micro-batch (evaluation then runs on a training tape); forward only, so with
//     recompute it holds two blocks' activations, used in turn;
//   - the backward workspace and the RoPE tables the stage shares across tapes;
//   - Overhead.
//
// It panics if microBatch < 1 or slots < 0.
func StageMemory(c shard.Config, r shard.Range, first, last bool, microBatch, slots int, recompute bool) Memory {
	if microBatch < 1 || slots < 0 {
		panic(fmt.Sprintf("assign: need for %d slots of micro-batch %d", slots, microBatch))
	}
	const f32 = 4
	params := f32 * paramCount(c, r, first, last)
	in, blocks := tapeBytes(c, r, first, last, microBatch, c.SeqLen)
	acts := int64(slots) * (in + blocks)
	if recompute && slots > 0 {
		acts = int64(slots)*in + blocks
	}
	var eval int64
	if microBatch != EvalBatch {
		in, blocks := tapeBytes(c, r, first, last, EvalBatch, c.SeqLen)
		if recompute && r.Len() > 2 {
			blocks = blocks / int64(r.Len()) * 2
		}
		eval = in + blocks
	}
	return Memory{Weights: params, Grads: params, Optimizer: 2 * params, Activations: acts, Evaluation: eval,
		Workspace: f32 * stageScratch(c, microBatch, c.SeqLen), Overhead: Overhead}
}

// EvalBatch is how many validation windows a stage runs forward at once, as node/train
// evaluates.
const EvalBatch = 16

// Need is StageMemory's total.
func Need(c shard.Config, r shard.Range, first, last bool, microBatch, slots int, recompute bool) int64 {
	return StageMemory(c, r, first, last, microBatch, slots, recompute).Total()
}

// Slots is how many micro-batches stage s of stages keeps in flight: min(stages−s,
// microBatches), the most a one-forward-one-backward schedule needs, or min(inFlight,
// microBatches) if inFlight > 0 (the spec's pipeline.in_flight). Only an async run's
// forwards span steps (inFlight above microBatches): then inFlight, the most any of
// its stages keeps.
func Slots(stages, s, microBatches, inFlight int) int {
	if inFlight > microBatches {
		return inFlight
	}
	n := stages - s
	if inFlight > 0 {
		n = inFlight
	}
	return min(n, microBatches)
}

// ParamCount is the number of parameters of a model shaped c.
func ParamCount(c shard.Config) int64 {
	return paramCount(c, shard.Range{Lo: 0, Hi: c.NLayers}, true, true)
}

// paramCount is the length of the flat parameter buffer of the stage, as shard lays it out:
// per block two RMSNorm gains [d], q,k,v,o [d,d] and gate, up, down [F,d]; the embedding
// [V,d] on the first stage; the final norm [d] and LM head [V,d] on the last.
func paramCount(c shard.Config, r shard.Range, first, last bool) int64 {
	d, f, v := int64(c.DModel), int64(c.DFF), int64(c.Vocab)
	n := int64(r.Len()) * (2*d + 4*d*d + 3*f*d)
	if first {
		n += v * d
	}
	if last {
		n += d + v*d
	}
	return n
}

// tapeBytes is what Stage.NewTape(b, t) allocates, in bytes, with n = b·t tokens, in two
// parts. in: the input residual [n,d] and, on the first stage, the token ids [n] (int32);
// on the last stage hf [n,d], rstdF [n] and logits [n,V]; and the host copy of what
// Forward returns, [n,V] on the last stage, else [n,d]. blocks: per block a1, att, x2, a2,
// out [n,d], rstd1, rstd2 [n], qkv [n,3d], the attention probabilities [b,H,t,t], gate|up
// [n,2F] and m [n,F]; a stage that recomputes allocates them once per shape, two on its
// first tape and the rest in its first Backward.
func tapeBytes(c shard.Config, r shard.Range, first, last bool, b, t int) (in, blocks int64) {
	const f32, i32 = 4, 4
	n, d, f := int64(b)*int64(t), int64(c.DModel), int64(c.DFF)
	floats := n * d // x0
	if last {
		floats += n*d + n + n*int64(c.Vocab)
		floats += n * int64(c.Vocab)
	} else {
		floats += n * d
	}
	in = f32 * floats
	if first {
		in += i32 * n
	}
	block := 5*n*d + 2*n + 3*n*d + int64(b)*int64(c.NHeads)*int64(t)*int64(t) + 2*n*f + n*f
	return in, f32 * int64(r.Len()) * block
}

// stageScratch is the float32 count of what a stage holds besides its parameter-sized
// buffers and its tapes: the backward workspace for n = b·t tokens (dres, dtmp [n,d],
// dbig [n, max(3d, 2F)], dm [n,F], and the host copy of the input gradient Backward
// returns [n,d]) and the RoPE cos and sin tables [SeqLen, head dim/2].
func stageScratch(c shard.Config, b, t int) int64 {
	n, d, f := int64(b)*int64(t), int64(c.DModel), int64(c.DFF)
	ws := 3*n*d + n*max(3*d, 2*f) + n*f
	rope := 2 * int64(c.SeqLen) * int64(c.HeadDim()/2)
	return ws + rope
}

// Offer is a peer's offer to train: who it is, where to reach it, and how much it can hold.
type Offer struct {
	Peer        string // peer ID
	Addrs       []string
	MemoryBytes int64
	MaxStages   int
	// Precisions are the model.precision values the peer can compute in (fp32, bf16);
	// empty means fp32 only, as nodes from before precisions were offered.
	Precisions []string `json:",omitempty"`
	// NoExport: the node does not consent to its stages' weights being collected to
	// assemble a model (its config's export: deny).
	NoExport bool `json:",omitempty"`
}

// Runs reports whether the peer can compute a run at precision p.
func (o Offer) Runs(p string) bool {
	if len(o.Precisions) == 0 {
		return p == "fp32"
	}
	return slices.Contains(o.Precisions, p)
}

// ForPrecision keeps the offers that can compute at precision p, in order, and gives
// a reason for each it leaves out.
func ForPrecision(offers []Offer, p string) (kept []Offer, refusals []string) {
	for _, o := range offers {
		if o.Runs(p) {
			kept = append(kept, o)
			continue
		}
		have := o.Precisions
		if len(have) == 0 {
			have = []string{"fp32"}
		}
		refusals = append(refusals, fmt.Sprintf("%s cannot compute in %s (it offers %s)", o.Peer, p, strings.Join(have, ", ")))
	}
	return kept, refusals
}

// Assignment is one stage of one replica pipeline of a run, given to one peer.
type Assignment struct {
	Stage   int
	Replica int `json:",omitempty"`
	Peer    string
	Addrs   []string
	Range   shard.Range
	Need    int64
	// Memory is Need by part, for a plan to show; not sent with it.
	Memory Memory `json:"-"`
}

// Plan gives each of the stages of a model shaped c its own peer from offers. Stage 0 gets
// the first offer that can hold it, stage 1 the first of the rest that can hold it, and so
// on: deterministic, and in the order the caller ranks the peers. A peer gets at most one
// stage; a second offer from the same peer, and an offer with no free stage slot, are not
// used. Stage s keeps Slots micro-batches of microBatch sequences in flight, each
// holding a full activation tape or, with recompute, its input only.
//
// The second result gives the reason for each peer that was refused, because it offered no
// usable slot or its memory fits no stage; peers merely not needed are not listed. If some
// stage has no peer, Plan returns the assignments it could make, in stage order, and an
// error wrapping ErrUnstaffed that names the missing stages and the refusals. Other errors
// mean the request itself is impossible.
//
// First-fit in stage order can miss a plan that exists (a big offer taken by a small stage
// that a smaller offer could have held); list the offers smallest first to avoid that.
//
// With replicas > 1 every stage is staffed once per replica pipeline, replica 0's stages
// first: the grid (stage × replica → peer), each peer holding one cell.
func Plan(c shard.Config, stages, replicas, microBatch, microBatches, inFlight int, recompute bool, offers []Offer) ([]Assignment, []string, error) {
	if err := c.Validate(); err != nil {
		return nil, nil, fmt.Errorf("plan run: %w", err)
	}
	ranges, err := shard.SplitLayers(c.NLayers, stages)
	if err != nil {
		return nil, nil, fmt.Errorf("plan run: %w", err)
	}
	if microBatch < 1 || microBatches < 1 {
		return nil, nil, fmt.Errorf("plan run: %d micro-batches of %d sequences", microBatches, microBatch)
	}
	if replicas < 1 {
		return nil, nil, fmt.Errorf("plan run: %d replicas", replicas)
	}
	needs := make([]int64, stages)
	mems := make([]Memory, stages)
	for s, r := range ranges {
		mems[s] = StageMemory(c, r, s == 0, s == stages-1, microBatch, Slots(stages, s, microBatches, inFlight), recompute)
		needs[s] = mems[s].Total()
	}

	// Offers that can be used at all, in order; the others are refused at once.
	var refusals []string
	usable := make([]bool, len(offers))
	seen := map[string]bool{}
	for i, o := range offers {
		switch {
		case o.Peer == "":
			refusals = append(refusals, fmt.Sprintf("offer %d names no peer", i))
		case seen[o.Peer]:
			refusals = append(refusals, fmt.Sprintf("%s offered more than once; only its first offer is used", o.Peer))
		case o.MaxStages < 1:
			refusals = append(refusals, fmt.Sprintf("%s has no free stage slot (max_stages %d)", o.Peer, o.MaxStages))
		default:
			usable[i] = true
		}
		seen[o.Peer] = true
	}

	var plan []Assignment
	var missing []int
	var missingCells []string
	for rep := range replicas {
		for s, r := range ranges {
			taken := -1
			for i, o := range offers {
				if usable[i] && o.MemoryBytes >= needs[s] {
					taken = i
					break
				}
			}
			if taken < 0 {
				if !slices.Contains(missing, s) {
					missing = append(missing, s)
				}
				missingCells = append(missingCells, fmt.Sprintf("%d/%d", s, rep))
				continue
			}
			usable[taken] = false
			o := offers[taken]
			plan = append(plan, Assignment{Stage: s, Replica: rep, Peer: o.Peer, Addrs: o.Addrs, Range: r, Need: needs[s], Memory: mems[s]})
		}
	}

	// A usable offer still unused is refused if it is too small for the stages that have no
	// peer (every such offer is: it was passed over for each of them) or, when every stage
	// has a peer, for any stage at all.
	against := missing
	if len(against) == 0 {
		against = make([]int, stages)
		for s := range against {
			against[s] = s
		}
	}
	smallest := against[0]
	for _, s := range against {
		if needs[s] < needs[smallest] {
			smallest = s
		}
	}
	for i, o := range offers {
		if usable[i] && o.MemoryBytes < needs[smallest] {
			has, needs := sizes(o.MemoryBytes, needs[smallest])
			refusals = append(refusals, fmt.Sprintf("%s offers %s, stage %d needs %s", o.Peer, has, smallest, needs))
		}
	}

	if len(missing) > 0 {
		err := unstaffed(missing, refusals, len(offers))
		if replicas > 1 {
			err = fmt.Errorf("%w (stage/replica cells without a peer: %s)", err, strings.Join(missingCells, ", "))
		}
		return plan, refusals, err
	}
	return plan, refusals, nil
}

func unstaffed(missing []int, refusals []string, offers int) error {
	ids := make([]string, len(missing))
	for i, s := range missing {
		ids[i] = strconv.Itoa(s)
	}
	what := "stage " + ids[0] + " has"
	if len(ids) > 1 {
		what = "stages " + strings.Join(ids, ", ") + " have"
	}
	why := strings.Join(refusals, "; ")
	switch {
	case offers == 0:
		why = "no peer offered to train"
	case why == "":
		why = "every peer that offered holds another stage"
	}
	return fmt.Errorf("%w: %s no peer: %s", ErrUnstaffed, what, why)
}

// sizes formats two different sizes so that they read differently, in exact bytes if
// rounding would make them look the same.
func sizes(a, b int64) (string, string) {
	fa, fb := FormatBytes(a), FormatBytes(b)
	if fa == fb {
		return fmt.Sprintf("%s (%d B)", fa, a), fmt.Sprintf("%s (%d B)", fb, b)
	}
	return fa, fb
}

// FormatBytes shows a size in bytes the way a person reads it: "512 B", "410 MiB",
// "1.5 GiB".
func FormatBytes(n int64) string {
	const unit = 1024
	if n < unit && n > -unit {
		return fmt.Sprintf("%d B", n)
	}
	v, i := float64(n), -1
	for (v >= unit || v <= -unit) && i < 5 {
		v /= unit
		i++
	}
	s := strconv.FormatFloat(v, 'f', 1, 64)
	if v >= 100 || v <= -100 {
		s = strconv.FormatFloat(v, 'f', 0, 64)
	}
	s = strings.TrimSuffix(s, ".0")
	return s + " " + [...]string{"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}[i]
}
