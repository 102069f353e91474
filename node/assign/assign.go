// Package assign staffs a run: it estimates the memory a peer needs to hold one pipeline
// stage and gives each stage of a run one of the peers that offered to train.
//
// Need counts, arithmetically, what the shard package allocates for a stage (parameters,
// gradients, optimiser moments, activation tapes, backward workspace, and an async
// stage's past weight versions), so a launcher can plan a model far larger than itself
// without allocating any of it.
package assign

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/pipeswarm/pipeswarm/node/core"
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
	Weights   int64 // the stage's parameters, float32
	Grads     int64 // their gradients, float32
	Optimizer int64 // the update rule's two moments, float32 (AdamW's, or NAdam's: the same two)
	// Stashed are the past versions of the weights an async stage keeps
	// (Schedule.Versions of them), float32; none in a sync run.
	Stashed     int64
	Activations int64 // the activation tapes of the micro-batches in flight
	Evaluation  int64 // the tape of a validation batch, where it is not a training tape
	Workspace   int64 // the backward workspace and the RoPE tables, shared by the tapes
	Overhead    int64 // Overhead: the runtime, libp2p, buffers
}

// Total is the sum of the parts.
func (m Memory) Total() int64 {
	return m.Weights + m.Grads + m.Optimizer + m.Stashed + m.Activations + m.Evaluation + m.Workspace + m.Overhead
}

// Versions is how many past weight versions Stashed holds.
func (m Memory) Versions() int {
	if m.Weights == 0 {
		return 0
	}
	return int(m.Stashed / m.Weights)
}

// StashedNote says what of the total the past weight versions are, for a message that
// the total does not fit: "" when the stage keeps none, else ", 1.2 GiB of it for 2
// past weight versions (async schedule)".
func (m Memory) StashedNote() string {
	if m.Stashed == 0 {
		return ""
	}
	return fmt.Sprintf(", %s of it for %s (async schedule)", FormatBytes(m.Stashed), plural(m.Versions(), "past weight version"))
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}

// Schedule is what staffing needs of a run's pipeline schedule: how many micro-batches
// each stage keeps in flight, and how many past versions of its weights.
type Schedule struct {
	Stages       int  // pipeline.stages
	MicroBatches int  // pipeline.micro_batches: per step, or per update of an async run
	InFlight     int  // pipeline.in_flight; 0: the schedule's own bound
	Async        bool // pipeline.schedule: async
}

// async is the schedule an async run's stages run (node/core decides it).
func (p Schedule) async() core.Async {
	return core.Async{Stages: p.Stages, MicroBatches: p.MicroBatches, InFlight: p.InFlight}
}

// Slots is how many micro-batches stage s keeps in flight, an activation tape each:
// what the node's core gives it (core.Config.Slots). In a sync run that is
// min(stages−s, micro_batches), the most one-forward-one-backward needs, or
// min(in_flight, micro_batches) if in_flight is set; in an async run the schedule's
// bound for the stage, in_flight (0: stages) at stage 0 and proportionally fewer after
// it, down to one at the last.
func (p Schedule) Slots(s int) int {
	return core.Config{Stage: s, Stages: p.Stages, MicroBatches: p.MicroBatches, MaxInFlight: p.InFlight, Async: p.Async}.Slots()
}

// Versions is how many past versions of its weights stage s keeps besides the current
// ones: none in a sync run; in an async run the largest delay, in updates, of its
// forwards (core.Async.MaxDelay), whatever train.delay, because a resumed run runs the
// forwards in flight at its checkpoint again on the versions they ran on. Stage 0 keeps
// the most, the last none.
func (p Schedule) Versions(s int) int {
	if !p.Async {
		return 0
	}
	return p.async().MaxDelay(s)
}

// check panics on a schedule or stage no run has: a programmer's error, as a spec that
// validated gives neither.
func (p Schedule) check(s int) {
	if p.Stages < 1 || p.MicroBatches < 1 || p.InFlight < 0 || s < 0 || s >= p.Stages {
		panic(fmt.Sprintf("assign: stage %d of schedule %+v", s, p))
	}
}

// StageMemory estimates the memory a peer needs to hold stage s, owning layers r, of a
// model shaped c (with the embedding if first, the final norm and head if last) run on
// schedule p, training micro-batches of microBatch sequences of c.SeqLen tokens:
//
//   - parameters, gradients and the update rule's two moments: 4 float32 buffers of
//     the stage's parameter count (NAdam, under train.delay: nesterov, keeps the same two
//     moments as AdamW);
//   - in an async run, p.Versions(s) past versions of the parameters;
//   - one activation tape per slot (p.Slots(s)), as shard's Stage.NewTape allocates it;
//     with recompute, a tape holds the stage's input (and the head's activations), and
//     the blocks' activations are held once, for the micro-batch being recomputed;
//   - the tape of a validation batch of EvalBatch sequences, unless that is the
//     micro-batch of a sync run (evaluation then runs on a training tape; an async
//     stage evaluates with forwards in flight, on a tape of its own); forward only, so
//     with recompute it holds two blocks' activations, used in turn, which a recomputing
//     stage shares with its training tapes when they are of one shape;
//   - the backward workspace and the RoPE tables the stage shares across tapes;
//   - Overhead.
//
// It panics if microBatch < 1 or p has no stage s.
func StageMemory(c shard.Config, r shard.Range, p Schedule, s, microBatch int, recompute bool) Memory {
	p.check(s)
	if microBatch < 1 {
		panic(fmt.Sprintf("assign: need for micro-batches of %d", microBatch))
	}
	const f32 = 4
	first, last := s == 0, s == p.Stages-1
	slots := p.Slots(s)
	params := f32 * paramCount(c, r, first, last)
	in, blocks := tapeBytes(c, r, first, last, microBatch, c.SeqLen)
	acts := int64(slots) * (in + blocks)
	if recompute && slots > 0 {
		acts = int64(slots)*in + blocks
	}
	var eval int64
	switch {
	case microBatch != EvalBatch:
		in, blocks := tapeBytes(c, r, first, last, EvalBatch, c.SeqLen)
		if recompute && r.Len() > 2 {
			blocks = blocks / int64(r.Len()) * 2
		}
		eval = in + blocks
	case p.Async && recompute:
		eval = in // its blocks' activations are the training tapes' shared ones
	case p.Async:
		eval = in + blocks
	}
	return Memory{Weights: params, Grads: params, Optimizer: 2 * params, Stashed: int64(p.Versions(s)) * params,
		Activations: acts, Evaluation: eval, Workspace: f32 * stageScratch(c, microBatch, c.SeqLen), Overhead: Overhead}
}

// EvalBatch is how many validation windows a stage runs forward at once, as node/train
// evaluates.
const EvalBatch = 16

// Need is StageMemory's total.
func Need(c shard.Config, r shard.Range, p Schedule, s, microBatch int, recompute bool) int64 {
	return StageMemory(c, r, p, s, microBatch, recompute).Total()
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
// used. Stage s keeps p.Slots(s) micro-batches of microBatch sequences in flight, each
// holding a full activation tape or, with recompute, its input only, and in an async
// run p.Versions(s) past versions of its weights.
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
func Plan(c shard.Config, p Schedule, replicas, microBatch int, recompute bool, offers []Offer) ([]Assignment, []string, error) {
	if err := c.Validate(); err != nil {
		return nil, nil, fmt.Errorf("plan run: %w", err)
	}
	stages := p.Stages
	ranges, err := shard.SplitLayers(c.NLayers, stages)
	if err != nil {
		return nil, nil, fmt.Errorf("plan run: %w", err)
	}
	if microBatch < 1 || p.MicroBatches < 1 {
		return nil, nil, fmt.Errorf("plan run: %d micro-batches of %d sequences", p.MicroBatches, microBatch)
	}
	if p.InFlight < 0 {
		return nil, nil, fmt.Errorf("plan run: %d micro-batches in flight", p.InFlight)
	}
	if replicas < 1 {
		return nil, nil, fmt.Errorf("plan run: %d replicas", replicas)
	}
	needs := make([]int64, stages)
	mems := make([]Memory, stages)
	for s, r := range ranges {
		mems[s] = StageMemory(c, r, p, s, microBatch, recompute)
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
			has, needs := FormatSizes(o.MemoryBytes, needs[smallest])
			refusals = append(refusals, fmt.Sprintf("%s offers %s, stage %d needs %s%s", o.Peer, has, smallest, needs, mems[smallest].StashedNote()))
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

// FormatSizes formats two sizes, such as a budget and a need, with FormatBytes, or in
// exact bytes too if rounding would make two different sizes look the same.
func FormatSizes(a, b int64) (string, string) {
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
