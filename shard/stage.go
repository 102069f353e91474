package shard

import (
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"
)

// Stage is one pipeline stage: a contiguous range of blocks, plus the embedding on the
// first stage and the final norm, head and loss on the last. It owns its parameters
// and gradients as flat buffers and a scratch workspace for backward; it is not safe
// for concurrent use (one compute worker drives it).
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

	lay      layout
	cos, sin []float32
	ws       workspace
}

// NewStage allocates the stage owning layers r of a model shaped c, with zero
// parameters; call Init or load a checkpoint next.
func NewStage(c Config, r Range, first, last bool) (*Stage, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if r.Lo < 0 || r.Hi > c.NLayers || r.Lo > r.Hi || (r.Len() == 0 && !first && !last) {
		return nil, fmt.Errorf("%w: layer range [%d,%d) outside 0..%d", ErrConfig, r.Lo, r.Hi, c.NLayers)
	}
	lay := newLayout(c, r, first, last)
	s := &Stage{Config: c, Layers: r, First: first, Last: last, lay: lay,
		Params: make([]float32, lay.size), Grads: make([]float32, lay.size)}
	s.cos, s.sin = ropeTables(c.SeqLen, c.HeadDim(), c.RopeTheta)
	return s, nil
}

// NewStages builds all stages of a model split into n, in order.
func NewStages(c Config, n int) ([]*Stage, error) {
	ranges, err := SplitLayers(c.NLayers, n)
	if err != nil {
		return nil, err
	}
	out := make([]*Stage, n)
	for i, r := range ranges {
		if out[i], err = NewStage(c, r, i == 0, i == n-1); err != nil {
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
	a1, rstd1, qkv, p, att, x2, a2, rstd2, gu, m, out []float32
}

// Tape holds the activations of one micro-batch through one stage, from Forward
// until Backward. Several tapes let several micro-batches be in flight at once.
type Tape struct {
	B, T   int
	tokens []int32   // stage 0's input ids
	x0     []float32 // the stage's input residual stream [N,d]
	blocks []blockTape
	hf     []float32 // final-norm output [N,d] (last stage)
	rstdF  []float32
	logits []float32 // [N,V]; Loss overwrites it with its gradient
	lossed bool
}

// NewTape allocates activation storage for micro-batches of b sequences of t tokens.
func (s *Stage) NewTape(b, t int) *Tape {
	if t > s.Config.SeqLen || b < 1 || t < 1 {
		panic(fmt.Sprintf("shard: tape %d×%d exceeds seq_len %d", b, t, s.Config.SeqLen))
	}
	c := s.Config
	n, d, f := b*t, c.DModel, c.DFF
	tp := &Tape{B: b, T: t, x0: make([]float32, n*d)}
	if s.First {
		tp.tokens = make([]int32, n)
	}
	for range s.lay.blocks {
		tp.blocks = append(tp.blocks, blockTape{
			a1: make([]float32, n*d), rstd1: make([]float32, n), qkv: make([]float32, n*3*d),
			p: make([]float32, b*c.NHeads*t*t), att: make([]float32, n*d), x2: make([]float32, n*d),
			a2: make([]float32, n*d), rstd2: make([]float32, n), gu: make([]float32, n*2*f),
			m: make([]float32, n*f), out: make([]float32, n*d),
		})
	}
	if s.Last {
		tp.hf, tp.rstdF, tp.logits = make([]float32, n*d), make([]float32, n), make([]float32, n*c.Vocab)
	}
	return tp
}

// Forward runs the stage on one micro-batch recorded in tp. The first stage reads
// tokens [B·T] (x is ignored); the others read the residual stream x [B·T, d]. It
// returns the output residual stream [B·T, d], or on the last stage the logits
// [B·T, V]; the result lives in tp and is valid until tp's next Forward or Loss.
func (s *Stage) Forward(tp *Tape, tokens []int32, x []float32) []float32 {
	c := s.Config
	n, d := tp.B*tp.T, c.DModel
	if s.First {
		if len(tokens) != n {
			panic(fmt.Sprintf("shard: %d tokens for a %d×%d tape", len(tokens), tp.B, tp.T))
		}
		copy(tp.tokens, tokens)
		embedForward(tp.x0, s.Params[s.lay.embed:], tokens, d)
	} else {
		if len(x) != n*d {
			panic(fmt.Sprintf("shard: input of %d values for a %d×%d×%d tape", len(x), tp.B, tp.T, d))
		}
		copy(tp.x0, x)
	}
	in := tp.x0
	for i, b := range s.lay.blocks {
		s.blockForward(&tp.blocks[i], b, in, tp.B, tp.T)
		in = tp.blocks[i].out
	}
	tp.lossed = false
	if !s.Last {
		return in
	}
	rmsnormForward(tp.hf, tp.rstdF, in, s.Params[s.lay.normF:], n, d, c.NormEps)
	linearForward(tp.logits, tp.hf, s.Params[s.lay.head:], n, d, c.Vocab)
	return tp.logits
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
	return crossEntropy(tp.logits, targets, s.Config.Vocab, scale)
}

// Backward runs the stage backward for the micro-batch in tp, accumulating parameter
// gradients into Grads. dout [B·T, d] is the gradient of the stage's output; the last
// stage ignores it and starts from Loss. It returns the gradient of the stage's input
// residual stream [B·T, d] (nil on the first stage), valid until the next Backward.
func (s *Stage) Backward(tp *Tape, dout []float32) []float32 {
	c := s.Config
	n, d := tp.B*tp.T, c.DModel
	ws := s.ws.ensure(n, d, c.DFF)
	dres := ws.dres
	if s.Last {
		if !tp.lossed {
			panic("shard: Backward on the last stage before Loss")
		}
		in := tp.x0
		if k := len(tp.blocks); k > 0 {
			in = tp.blocks[k-1].out
		}
		linearBackward(ws.dtmp, s.Grads[s.lay.head:], tp.logits, tp.hf, s.Params[s.lay.head:], n, d, c.Vocab, false)
		clear(dres)
		rmsnormBackward(dres, s.Grads[s.lay.normF:], ws.dtmp, in, tp.rstdF, s.Params[s.lay.normF:], n, d)
	} else {
		if len(dout) != n*d {
			panic(fmt.Sprintf("shard: output gradient of %d values for a %d×%d×%d tape", len(dout), tp.B, tp.T, d))
		}
		copy(dres, dout)
	}
	for i := len(s.lay.blocks) - 1; i >= 0; i-- {
		in := tp.x0
		if i > 0 {
			in = tp.blocks[i-1].out
		}
		s.blockBackward(&tp.blocks[i], s.lay.blocks[i], in, dres, tp.B, tp.T)
	}
	if s.First {
		embedBackward(s.Grads[s.lay.embed:], dres, tp.tokens, d)
		return nil
	}
	return dres
}

// blockForward: out = h + MLP(norm(h)), h = x + Attn(norm(x)).
func (s *Stage) blockForward(bt *blockTape, o blockOffsets, x []float32, b, t int) {
	c := s.Config
	n, d, f, p := b*t, c.DModel, c.DFF, s.Params
	rmsnormForward(bt.a1, bt.rstd1, x, p[o.attnNorm:], n, d, c.NormEps)
	linearForward(bt.qkv, bt.a1, p[o.qkv:], n, d, 3*d)
	ropeApply(bt.qkv, s.cos, s.sin, n, t, c.NHeads, c.HeadDim(), 1)
	attentionForward(bt.att, bt.p, bt.qkv, b, t, c.NHeads, c.HeadDim())
	linearForward(bt.x2, bt.att, p[o.wo:], n, d, d)
	addInto(bt.x2, x)
	rmsnormForward(bt.a2, bt.rstd2, bt.x2, p[o.mlpNorm:], n, d, c.NormEps)
	linearForward(bt.gu, bt.a2, p[o.gu:], n, d, 2*f)
	swigluForward(bt.m, bt.gu, n, f)
	linearForward(bt.out, bt.m, p[o.down:], n, f, d)
	addInto(bt.out, bt.x2)
}

// blockBackward turns dres, the gradient of the block's output, into the gradient of
// its input x, in place, accumulating parameter gradients.
func (s *Stage) blockBackward(bt *blockTape, o blockOffsets, x, dres []float32, b, t int) {
	c := s.Config
	n, d, f, p, g := b*t, c.DModel, c.DFF, s.Params, s.Grads
	ws := &s.ws
	// MLP: dres carries the residual; dm = dres·W_down, then through SwiGLU and gate|up.
	linearBackward(ws.dm, g[o.down:], dres, bt.m, p[o.down:], n, f, d, false)
	swigluBackward(ws.dbig[:n*2*f], ws.dm, bt.gu, n, f)
	linearBackward(ws.dtmp, g[o.gu:], ws.dbig[:n*2*f], bt.a2, p[o.gu:], n, d, 2*f, false)
	rmsnormBackward(dres, g[o.mlpNorm:], ws.dtmp, bt.x2, bt.rstd2, p[o.mlpNorm:], n, d)
	// Attention.
	linearBackward(ws.dtmp, g[o.wo:], dres, bt.att, p[o.wo:], n, d, d, false)
	dqkv := ws.dbig[:n*3*d]
	attentionBackward(dqkv, ws.dtmp, bt.p, bt.qkv, b, t, c.NHeads, c.HeadDim())
	ropeApply(dqkv, s.cos, s.sin, n, t, c.NHeads, c.HeadDim(), -1)
	linearBackward(ws.dtmp, g[o.qkv:], dqkv, bt.a1, p[o.qkv:], n, d, 3*d, false)
	rmsnormBackward(dres, g[o.attnNorm:], ws.dtmp, x, bt.rstd1, p[o.attnNorm:], n, d)
}

func addInto(dst, src []float32) {
	for i, v := range src {
		dst[i] += v
	}
}

// workspace is backward scratch shared by all tapes of a stage.
type workspace struct {
	n                    int
	dres, dtmp, dbig, dm []float32
}

func (w *workspace) ensure(n, d, f int) *workspace {
	if w.n != n {
		*w = workspace{n: n, dres: make([]float32, n*d), dtmp: make([]float32, n*d),
			dbig: make([]float32, n*max(3*d, 2*f)), dm: make([]float32, n*f)}
	}
	return w
}
