package shard

import (
	"fmt"

	"github.com/pipeswarm/pipeswarm/shard/backend"
	"hash/fnv"
	"math"
	"math/rand/v2"
)

// Stage is one pipeline stage: a contiguous range of blocks, plus the embedding on the
// first stage and the final norm, head and loss on the last. It owns its parameters
// and gradients as flat buffers and a scratch workspace for backward; it is not safe
// for concurrent use (one compute worker drives it).
//
// Params and Grads are host memory and the truth between calls; Forward and Backward
// compute only through the stage's backend.Backend, on buffers it owns, and bring
// Params and Grads in and out of it at their start and end (free on a host backend).
type Stage struct {
	Config Config
	Layers Range
	First  bool // owns the token embedding; takes token ids as input
	Last   bool // owns the final norm, LM head and loss

	Params []float32 // every parameter, laid out as Tensors() says
	Grads  []float32 // same layout; Backward accumulates into it

	// Sub, if set, constrains the residual writes to a shared subspace (SetSubspace).
	Sub       *Subspace
	denseTail int
	// sub is Sub on the stage's backend: the basis, the first stage's frozen
	// embedding, and the projections' scratch.
	sub struct{ u, fixed, t backend.Buf }

	lay layout
	be  backend.Backend
	p   views // the backend's mirrors of Params and Grads, cut into tensors
	g   views
	rot struct{ cos, sin backend.Buf }
	ws  workspace

	// recompute keeps only each tape's input; the blocks' activations live in one
	// shared set per micro-batch shape (WithRecompute). Backward fills one per block;
	// Forward, whose activations Backward does not read, runs every block on the first
	// two in turn, so a shape only ever run forward (evaluation) holds two.
	recompute bool
	shared    map[[2]int][]blockTape
}

// views are one flat buffer on the backend and its tensors.
type views struct {
	all                backend.Buf
	embed, normF, head backend.Buf
	blocks             []blockViews
}

type blockViews struct {
	attnNorm, qkv, wo, mlpNorm, gu, down backend.Buf
}

func (l layout) views(be backend.Backend, all backend.Buf, c Config) views {
	v := views{all: all}
	d, f := c.DModel, c.DFF
	if l.embed >= 0 {
		v.embed = be.View(all, l.embed, c.Vocab*d)
	}
	if l.normF >= 0 {
		v.normF, v.head = be.View(all, l.normF, d), be.View(all, l.head, c.Vocab*d)
	}
	for _, o := range l.blocks {
		v.blocks = append(v.blocks, blockViews{
			attnNorm: be.View(all, o.attnNorm, d), qkv: be.View(all, o.qkv, 3*d*d), wo: be.View(all, o.wo, d*d),
			mlpNorm: be.View(all, o.mlpNorm, d), gu: be.View(all, o.gu, 2*f*d), down: be.View(all, o.down, d*f),
		})
	}
	return v
}

// Option configures a stage at NewStage.
type Option func(*Stage) error

// WithBackend makes the stage compute on b instead of cpu32.
func WithBackend(b backend.Backend) Option {
	return func(s *Stage) error {
		if b == nil {
			return fmt.Errorf("%w: nil backend", ErrConfig)
		}
		s.be = b
		return nil
	}
}

// WithRecompute, if on, makes the stage keep only each micro-batch's input on its tape
// (and, on the last stage, the head's activations, which Loss writes into) and run the
// blocks' forward again in Backward, into one full set of block activations the stage
// shares across tapes. Memory for activations then grows by one input per micro-batch in
// flight instead of one full tape, for one more forward of the blocks per micro-batch;
// the kernels are deterministic, so the gradients are the same, bit for bit.
func WithRecompute(on bool) Option {
	return func(s *Stage) error {
		s.recompute = on
		return nil
	}
}

// Recompute reports whether the stage recomputes activations in Backward.
func (s *Stage) Recompute() bool { return s.recompute }

// NewStage allocates the stage owning layers r of a model shaped c, with zero
// parameters; call Init or load a checkpoint next.
func NewStage(c Config, r Range, first, last bool, opts ...Option) (*Stage, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if r.Lo < 0 || r.Hi > c.NLayers || r.Lo > r.Hi || (r.Len() == 0 && !first && !last) {
		return nil, fmt.Errorf("%w: layer range [%d,%d) outside 0..%d", ErrConfig, r.Lo, r.Hi, c.NLayers)
	}
	lay := newLayout(c, r, first, last)
	s := &Stage{Config: c, Layers: r, First: first, Last: last, lay: lay,
		Params: make([]float32, lay.size), Grads: make([]float32, lay.size), be: backend.CPU32()}
	for _, o := range opts {
		if err := o(s); err != nil {
			return nil, err
		}
	}
	s.p = lay.views(s.be, s.be.Mirror(s.Params), c)
	s.g = lay.views(s.be, s.be.Mirror(s.Grads), c)
	cos, sin := ropeTables(c.SeqLen, c.HeadDim(), c.RopeTheta)
	s.rot.cos, s.rot.sin = s.be.Alloc(len(cos)), s.be.Alloc(len(sin))
	s.be.Upload(s.rot.cos, cos)
	s.be.Upload(s.rot.sin, sin)
	return s, nil
}

// Backend is the backend the stage computes on.
func (s *Stage) Backend() backend.Backend { return s.be }

// NewStages builds all stages of a model split into n, in order.
func NewStages(c Config, n int, opts ...Option) ([]*Stage, error) {
	ranges, err := SplitLayers(c.NLayers, n)
	if err != nil {
		return nil, err
	}
	out := make([]*Stage, n)
	for i, r := range ranges {
		if out[i], err = NewStage(c, r, i == 0, i == n-1, opts...); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// Tensors lists the stage's tensors in buffer order.
func (s *Stage) Tensors() []Tensor { return s.lay.tensors }

// View returns the slice of buf (Params, Grads or any buffer of the same layout)
// that holds t.
func (t Tensor) View(buf []float32) []float32 { return buf[t.Off : t.Off+t.Len()] }

// Init sets every parameter deterministically from the run seed and the tensor's
// global name: Linear and embedding weights ~ N(0, 0.02²) (as Llama's
// initializer_range), the residual-writing projections (o_proj, down_proj) scaled
// down by √(2L) as in GPT-2 so the residual stream does not grow with depth, norm
// gains 1. Any replica of a stage, however the model is split, gets the same values.
func (s *Stage) Init(seed uint64) {
	resid := 0.02 / math.Sqrt(2*float64(s.Config.NLayers))
	for _, t := range s.lay.tensors {
		v := t.View(s.Params)
		if len(t.Shape) == 1 {
			for i := range v {
				v[i] = 1
			}
			continue
		}
		std := 0.02
		if hasSuffix(t.Name, "o_proj.weight") || hasSuffix(t.Name, "down_proj.weight") {
			std = resid
		}
		h := fnv.New64a()
		h.Write([]byte(t.Name))
		rng := rand.New(rand.NewPCG(seed, h.Sum64()))
		for i := range v {
			v[i] = float32(rng.NormFloat64() * std)
		}
	}
}

func hasSuffix(s, suf string) bool { return len(s) >= len(suf) && s[len(s)-len(suf):] == suf }

// ZeroGrads clears the gradient buffer.
func (s *Stage) ZeroGrads() { clear(s.Grads) }

// blockTape holds what one block's backward needs from its forward.
type blockTape struct {
	a1, rstd1, qkv, p, att, x2, a2, rstd2, gu, m, out backend.Buf
}

// Tape holds the activations of one micro-batch through one stage, from Forward
// until Backward, on the stage's backend. Several tapes let several micro-batches be
// in flight at once. On a stage that recomputes, a tape holds the input and the head's
// activations only, and blocks is the stage's shared set.
type Tape struct {
	B, T   int
	tokens []int32     // stage 0's input ids
	x0     backend.Buf // the stage's input residual stream [N,d]
	blocks []blockTape
	hf     backend.Buf // final-norm output [N,d] (last stage)
	rstdF  backend.Buf
	logits backend.Buf // [N,V]; Loss overwrites it with its gradient
	out    []float32   // Forward's result, brought back to the host
	lossed bool
}

// NewTape allocates activation storage for micro-batches of b sequences of t tokens.
// On a stage that recomputes, the first tape of each shape also allocates the two
// block tapes Forward shares; the first Backward of a shape allocates the others.
func (s *Stage) NewTape(b, t int) *Tape {
	if t > s.Config.SeqLen || b < 1 || t < 1 {
		panic(fmt.Sprintf("shard: tape %d×%d exceeds seq_len %d", b, t, s.Config.SeqLen))
	}
	c, be := s.Config, s.be
	n, d := b*t, c.DModel
	tp := &Tape{B: b, T: t, x0: be.Alloc(n * d)}
	if s.First {
		tp.tokens = make([]int32, n)
	}
	if s.recompute {
		s.sharedTapes(b, t, min(2, len(s.lay.blocks)))
	} else {
		tp.blocks = s.newBlockTapes(b, t, len(s.lay.blocks))
	}
	if s.Last {
		tp.hf, tp.rstdF, tp.logits = be.Alloc(n*d), be.Alloc(n), be.Alloc(n*c.Vocab)
		tp.out = make([]float32, n*c.Vocab)
	} else {
		tp.out = make([]float32, n*d)
	}
	return tp
}

// sharedTapes returns the first k of a recomputing stage's shared block tapes for b
// sequences of t tokens, allocating those it does not have yet.
func (s *Stage) sharedTapes(b, t, k int) []blockTape {
	if s.shared == nil {
		s.shared = map[[2]int][]blockTape{}
	}
	key := [2]int{b, t}
	have := s.shared[key]
	if len(have) < k {
		have = append(have, s.newBlockTapes(b, t, k-len(have))...)
		s.shared[key] = have
	}
	return have[:k]
}

// newBlockTapes allocates k blocks' activations for b sequences of t tokens.
func (s *Stage) newBlockTapes(b, t, k int) []blockTape {
	c, be := s.Config, s.be
	n, d, f := b*t, c.DModel, c.DFF
	var out []blockTape
	for range k {
		out = append(out, blockTape{
			a1: be.Alloc(n * d), rstd1: be.Alloc(n), qkv: be.Alloc(n * 3 * d),
			p: be.Alloc(b * c.NHeads * t * t), att: be.Alloc(n * d), x2: be.Alloc(n * d),
			a2: be.Alloc(n * d), rstd2: be.Alloc(n), gu: be.Alloc(n * 2 * f),
			m: be.Alloc(n * f), out: be.Alloc(n * d),
		})
	}
	return out
}

// Forward runs the stage on one micro-batch recorded in tp. The first stage reads
// tokens [B·T] (x is ignored); the others read the residual stream x [B·T, d]. It
// returns the output residual stream [B·T, d], or on the last stage the logits
// [B·T, V]; the result lives in tp and is valid until tp's next Forward.
func (s *Stage) Forward(tp *Tape, tokens []int32, x []float32) []float32 {
	c, be := s.Config, s.be
	n, d := tp.B*tp.T, c.DModel
	be.Upload(s.p.all, s.Params)
	if s.First {
		if len(tokens) != n {
			panic(fmt.Sprintf("shard: %d tokens for a %d×%d tape", len(tokens), tp.B, tp.T))
		}
		for _, t := range tokens {
			if t < 0 || int(t) >= c.Vocab {
				panic(fmt.Sprintf("shard: token %d outside vocab %d", t, c.Vocab))
			}
		}
		copy(tp.tokens, tokens)
		be.Embed(tp.x0, s.p.embed, tokens, d)
	} else {
		if len(x) != n*d {
			panic(fmt.Sprintf("shard: input of %d values for a %d×%d×%d tape", len(x), tp.B, tp.T, d))
		}
		be.Upload(tp.x0, x)
	}
	var in backend.Buf
	if s.recompute {
		// Block i reads block i−1's output and writes the other tape of the two.
		in = tp.x0
		two := s.sharedTapes(tp.B, tp.T, min(2, len(s.lay.blocks)))
		for i := range s.lay.blocks {
			s.blockForward(&two[i%2], s.p.blocks[i], in, tp.B, tp.T)
			in = two[i%2].out
		}
	} else {
		in = s.blocksForward(tp, tp.blocks)
	}
	tp.lossed = false
	if !s.Last {
		be.Download(tp.out, in)
		return tp.out
	}
	be.RMSNorm(tp.hf, tp.rstdF, in, s.p.normF, n, d, c.NormEps)
	be.Linear(tp.logits, tp.hf, s.p.head, n, d, c.Vocab)
	be.Download(tp.out, tp.logits)
	return tp.out
}

// Loss (last stage only) returns the mean next-token cross-entropy of tp's logits
// against targets [B·T] and prepares Backward: the gradient it starts from is that of
// scale·loss (scale = 1/micro-batches averages over a step's micro-batches).
func (s *Stage) Loss(tp *Tape, targets []int32, scale float32) float64 {
	if !s.Last {
		panic("shard: Loss on a stage without the head")
	}
	if len(targets) != tp.B*tp.T {
		panic(fmt.Sprintf("shard: %d targets for a %d×%d tape", len(targets), tp.B, tp.T))
	}
	for _, t := range targets {
		if t < 0 || int(t) >= s.Config.Vocab {
			panic(fmt.Sprintf("shard: target %d outside vocab %d", t, s.Config.Vocab))
		}
	}
	tp.lossed = true
	return s.be.CrossEntropy(tp.logits, targets, s.Config.Vocab, scale)
}

// Backward runs the stage backward for the micro-batch in tp, accumulating parameter
// gradients into Grads. dout [B·T, d] is the gradient of the stage's output; the last
// stage ignores it and starts from Loss. It returns the gradient of the stage's input
// residual stream [B·T, d] (nil on the first stage), valid until the next Backward.
func (s *Stage) Backward(tp *Tape, dout []float32) []float32 {
	c, be := s.Config, s.be
	n, d := tp.B*tp.T, c.DModel
	ws := s.ws.ensure(be, n, d, c.DFF)
	dres := ws.dres
	be.Upload(s.p.all, s.Params)
	be.Upload(s.g.all, s.Grads)
	if s.Last && !tp.lossed {
		panic("shard: Backward on the last stage before Loss")
	}
	var in backend.Buf
	if s.recompute {
		// Run the blocks again from this micro-batch's input, exactly as Forward did,
		// keeping every block's activations this time.
		tp.blocks = s.sharedTapes(tp.B, tp.T, len(s.lay.blocks))
		in = s.blocksForward(tp, tp.blocks)
	} else {
		in = tp.x0
		if k := len(tp.blocks); k > 0 {
			in = tp.blocks[k-1].out
		}
	}
	if s.Last {
		be.LinearBackward(ws.dtmp, s.g.head, tp.logits, tp.hf, s.p.head, n, d, c.Vocab, false)
		be.Zero(dres)
		be.RMSNormBackward(dres, s.g.normF, ws.dtmp, in, tp.rstdF, s.p.normF, n, d)
	} else {
		if len(dout) != n*d {
			panic(fmt.Sprintf("shard: output gradient of %d values for a %d×%d×%d tape", len(dout), tp.B, tp.T, d))
		}
		be.Upload(dres, dout)
	}
	for i := len(s.lay.blocks) - 1; i >= 0; i-- {
		in := tp.x0
		if i > 0 {
			in = tp.blocks[i-1].out
		}
		s.blockBackward(&tp.blocks[i], i, in, dres, tp.B, tp.T)
	}
	var dx []float32
	if s.First {
		be.EmbedBackward(s.g.embed, dres, tp.tokens, d)
	} else {
		dx = ws.dx
		be.Download(dx, dres)
	}
	be.Download(s.Grads, s.g.all)
	return dx
}

// blocksForward runs every block of the stage on tp's input, recording into bts, and
// returns the last block's output (the input itself on a stage of no blocks).
func (s *Stage) blocksForward(tp *Tape, bts []blockTape) backend.Buf {
	in := tp.x0
	for i := range s.lay.blocks {
		s.blockForward(&bts[i], s.p.blocks[i], in, tp.B, tp.T)
		in = bts[i].out
	}
	return in
}

// blockForward: out = h + MLP(norm(h)), h = x + Attn(norm(x)).
func (s *Stage) blockForward(bt *blockTape, p blockViews, x backend.Buf, b, t int) {
	c, be := s.Config, s.be
	n, d, f := b*t, c.DModel, c.DFF
	be.RMSNorm(bt.a1, bt.rstd1, x, p.attnNorm, n, d, c.NormEps)
	be.Linear(bt.qkv, bt.a1, p.qkv, n, d, 3*d)
	be.RoPE(bt.qkv, s.rot.cos, s.rot.sin, n, t, c.NHeads, c.HeadDim(), false)
	be.Attention(bt.att, bt.p, bt.qkv, b, t, c.NHeads, c.HeadDim())
	be.Linear(bt.x2, bt.att, p.wo, n, d, d)
	be.Add(bt.x2, x)
	be.RMSNorm(bt.a2, bt.rstd2, bt.x2, p.mlpNorm, n, d, c.NormEps)
	be.Linear(bt.gu, bt.a2, p.gu, n, d, 2*f)
	be.SwiGLU(bt.m, bt.gu, n, f)
	be.Linear(bt.out, bt.m, p.down, n, f, d)
	be.Add(bt.out, bt.x2)
}

// blockBackward turns dres, the gradient of block i's output, into the gradient of
// its input x, in place, accumulating parameter gradients.
func (s *Stage) blockBackward(bt *blockTape, i int, x, dres backend.Buf, b, t int) {
	c, be := s.Config, s.be
	n, d, f := b*t, c.DModel, c.DFF
	p, g, ws := s.p.blocks[i], s.g.blocks[i], &s.ws
	// MLP: dres carries the residual; dm = dres·W_down, then through SwiGLU and gate|up.
	be.LinearBackward(ws.dm, g.down, dres, bt.m, p.down, n, f, d, false)
	be.SwiGLUBackward(ws.dgu, ws.dm, bt.gu, n, f)
	be.LinearBackward(ws.dtmp, g.gu, ws.dgu, bt.a2, p.gu, n, d, 2*f, false)
	be.RMSNormBackward(dres, g.mlpNorm, ws.dtmp, bt.x2, bt.rstd2, p.mlpNorm, n, d)
	// Attention.
	be.LinearBackward(ws.dtmp, g.wo, dres, bt.att, p.wo, n, d, d, false)
	be.AttentionBackward(ws.dqkv, ws.dtmp, bt.p, bt.qkv, b, t, c.NHeads, c.HeadDim())
	be.RoPE(ws.dqkv, s.rot.cos, s.rot.sin, n, t, c.NHeads, c.HeadDim(), true)
	be.LinearBackward(ws.dtmp, g.qkv, ws.dqkv, bt.a1, p.qkv, n, d, 3*d, false)
	be.RMSNormBackward(dres, g.attnNorm, ws.dtmp, x, bt.rstd1, p.attnNorm, n, d)
}

// workspace is backward scratch shared by all tapes of a stage.
type workspace struct {
	n              int
	dres, dtmp, dm backend.Buf
	dgu, dqkv      backend.Buf // one buffer: the MLP is done with dgu before attention needs dqkv
	dx             []float32   // Backward's result on the host
}

func (w *workspace) ensure(be backend.Backend, n, d, f int) *workspace {
	if w.n != n {
		big := be.Alloc(n * max(3*d, 2*f))
		*w = workspace{n: n, dres: be.Alloc(n * d), dtmp: be.Alloc(n * d), dm: be.Alloc(n * f),
			dgu: be.View(big, 0, n*2*f), dqkv: be.View(big, 0, n*3*d), dx: make([]float32, n*d)}
	}
	return w
}
