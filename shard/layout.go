package shard

import "fmt"

// Tensor describes one named tensor inside a stage's flat parameter buffer. Names and
// shapes are Hugging Face Llama's (Linear weights are [out, in]), with global layer
// indices, so a stage's tensors drop straight into a full-model checkpoint.
type Tensor struct {
	Name  string
	Shape []int
	Off   int  // offset into the flat buffer
	Decay bool // matrices get weight decay; norm gains do not
}

// Len is the number of elements.
func (t Tensor) Len() int {
	n := 1
	for _, d := range t.Shape {
		n *= d
	}
	return n
}

// blockOffsets are the offsets of one block's parameters. q,k,v are adjacent so the
// three projections run as one [3d, d] matrix multiply, and gate,up as one [2F, d].
type blockOffsets struct {
	layer                                int // global index
	attnNorm, qkv, wo, mlpNorm, gu, down int
}

// layout places a stage's tensors in its flat buffer.
type layout struct {
	tensors []Tensor
	size    int
	embed   int // -1 unless first stage
	blocks  []blockOffsets
	normF   int // -1 unless last stage
	head    int // -1 unless last stage
}

func newLayout(c Config, r Range, first, last bool) layout {
	l := layout{embed: -1, normF: -1, head: -1}
	add := func(name string, decay bool, shape ...int) int {
		t := Tensor{Name: name, Shape: shape, Off: l.size, Decay: decay}
		l.tensors = append(l.tensors, t)
		l.size += t.Len()
		return t.Off
	}
	d, f := c.DModel, c.DFF
	if first {
		l.embed = add("model.embed_tokens.weight", true, c.Vocab, d)
	}
	for i := r.Lo; i < r.Hi; i++ {
		p := fmt.Sprintf("model.layers.%d.", i)
		var b blockOffsets
		b.layer = i
		b.attnNorm = add(p+"input_layernorm.weight", false, d)
		b.qkv = add(p+"self_attn.q_proj.weight", true, d, d)
		add(p+"self_attn.k_proj.weight", true, d, d)
		add(p+"self_attn.v_proj.weight", true, d, d)
		b.wo = add(p+"self_attn.o_proj.weight", true, d, d)
		b.mlpNorm = add(p+"post_attention_layernorm.weight", false, d)
		b.gu = add(p+"mlp.gate_proj.weight", true, f, d)
		add(p+"mlp.up_proj.weight", true, f, d)
		b.down = add(p+"mlp.down_proj.weight", true, d, f)
		l.blocks = append(l.blocks, b)
	}
	if last {
		l.normF = add("model.norm.weight", false, d)
		l.head = add("lm_head.weight", true, c.Vocab, d)
	}
	return l
}
