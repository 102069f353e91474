package tokenizer

import (
	"container/heap"
	"math"
)

// A merge is one rule of a BPE model: the pair's rank (lower merges first) and the id of
// the token it makes.
type merge struct {
	rank int32
	id   int32
}

func pairKey(a, b int32) uint64 { return uint64(uint32(a))<<32 | uint64(uint32(b)) }

// bpe merges word, the ids of a pre-token's bytes, in place by the rules and returns the
// result: always the lowest-ranked pair present, the leftmost of equal ones, as Hugging
// Face's tokenizers do. Short words take a quadratic scan, long ones a heap.
func (t *Tokenizer) bpe(word []int32) []int32 {
	if len(word) < 2 {
		return word
	}
	if len(word) > 48 {
		return t.bpeHeap(word)
	}
	for {
		best, at := int32(math.MaxInt32), -1
		var id int32
		for i := 0; i+1 < len(word); i++ {
			if m, ok := t.merges[pairKey(word[i], word[i+1])]; ok && m.rank < best {
				best, at, id = m.rank, i, m.id
			}
		}
		if at < 0 {
			return word
		}
		word[at] = id
		word = append(word[:at+1], word[at+2:]...)
	}
}

type symbol struct {
	id         int32
	prev, next int32 // indices in the symbol list, -1 at the ends
	gone       bool
}

type candidate struct {
	rank, pos   int32
	left, right int32 // the ids the pair had when queued, to spot stale entries
}

type candidates []candidate

func (c candidates) Len() int { return len(c) }
func (c candidates) Less(i, j int) bool {
	return c[i].rank < c[j].rank || c[i].rank == c[j].rank && c[i].pos < c[j].pos
}
func (c candidates) Swap(i, j int) { c[i], c[j] = c[j], c[i] }
func (c *candidates) Push(x any)   { *c = append(*c, x.(candidate)) }
func (c *candidates) Pop() any {
	old := *c
	x := old[len(old)-1]
	*c = old[:len(old)-1]
	return x
}

func (t *Tokenizer) bpeHeap(word []int32) []int32 {
	syms := make([]symbol, len(word))
	for i, id := range word {
		syms[i] = symbol{id: id, prev: int32(i - 1), next: int32(i + 1)}
	}
	syms[len(syms)-1].next = -1
	q := make(candidates, 0, len(word))
	push := func(i int32) {
		j := syms[i].next
		if j < 0 {
			return
		}
		if m, ok := t.merges[pairKey(syms[i].id, syms[j].id)]; ok {
			heap.Push(&q, candidate{rank: m.rank, pos: i, left: syms[i].id, right: syms[j].id})
		}
	}
	for i := range syms {
		push(int32(i))
	}
	for q.Len() > 0 {
		c := heap.Pop(&q).(candidate)
		s := &syms[c.pos]
		if s.gone || s.id != c.left || s.next < 0 || syms[s.next].id != c.right {
			continue
		}
		m := t.merges[pairKey(c.left, c.right)]
		r := &syms[s.next]
		r.gone = true
		s.id = m.id
		s.next = r.next
		if r.next >= 0 {
			syms[r.next].prev = c.pos
		}
		if s.prev >= 0 {
			push(s.prev)
		}
		push(c.pos)
	}
	word = word[:0]
	for i := int32(0); i >= 0; i = syms[i].next {
		word = append(word, syms[i].id)
	}
	return word
}
