package reduce

import (
	"fmt"

	"github.com/pipeswarm/pipeswarm/p2p/codec"
)

// PieceValues is the most values one frame carries. Chunks travel as
// pieces of this size so that sending, decoding and summing overlap. It is
// a power of two, so a multiple of every power-of-two block size; for other
// block sizes a piece is PieceValues rounded down to a whole number of
// blocks (see pieceLen).
const PieceValues = 64 * 1024

// Range is the half-open interval [Lo, Hi) of a vector.
type Range struct{ Lo, Hi int }

// Len is Hi - Lo.
func (r Range) Len() int { return r.Hi - r.Lo }

// Chunks cuts n values into parts contiguous ranges, as evenly as whole
// blocks of align values allow: every range but the last holds a multiple
// of align values, so encoding a range with a block codec gives exactly
// the values encoding the whole vector would. Ranges are empty when there
// are fewer blocks than parts. It panics if n < 0, parts < 1 or align < 1.
func Chunks(n, parts, align int) []Range {
	out := make([]Range, parts)
	for c := range out {
		out[c] = chunkRange(n, parts, align, c)
	}
	return out
}

// chunkRange is Chunks(n, parts, align)[c] without the slice.
func chunkRange(n, parts, align, c int) Range {
	if n < 0 || parts < 1 || align < 1 || c < 0 || c >= parts {
		panic(fmt.Sprintf("reduce: chunkRange(%d, %d, %d, %d)", n, parts, align, c))
	}
	blocks := int64((n + align - 1) / align)
	at := func(c int) int {
		if c == parts {
			return n
		}
		return int(min(int64(n), int64(c)*blocks/int64(parts)*int64(align)))
	}
	return Range{at(c), at(c + 1)}
}

// align is the granularity chunks must respect for c: its block size for
// block codecs, else 1.
func align(c codec.Spec) int { return max(c.Block, 1) }

// pieceLen is the number of values per piece (the last piece of a chunk
// may be shorter): PieceValues rounded down to a whole number of blocks.
func pieceLen(align int) int { return max(align, PieceValues-PieceValues%align) }

// numPieces is how many frames carry a chunk of size values: at least one,
// so that an empty chunk still tells its owner the sender is there.
func numPieces(size, plen int) int { return max(1, (size+plen-1)/plen) }

// pieceRange is piece k of a chunk of size values, relative to the chunk.
func pieceRange(size, plen, k int) Range {
	lo := min(size, k*plen)
	return Range{lo, min(size, lo+plen)}
}

// accumulate adds q to sum element by element in float32. Both the
// network path and Reference sum through it, contributions in ascending
// replica order, so they round identically.
func accumulate(sum, q []float32) {
	q = q[:len(sum)]
	for i := range sum {
		sum[i] += q[i]
	}
}

// average divides sum by count in place, in float32.
func average(sum []float32, count int) {
	d := float32(count)
	for i := range sum {
		sum[i] /= d
	}
}

// roundTrip encodes x with c and decodes it again: dst gets what a
// receiver of the encoding sees; the encoding is returned.
func roundTrip(c codec.Spec, dst, x []float32) ([]byte, error) {
	enc := c.Encode(nil, x)
	if err := c.Decode(dst, enc); err != nil {
		return nil, err
	}
	return enc, nil
}

// countWriter counts bytes written to it.
type countWriter struct{ n int64 }

func (w *countWriter) Write(p []byte) (int, error) { w.n += int64(len(p)); return len(p), nil }

// Reference is what a fault-free all-reduce of ys (one vector per member,
// in replica order, all of the same length) gives, computed in one
// process: avg is every member's Avg, own[r] is member r's Own, and
// sent[r] is the bytes member r writes on the wire in both phases. The
// arithmetic is the network path's, so avg and own are bit-identical to
// what Group.AllReduce returns. It panics if ys is empty or the lengths
// differ, or if a vector holds values c cannot carry.
func Reference(c codec.Spec, ys [][]float32) (avg []float32, own [][]float32, sent []int64) {
	R := len(ys)
	if R == 0 || R > MaxMembers {
		panic(fmt.Sprintf("reduce: Reference of %d vectors", R))
	}
	n := len(ys[0])
	for r, y := range ys {
		if len(y) != n {
			panic(fmt.Sprintf("reduce: Reference: ys[%d] has %d values, ys[0] %d", r, len(y), n))
		}
	}
	al := align(c)
	plen := pieceLen(al)
	chunks := Chunks(n, R, al)
	avg = make([]float32, n)
	own = make([][]float32, R)
	sent = make([]int64, R)
	for r := range own {
		own[r] = make([]float32, n)
	}
	var cw countWriter
	frameBytes := func(typ frameType, payload []byte) int64 {
		cw.n = 0
		if err := writeFrame(&cw, &header{typ: typ, codec: c}, payload); err != nil {
			panic(err)
		}
		return cw.n
	}
	sum := make([]float32, plen)
	for c0, ch := range chunks {
		for k := range numPieces(ch.Len(), plen) {
			pr := pieceRange(ch.Len(), plen, k)
			lo, hi := ch.Lo+pr.Lo, ch.Lo+pr.Hi
			s := sum[:hi-lo]
			clear(s)
			for r, y := range ys {
				enc, err := roundTrip(c, own[r][lo:hi], y[lo:hi])
				if err != nil {
					panic(fmt.Sprintf("reduce: Reference: ys[%d][%d:%d]: %v", r, lo, hi, err))
				}
				if r != c0 {
					sent[r] += frameBytes(typeContrib, enc)
				}
				accumulate(s, own[r][lo:hi])
			}
			average(s, R)
			enc, err := roundTrip(c, avg[lo:hi], s)
			if err != nil {
				panic(fmt.Sprintf("reduce: Reference: average of [%d:%d]: %v", lo, hi, err))
			}
			sent[c0] += int64(R-1) * frameBytes(typeResult, enc)
		}
	}
	return avg, own, sent
}
