package shard

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	G "gorgonia.org/gorgonia"
	"gorgonia.org/tensor"
)

// An independent autodiff oracle for whole stages: the same model written as a float64
// gorgonia expression graph (dense matrices, per-(batch, head) attention loops, RoPE as a
// constant rotation matrix), differentiated by gorgonia, and compared tensor by tensor
// with the hand-written float32 Forward, Loss and Backward.
//
// Three gorgonia v0.9.18 pitfalls shape the graph below: InverseSqrt has a wrong
// derivative; nodes are deduplicated by a hash of their name (inputs) or printed value
// (constants), so every input and fixed matrix gets a unique name; and the tape machine
// reuses buffers, so a forward value is captured with Read while it is live.

// oracleTol is the largest relative error ||got−want||/||want|| allowed per tensor.
const oracleTol = 1e-4

func TestStageGradientsMatchGorgoniaAutodiff(t *testing.T) {
	cfg := Config{Vocab: 11, DModel: 8, NLayers: 2, NHeads: 2, DFF: 12, SeqLen: 5, RopeTheta: 10000, NormEps: 1e-5}
	cases := []struct {
		name        string
		r           Range
		first, last bool
		b, t        int
	}{
		{"whole model", Range{0, 2}, true, true, 2, 5},
		{"last stage", Range{1, 2}, false, true, 2, 4}, // T < SeqLen: positions restart per sequence
		{"first stage", Range{0, 1}, true, false, 3, 5},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, err := NewStage(cfg, tc.r, tc.first, tc.last)
			if err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(7, uint64(i)))
			s.Init(42)
			// Gains away from 1 and weights ×10, so no term is negligibly small.
			for _, tn := range s.Tensors() {
				v := tn.View(s.Params)
				for j := range v {
					if len(tn.Shape) == 1 {
						v[j] = float32(1 + 0.1*rng.NormFloat64())
					} else {
						v[j] *= 10
					}
				}
			}
			in := oracleBatch{b: tc.b, t: tc.t}
			n, d := tc.b*tc.t, cfg.DModel
			if tc.first {
				in.tokens = randIDs(rng, n, cfg.Vocab)
			} else {
				in.x = randVec(rng, n*d, 1)
			}
			if tc.last {
				in.targets = randIDs(rng, n, cfg.Vocab)
			} else {
				in.dout = randVec(rng, n*d, 1)
			}

			got := runHandWritten(s, in)
			want := runOracle(t, s, in)

			var worst float64
			checks := 0
			check := func(what string, e float64) {
				t.Helper()
				worst, checks = max(worst, e), checks+1
				t.Logf("%-50s rel err %.2e", what, e)
				if !(e <= oracleTol) { // also catches NaN
					t.Errorf("%s: relative error %.3g > %g", what, e, oracleTol)
				}
			}
			check(fmt.Sprintf("loss (%.7f vs %.7f)", got.loss, want.loss), math.Abs(got.loss-want.loss)/math.Abs(want.loss))
			check("forward output", relErr64(got.out, want.out))
			if !tc.first {
				check("input gradient", relErr64(got.dx, want.dx))
			} else if got.dx != nil {
				t.Errorf("first stage returned an input gradient of %d values", len(got.dx))
			}
			for k, tn := range s.Tensors() {
				check(tn.Name, relErr64(tn.View(s.Grads), want.grads[k]))
			}
			t.Logf("max rel err %.2e over %d checks", worst, checks)
		})
	}
}

// oracleBatch is one micro-batch: tokens (first stage) or the residual stream x, and
// targets (last stage) or the gradient dout of the stage's output.
type oracleBatch struct {
	b, t            int
	tokens, targets []int32
	x, dout         []float32
}

// handResult is what the hand-written stage computes for a micro-batch: the scalar
// it differentiates (the loss, or Σ dout·out below the last stage), its output (logits
// or residual stream) and the input gradient; the parameter gradients are in Grads.
type handResult struct {
	loss float64
	out  []float32
	dx   []float32
}

// oracleResult is the same from gorgonia, with the parameter gradients in the order
// of Stage.Tensors().
type oracleResult struct {
	loss  float64
	out   []float64
	dx    []float64
	grads [][]float64
}

// runHandWritten runs the hand-written Forward, Loss (scale 1) and Backward.
func runHandWritten(s *Stage, in oracleBatch) handResult {
	s.ZeroGrads()
	tp := s.NewTape(in.b, in.t)
	var r handResult
	r.out = append([]float32(nil), s.Forward(tp, in.tokens, in.x)...)
	if s.Last {
		r.loss = s.Loss(tp, in.targets, 1)
	} else {
		r.loss = dot64(r.out, in.dout)
	}
	if dx := s.Backward(tp, in.dout); dx != nil {
		r.dx = append([]float32(nil), dx...)
	}
	return r
}

// runOracle builds s's model as a gorgonia graph with s's weights, runs it forward
// and backward, and returns the loss, output and gradients.
func runOracle(t *testing.T, s *Stage, in oracleBatch) oracleResult {
	t.Helper()
	o := newOracle(s.Config, in.b, in.t)
	var wrt G.Nodes
	params := make([]*G.Node, len(s.Tensors()))
	for k, tn := range s.Tensors() {
		shape := tn.Shape
		if len(shape) == 1 {
			shape = []int{1, shape[0]} // gains as [1,d] rows, broadcast over tokens
		}
		params[k] = G.NewMatrix(o.g, tensor.Float64, G.WithName(tn.Name),
			G.WithValue(matrix64(shape[0], shape[1], widen64(tn.View(s.Params)))))
		o.param[tn.Name] = params[k]
		wrt = append(wrt, params[k])
	}

	n, d := in.b*in.t, s.Config.DModel
	var x *G.Node
	if s.First {
		x = G.Must(G.Mul(o.constant("tokens", oneHot64(in.tokens, s.Config.Vocab)), o.param["model.embed_tokens.weight"]))
	} else {
		x = G.NewMatrix(o.g, tensor.Float64, G.WithName("x"), G.WithValue(matrix64(n, d, widen64(in.x))))
		wrt = append(wrt, x)
	}
	h := x
	for l := s.Layers.Lo; l < s.Layers.Hi; l++ {
		h = o.block(h, l)
	}
	var out, cost *G.Node
	if s.Last {
		out = o.linear(o.rmsnorm(h, o.param["model.norm.weight"]), o.param["lm_head.weight"])
		cost = o.crossEntropy(out, in.targets)
	} else {
		out = h
		cost = G.Must(G.Sum(G.Must(G.HadamardProd(out, o.constant("dout", matrix64(n, d, widen64(in.dout)))))))
	}
	// The machine reuses buffers, so out's value is read while it is current.
	var outVal G.Value
	G.Read(out, &outVal)
	if _, err := G.Grad(cost, wrt...); err != nil {
		t.Fatalf("gorgonia Grad: %v", err)
	}
	vm := G.NewTapeMachine(o.g, G.BindDualValues(wrt...))
	defer vm.Close()
	if err := vm.RunAll(); err != nil {
		t.Fatalf("gorgonia run: %v", err)
	}

	r := oracleResult{loss: cost.Value().Data().(float64), out: valueData64(outVal)}
	for _, p := range params {
		r.grads = append(r.grads, nodeGrad64(t, p))
	}
	if !s.First {
		r.dx = nodeGrad64(t, x)
	}
	return r
}

// oracle holds the graph, the parameter nodes by tensor name and the constants every
// block shares, for micro-batches of b sequences of t tokens.
type oracle struct {
	c        Config
	b, t     int
	g        *G.ExprGraph
	param    map[string]*G.Node
	cos, sin *G.Node // [N,d] RoPE tables, tiled over batch rows and head columns
	rot      *G.Node // [d,d]: x·rot is rotate_half(x) in every head
	mask     *G.Node // [T,T] lower-triangular ones
}

func newOracle(c Config, b, t int) *oracle {
	o := &oracle{c: c, b: b, t: t, g: G.NewGraph(), param: map[string]*G.Node{}}
	n, d, hd := b*t, c.DModel, c.HeadDim()
	half := hd / 2
	cos, sin := make([]float64, n*d), make([]float64, n*d)
	for r := range n {
		pos := float64(r % t)
		for j := range d {
			i := j % hd % half
			a := pos * math.Pow(c.RopeTheta, -float64(2*i)/float64(hd))
			cos[r*d+j], sin[r*d+j] = math.Cos(a), math.Sin(a)
		}
	}
	// rotate_half(x) = (−x2, x1) per head: column j < half takes −x[j+half], column
	// j ≥ half takes x[j−half].
	rot := make([]float64, d*d)
	for h := 0; h < d; h += hd {
		for j := range half {
			rot[(h+j+half)*d+h+j] = -1
			rot[(h+j)*d+h+j+half] = 1
		}
	}
	mask := make([]float64, t*t)
	for i := range t {
		for j := 0; j <= i; j++ {
			mask[i*t+j] = 1
		}
	}
	o.cos, o.sin = o.constant("cos", matrix64(n, d, cos)), o.constant("sin", matrix64(n, d, sin))
	o.rot, o.mask = o.constant("rot", matrix64(d, d, rot)), o.constant("mask", matrix64(t, t, mask))
	return o
}

// constant is a fixed matrix. It is a named input node rather than a G.NewConstant:
// gorgonia identifies constant nodes by their printed value, which elides all but the
// corner rows and columns, so two different constants could be merged into one.
// (Scalar constants print exactly and are safe.)
func (o *oracle) constant(name string, v *tensor.Dense) *G.Node {
	return G.NewMatrix(o.g, tensor.Float64, G.WithName(name), G.WithValue(v))
}

// block is out = h + MLP(norm(h)), h = x + Attn(norm(x)), for global layer l.
func (o *oracle) block(x *G.Node, l int) *G.Node {
	p := func(name string) *G.Node { return o.param[fmt.Sprintf("model.layers.%d.%s.weight", l, name)] }
	a := o.rmsnorm(x, p("input_layernorm"))
	q := o.rope(o.linear(a, p("self_attn.q_proj")))
	k := o.rope(o.linear(a, p("self_attn.k_proj")))
	v := o.linear(a, p("self_attn.v_proj"))
	h := G.Must(G.Add(x, o.linear(o.attention(q, k, v), p("self_attn.o_proj"))))
	a = o.rmsnorm(h, p("post_attention_layernorm"))
	gate, up := o.linear(a, p("mlp.gate_proj")), o.linear(a, p("mlp.up_proj"))
	silu := G.Must(G.HadamardProd(gate, G.Must(G.Sigmoid(gate))))
	m := G.Must(G.HadamardProd(silu, up))
	return G.Must(G.Add(h, o.linear(m, p("mlp.down_proj"))))
}

// linear is x[N,in]·Wᵀ for W[out,in].
func (o *oracle) linear(x, w *G.Node) *G.Node { return G.Must(G.Mul(x, G.Must(G.Transpose(w)))) }

// rmsnorm is w · x / sqrt(mean(x², per row) + eps), x [N,d], w [1,d]. (Not
// InverseSqrt: gorgonia v0.9.18 differentiates it as −g/(2y³) instead of −g·y³/2.)
func (o *oracle) rmsnorm(x, w *G.Node) *G.Node {
	ms := G.Must(G.Mean(G.Must(G.Square(x)), 1))
	ms = G.Must(G.Reshape(ms, tensor.Shape{x.Shape()[0], 1}))
	rms := G.Must(G.Sqrt(G.Must(G.Add(ms, G.NewConstant(float64(o.c.NormEps))))))
	xn := G.Must(G.BroadcastHadamardDiv(x, rms, nil, []byte{1}))
	return G.Must(G.BroadcastHadamardProd(xn, w, nil, []byte{0}))
}

// rope is x⊙cos + rotate_half(x)⊙sin over every head of x [N,d].
func (o *oracle) rope(x *G.Node) *G.Node {
	return G.Must(G.Add(
		G.Must(G.HadamardProd(x, o.cos)),
		G.Must(G.HadamardProd(G.Must(G.Mul(x, o.rot)), o.sin))))
}

// attention is causal softmax(q·kᵀ/√hd)·v per (batch, head), q, k, v [N,d]; the
// heads' outputs sit side by side in [N,d].
func (o *oracle) attention(q, k, v *G.Node) *G.Node {
	hd := o.c.HeadDim()
	scale := G.NewConstant(1 / math.Sqrt(float64(hd)))
	var rows G.Nodes
	for b := range o.b {
		var heads G.Nodes
		for h := range o.c.NHeads {
			part := func(x *G.Node) *G.Node {
				return G.Must(G.Slice(x, G.S(b*o.t, (b+1)*o.t), G.S(h*hd, (h+1)*hd)))
			}
			qs, ks, vs := part(q), part(k), part(v)
			scores := G.Must(G.Mul(G.Must(G.Mul(qs, G.Must(G.Transpose(ks)))), scale))
			// Masked softmax without the max shift: the scores are O(1) here.
			e := G.Must(G.HadamardProd(G.Must(G.Exp(scores)), o.mask))
			z := G.Must(G.Reshape(G.Must(G.Sum(e, 1)), tensor.Shape{o.t, 1}))
			p := G.Must(G.BroadcastHadamardDiv(e, z, nil, []byte{1}))
			heads = append(heads, G.Must(G.Mul(p, vs)))
		}
		rows = append(rows, G.Must(G.Concat(1, heads...)))
	}
	return G.Must(G.Concat(0, rows...))
}

// crossEntropy is −mean over rows of log softmax(logits)[target], logits [N,V].
func (o *oracle) crossEntropy(logits *G.Node, targets []int32) *G.Node {
	n := len(targets)
	lse := G.Must(G.Log(G.Must(G.Sum(G.Must(G.Exp(logits)), 1))))
	lse = G.Must(G.Reshape(lse, tensor.Shape{n, 1}))
	logp := G.Must(G.BroadcastSub(logits, lse, nil, []byte{1}))
	picked := G.Must(G.Sum(G.Must(G.HadamardProd(o.constant("targets", oneHot64(targets, o.c.Vocab)), logp))))
	return G.Must(G.Mul(picked, G.NewConstant(-1/float64(n))))
}

func matrix64(r, c int, v []float64) *tensor.Dense {
	return tensor.New(tensor.WithShape(r, c), tensor.WithBacking(v))
}

func oneHot64(ids []int32, v int) *tensor.Dense {
	m := make([]float64, len(ids)*v)
	for i, id := range ids {
		m[i*v+int(id)] = 1
	}
	return matrix64(len(ids), v, m)
}

func widen64(v []float32) []float64 {
	out := make([]float64, len(v))
	for i, x := range v {
		out[i] = float64(x)
	}
	return out
}

func randIDs(rng *rand.Rand, n, vocab int) []int32 {
	out := make([]int32, n)
	for i := range out {
		out[i] = int32(rng.IntN(vocab))
	}
	return out
}

// valueData64 copies a float64 tensor's elements.
func valueData64(v G.Value) []float64 { return append([]float64(nil), v.Data().([]float64)...) }

// nodeGrad64 copies the gradient gorgonia bound to an input node.
func nodeGrad64(t *testing.T, n *G.Node) []float64 {
	t.Helper()
	g, err := n.Grad()
	if err != nil {
		t.Fatalf("gradient of %s: %v", n.Name(), err)
	}
	return append([]float64(nil), g.Data().([]float64)...)
}

// relErr64 is ||got − want|| / ||want||.
func relErr64(got []float32, want []float64) float64 {
	if len(got) != len(want) {
		return math.Inf(1)
	}
	var num, den float64
	for i, w := range want {
		e := float64(got[i]) - w
		num += e * e
		den += w * w
	}
	return math.Sqrt(num / den)
}
