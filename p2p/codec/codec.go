// Package codec encodes the float32 tensors that cross pipeline-stage
// boundaries for the wire: fp32, bfloat16, or int8 or int4 with per-block
// scales, each optionally compressed with zstd, chosen per run by a Spec
// such as "int8/32+zstd". ErrorFeedback carries a lossy codec's rounding
// error from one tensor of a stream into the next.
//
// Decoding treats its input as hostile: a payload of the wrong size, an
// impossible value or a malformed zstd stream is an error wrapping
// ErrCorrupt, never a panic, and zstd never decompresses past the size the
// caller expects.
//
// The package depends on no network code, so configuration can parse and
// validate a Spec without importing p2p.
package codec

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// Kind is how a Spec encodes each value.
type Kind uint8

const (
	F32  Kind = 1 // IEEE-754 float32: lossless
	BF16 Kind = 2 // bfloat16, rounded to nearest even: 8 significant bits, float32's range
	Int8 Kind = 3 // int8 with one float32 scale per block of values
	Int4 Kind = 4 // signed 4-bit values, two a byte, with one float32 scale per block
)

func (k Kind) valid() bool { return k >= F32 && k <= Int4 }

// blocked says whether k scales its values per block, and so takes a
// block size.
func (k Kind) blocked() bool { return k == Int8 || k == Int4 }

func (k Kind) String() string {
	switch k {
	case F32:
		return "fp32"
	case BF16:
		return "bf16"
	case Int8:
		return "int8"
	case Int4:
		return "int4"
	}
	return fmt.Sprintf("Kind(%d)", uint8(k))
}

// Spec is a codec: a value encoding, optionally followed by zstd. Specs
// compare with ==; String and Parse convert to and from the text a run
// spec holds ("bf16", "int8/64+zstd"). The zero Spec is not valid.
//
// Encodings of n values (all integers little-endian):
//
//	F32   n × float32
//	BF16  n × uint16: the top half of the float32, rounded to nearest even
//	      (a NaN stays a NaN; values beyond bfloat16's range become ±Inf)
//	Int8  ⌈n/Block⌉ × float32 scales, then n × int8 in [-127, 127]
//	      value i decodes as q[i] × scale[i/Block], where a block's scale
//	      is max|x|/127 over the block, so the error is at most scale/2
//	      (plus float32 rounding: for blocks below 1.5e-36, whose scale
//	      is subnormal, up to 127 subnormal steps); a block of zeros has
//	      scale 0
//	Int4  ⌈n/Block⌉ × float32 scales, then ⌈n/2⌉ bytes of signed 4-bit
//	      values in [-7, 7] (two's complement; -8 is invalid): value 2i in
//	      the low nibble of byte i, value 2i+1 in its high nibble, and for
//	      odd n a last high nibble of 0. Value i decodes as
//	      q[i] × scale[i/Block], where a block's scale is max|x|/7 over the
//	      block, so the error is at most scale/2 (plus float32 rounding: up
//	      to 7 subnormal steps for blocks below 8.2e-38); a block of zeros has
//	      scale 0. Block is even, so every block starts on a byte.
//
// With Zstd the encoding is byte-shuffled before compression (the first
// bytes of every float32 or uint16, then the second bytes, ...), which puts
// sign-and-exponent bytes together where zstd can compress them; int8 and
// int4 values stay as they are. The result is one zstd frame that declares
// its decompressed size.
type Spec struct {
	Kind  Kind
	Block int  // Int8 and Int4 only: values per scale, in [MinBlock, MaxBlock] and even for Int4; 0 for the other kinds
	Zstd  bool // compress the encoded values with zstd
}

// Int8 and Int4 block sizes (Int4's are even). Each block costs a 4-byte
// scale, so int8/32 sends 1 + 4/32 bytes per value, int8/64 1 + 4/64 and
// int4/32 1/2 + 4/32; smaller blocks follow the magnitude of the values
// more closely.
const (
	DefaultBlock = 32
	MinBlock     = 8
	MaxBlock     = 4096
)

// ErrCorrupt is wrapped by every error Decode returns: the payload is not
// what the Spec and the number of values say it must be.
var ErrCorrupt = errors.New("codec: corrupt payload")

func corrupt(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrCorrupt}, args...)...)
}

// Parse parses the text form of a codec: "fp32", "bf16", "int8" or "int4"
// (with DefaultBlock), or "int8/B" or "int4/B" for a block of B values,
// each optionally followed by "+zstd". It is the inverse of Spec.String.
func Parse(s string) (Spec, error) {
	base, z := strings.CutSuffix(s, "+zstd")
	name, block, hasBlock := strings.Cut(base, "/")
	c := Spec{Zstd: z}
	switch name {
	case "fp32":
		c.Kind = F32
	case "bf16":
		c.Kind = BF16
	case "int8":
		c.Kind, c.Block = Int8, DefaultBlock
	case "int4":
		c.Kind, c.Block = Int4, DefaultBlock
	default:
		return Spec{}, fmt.Errorf("codec %q: unknown encoding %q, want fp32, bf16, int8, int8/<block>, int4 or int4/<block>, optionally followed by +zstd", s, name)
	}
	if hasBlock {
		if !c.Kind.blocked() {
			return Spec{}, fmt.Errorf("codec %q: only int8 and int4 take a block size", s)
		}
		b, err := strconv.Atoi(block)
		if err != nil || strconv.Itoa(b) != block {
			return Spec{}, fmt.Errorf("codec %q: block size %q is not a decimal number", s, block)
		}
		c.Block = b
	}
	if msg := c.problem(); msg != "" {
		return Spec{}, fmt.Errorf("codec %q: %s", s, msg)
	}
	return c, nil
}

// String returns the text form Parse reads, such as "int8/32+zstd". An
// invalid Spec prints its parts.
func (c Spec) String() string {
	s := c.Kind.String()
	if c.Kind.blocked() || c.Block != 0 {
		s += "/" + strconv.Itoa(c.Block)
	}
	if c.Zstd {
		s += "+zstd"
	}
	return s
}

// Validate says what, if anything, makes c unusable.
func (c Spec) Validate() error {
	msg := c.problem()
	switch {
	case msg == "":
		return nil
	case !c.Kind.valid():
		return fmt.Errorf("codec: %s", msg)
	}
	return fmt.Errorf("codec %v: %s", c, msg)
}

func (c Spec) problem() string {
	switch {
	case !c.Kind.valid():
		return fmt.Sprintf("unknown kind %d", uint8(c.Kind))
	case c.Kind == Int4 && c.Block%2 != 0:
		return fmt.Sprintf("block size %d is odd: int4 packs two values a byte and needs an even block size in [%d, %d]", c.Block, MinBlock, MaxBlock)
	case c.Kind.blocked() && (c.Block < MinBlock || c.Block > MaxBlock):
		return fmt.Sprintf("block size %d outside [%d, %d]", c.Block, MinBlock, MaxBlock)
	case !c.Kind.blocked() && c.Block != 0:
		return fmt.Sprintf("%v takes no block size, got %d", c.Kind, c.Block)
	}
	return ""
}

func (c Spec) mustBeValid() {
	if err := c.Validate(); err != nil {
		panic(err)
	}
}

// MarshalText encodes c as String does; an invalid Spec is an error.
func (c Spec) MarshalText() ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return []byte(c.String()), nil
}

// UnmarshalText decodes what Parse reads, so a Spec can sit in a YAML or
// JSON config as text.
func (c *Spec) UnmarshalText(text []byte) error {
	parsed, err := Parse(string(text))
	if err != nil {
		return err
	}
	*c = parsed
	return nil
}

// MaxEncodedSize is the largest payload Encode makes of n values: its
// exact length for codecs without zstd. It panics if c is not valid.
func (c Spec) MaxEncodedSize(n int) int {
	c.mustBeValid()
	size, ok := c.maxLen(uint64(n))
	if n < 0 || !ok || size > math.MaxInt {
		panic(fmt.Sprintf("codec: MaxEncodedSize(%d) of %v out of range", n, c))
	}
	return int(size)
}

// rawLen is the byte length of the encoding of n values before zstd; ok is
// false if it overflows. c must be valid.
func (c Spec) rawLen(n uint64) (size uint64, ok bool) {
	switch c.Kind {
	case F32:
		hi, lo := bits.Mul64(n, 4)
		return lo, hi == 0
	case BF16:
		hi, lo := bits.Mul64(n, 2)
		return lo, hi == 0
	}
	blocks := n/uint64(c.Block) + min(n%uint64(c.Block), 1)
	hi, lo := bits.Mul64(blocks, 4)
	values := n // Int8: a byte a value
	if c.Kind == Int4 {
		values = n/2 + n%2
	}
	size, carry := bits.Add64(lo, values, 0)
	return size, hi == 0 && carry == 0
}

// maxLen is the largest payload for n values: rawLen, or the zstd bound of
// it. c must be valid.
func (c Spec) maxLen(n uint64) (uint64, bool) {
	size, ok := c.rawLen(n)
	if !ok || !c.Zstd {
		return size, ok
	}
	if size > math.MaxUint64/2 {
		return 0, false
	}
	return zstdBound(size), true
}

// zstdBound is the most a zstd frame of size bytes can take: the
// reference library's ZSTD_COMPRESSBOUND, which includes the frame header.
// The encoder stores incompressible blocks raw, so it stays well inside.
func zstdBound(size uint64) uint64 {
	b := size + size>>8
	if size < zstdBlockMax {
		b += (zstdBlockMax - size) >> 11
	}
	return b
}

// Encode appends the encoding of x to dst and returns the extended slice.
// An int8 or int4 block holding a NaN or ±Inf gets a NaN scale, which
// Decode refuses: int8 and int4 carry finite values only. Encode panics if
// c is not valid or the encoding would exceed MaxRawBytes.
func (c Spec) Encode(dst []byte, x []float32) []byte {
	c.mustBeValid()
	size, ok := c.rawLen(uint64(len(x)))
	if !ok || size > MaxRawBytes {
		panic(fmt.Sprintf("codec: %d values in %v exceed MaxRawBytes", len(x), c))
	}
	if !c.Zstd {
		dst = slices.Grow(dst, int(size))
		c.put(dst[len(dst):len(dst)+int(size)], x, false)
		return dst[:len(dst)+int(size)]
	}
	bp := getBuf(int(size))
	defer bytePool.Put(bp)
	raw := (*bp)[:size]
	c.put(raw, x, true)
	return zstdEncoder().EncodeAll(raw, dst)
}

// Decode decodes a payload of exactly len(dst) values into dst. It refuses
// a payload of the wrong size, an int8 or int4 scale that is negative, not
// finite or too large to scale 127 (int4: 7) finitely, an int8 value of
// -128 or int4 value of -8, a non-zero value in a block of scale 0, a
// non-zero int4 padding nibble, and a zstd payload that is not exactly one
// well-formed frame declaring and holding the expected number of bytes.
// It never decompresses more than that. Errors wrap ErrCorrupt; dst may
// then hold part of the values. Decode panics if c is not valid or the
// values would take more than MaxRawBytes.
func (c Spec) Decode(dst []float32, payload []byte) error {
	c.mustBeValid()
	size, ok := c.rawLen(uint64(len(dst)))
	if !ok || size > MaxRawBytes {
		panic(fmt.Sprintf("codec: %d values in %v exceed MaxRawBytes", len(dst), c))
	}
	if !c.Zstd {
		if uint64(len(payload)) != size {
			return corrupt("%v payload of %d bytes, %d values take %d", c, len(payload), len(dst), size)
		}
		return c.get(dst, payload, false)
	}
	if bound := zstdBound(size); uint64(len(payload)) > bound {
		return corrupt("%v payload of %d bytes, %d values take at most %d", c, len(payload), len(dst), bound)
	}
	bp := getBuf(int(size) + zstdBlockMax + 64)
	defer bytePool.Put(bp)
	raw, err := unzstd((*bp)[:0], payload, int(size))
	if err != nil {
		return err
	}
	return c.get(dst, raw, true)
}

// put writes the encoding of x into out, which has exactly its length;
// planar shuffles the bytes of multi-byte values.
func (c Spec) put(out []byte, x []float32, planar bool) {
	switch c.Kind {
	case F32:
		putF32(out, x, planar)
	case BF16:
		putBF16(out, x, planar)
	case Int8:
		putInt8(out, x, c.Block, planar)
	case Int4:
		putInt4(out, x, c.Block, planar)
	}
}

// get decodes in, which has exactly the encoded length of len(dst) values.
func (c Spec) get(dst []float32, in []byte, planar bool) error {
	switch c.Kind {
	case F32:
		getF32(dst, in, planar)
	case BF16:
		getBF16(dst, in, planar)
	case Int8:
		return getInt8(dst, in, c.Block, planar)
	case Int4:
		return getInt4(dst, in, c.Block, planar)
	}
	return nil
}

// FirstNonFinite is the index of the first value of x that would not
// arrive finite through c, or -1 if all would: a NaN or ±Inf, or with bf16
// a finite value beyond bfloat16's range, which rounds to ±Inf. (Finite
// int8 and int4 blocks decode finite: their scales are kept so.)
func (c Spec) FirstNonFinite(x []float32) int {
	for i, v := range x {
		if c.Kind == BF16 {
			v = fromBF16(toBF16(v))
		}
		if math.Float32bits(v)&0x7f800000 == 0x7f800000 {
			return i
		}
	}
	return -1
}

// roundTrip sets dst to what Decode(Encode(x)) gives, without encoding; a
// non-finite int8 or int4 block comes back as NaNs.
func (c Spec) roundTrip(dst, x []float32) {
	switch c.Kind {
	case F32:
		copy(dst, x)
	case BF16:
		for i, v := range x {
			dst[i] = fromBF16(toBF16(v))
		}
	case Int8, Int4:
		g := c.Kind.grid()
		for lo := 0; lo < len(x); lo += c.Block {
			hi := min(lo+c.Block, len(x))
			s := g.scale(x[lo:hi])
			if !(s > 0) { // zero, or NaN for a non-finite block
				for i := lo; i < hi; i++ {
					dst[i] = s
				}
				continue
			}
			inv := 1 / float64(s)
			for i := lo; i < hi; i++ {
				dst[i] = float32(quantize(x[i], inv, float64(g.levels))) * s
			}
		}
	}
}

// The value encodings. Planar layouts put byte j of value i at j×n + i.

func putF32(out []byte, x []float32, planar bool) {
	n := len(x)
	out = out[:4*n]
	if !planar {
		for i, v := range x {
			binary.LittleEndian.PutUint32(out[4*i:], math.Float32bits(v))
		}
		return
	}
	p0, p1, p2, p3 := out[:n], out[n:2*n], out[2*n:3*n], out[3*n:]
	for i, v := range x {
		b := math.Float32bits(v)
		p0[i], p1[i], p2[i], p3[i] = byte(b), byte(b>>8), byte(b>>16), byte(b>>24)
	}
}

func getF32(dst []float32, in []byte, planar bool) {
	n := len(dst)
	in = in[:4*n]
	if !planar {
		for i := range dst {
			dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(in[4*i:]))
		}
		return
	}
	p0, p1, p2, p3 := in[:n], in[n:2*n], in[2*n:3*n], in[3*n:]
	for i := range dst {
		dst[i] = math.Float32frombits(uint32(p0[i]) | uint32(p1[i])<<8 | uint32(p2[i])<<16 | uint32(p3[i])<<24)
	}
}

// toBF16 rounds f to bfloat16, to nearest with ties to even. A NaN stays a
// NaN (quiet if its payload was only in the dropped bits); finite values
// beyond bfloat16's largest round to ±Inf, as IEEE rounding does.
func toBF16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 {
		h := uint16(b >> 16)
		if h&0x7f == 0 {
			h |= 0x40
		}
		return h
	}
	return uint16((b + 0x7fff + (b>>16)&1) >> 16)
}

func fromBF16(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

func putBF16(out []byte, x []float32, planar bool) {
	n := len(x)
	out = out[:2*n]
	if !planar {
		for i, v := range x {
			binary.LittleEndian.PutUint16(out[2*i:], toBF16(v))
		}
		return
	}
	lo, hi := out[:n], out[n:]
	for i, v := range x {
		h := toBF16(v)
		lo[i], hi[i] = byte(h), byte(h>>8)
	}
}

func getBF16(dst []float32, in []byte, planar bool) {
	n := len(dst)
	in = in[:2*n]
	if !planar {
		for i := range dst {
			dst[i] = fromBF16(binary.LittleEndian.Uint16(in[2*i:]))
		}
		return
	}
	lo, hi := in[:n], in[n:]
	for i := range dst {
		dst[i] = fromBF16(uint16(lo[i]) | uint16(hi[i])<<8)
	}
}

// A grid is how a block-scaled kind quantises: a value is an integer in
// [-levels, levels] times its block's scale.
type grid struct {
	levels   float32 // 127 for int8, 7 for int4
	maxScale float32 // the largest scale s for which levels·s is finite
}

var (
	int8Grid = newGrid(127)
	int4Grid = newGrid(7)
)

// newGrid finds the largest scale s for which levels·s is finite, so that
// every decoded value is.
func newGrid(levels float32) grid {
	s := float32(math.MaxFloat32) / levels
	for math.IsInf(float64(levels*s), 0) {
		s = math.Nextafter32(s, 0)
	}
	for up := math.Nextafter32(s, math.MaxFloat32); !math.IsInf(float64(levels*up), 0); up = math.Nextafter32(s, math.MaxFloat32) {
		s = up
	}
	return grid{levels: levels, maxScale: s}
}

// grid is the quantisation of a block-scaled kind (Int8 or Int4).
func (k Kind) grid() grid {
	if k == Int4 {
		return int4Grid
	}
	return int8Grid
}

// scale is max|x|/levels (at most maxScale), or NaN if x holds a NaN or
// ±Inf. Comparing the bits of |x| as integers finds the largest and any
// non-finite value in one pass.
func (g grid) scale(x []float32) float32 {
	var m uint32
	for _, v := range x {
		m = max(m, math.Float32bits(v)&0x7fffffff)
	}
	if m >= 0x7f800000 {
		return float32(math.NaN())
	}
	return min(math.Float32frombits(m)/g.levels, g.maxScale)
}

// quantize is v/scale rounded to nearest (ties to even), clamped to
// [-levels, levels], given inv = 1/scale in float64. (A function of the
// levels rather than a grid method, so that encoding loops get a constant.)
func quantize(v float32, inv, levels float64) int8 {
	return int8(max(-levels, min(levels, math.RoundToEven(float64(v)*inv))))
}

// checkScale refuses a scale that is negative (even -0), NaN, infinite or
// above maxScale: as integers, the bits of all of these exceed maxScale's.
func (g grid) checkScale(kind Kind, b int, s float32) error {
	if math.Float32bits(s) > math.Float32bits(g.maxScale) {
		return corrupt("%v block %d: scale %v (bits %#08x), want 0 to %v", kind, b, s, math.Float32bits(s), g.maxScale)
	}
	return nil
}

func putInt8(out []byte, x []float32, block int, planar bool) {
	n := len(x)
	nb := (n + block - 1) / block
	scales, q := out[:4*nb], out[4*nb:4*nb+n]
	for b := range nb {
		lo, hi := b*block, min((b+1)*block, n)
		s := int8Grid.scale(x[lo:hi])
		putScale(scales, b, nb, s, planar)
		if !(s > 0) { // zeros, a scale that underflowed, or NaN
			clear(q[lo:hi])
			continue
		}
		inv := 1 / float64(s)
		for i := lo; i < hi; i++ {
			q[i] = byte(quantize(x[i], inv, 127))
		}
	}
}

func putScale(scales []byte, b, nb int, s float32, planar bool) {
	bits := math.Float32bits(s)
	if !planar {
		binary.LittleEndian.PutUint32(scales[4*b:], bits)
		return
	}
	scales[b], scales[nb+b], scales[2*nb+b], scales[3*nb+b] = byte(bits), byte(bits>>8), byte(bits>>16), byte(bits>>24)
}

func getScale(scales []byte, b, nb int, planar bool) float32 {
	if !planar {
		return math.Float32frombits(binary.LittleEndian.Uint32(scales[4*b:]))
	}
	return math.Float32frombits(uint32(scales[b]) | uint32(scales[nb+b])<<8 | uint32(scales[2*nb+b])<<16 | uint32(scales[3*nb+b])<<24)
}

func getInt8(dst []float32, in []byte, block int, planar bool) error {
	n := len(dst)
	nb := (n + block - 1) / block
	scales, q := in[:4*nb], in[4*nb:4*nb+n]
	for b := range nb {
		lo, hi := b*block, min((b+1)*block, n)
		s := getScale(scales, b, nb, planar)
		if err := int8Grid.checkScale(Int8, b, s); err != nil {
			return err
		}
		for i := lo; i < hi; i++ {
			v := int8(q[i])
			if v == -128 {
				return corrupt("int8 value %d is -128, want [-127, 127]", i)
			}
			if s == 0 && v != 0 {
				return corrupt("int8 value %d is %d in block %d of scale 0", i, v, b)
			}
			dst[i] = float32(v) * s
		}
	}
	return nil
}

// putInt4 packs value 2i into the low nibble of byte i and 2i+1 into its
// high nibble. block is even, so a block's values fill whole bytes, except
// the last value of an odd n, whose high nibble stays 0.
func putInt4(out []byte, x []float32, block int, planar bool) {
	n := len(x)
	nb := (n + block - 1) / block
	scales, q := out[:4*nb], out[4*nb:4*nb+(n+1)/2]
	for b := range nb {
		lo, hi := b*block, min((b+1)*block, n)
		s := int4Grid.scale(x[lo:hi])
		putScale(scales, b, nb, s, planar)
		if !(s > 0) { // zeros, a scale that underflowed, or NaN
			clear(q[lo/2 : (hi+1)/2])
			continue
		}
		inv := 1 / float64(s)
		for i := lo; i+1 < hi; i += 2 {
			q[i/2] = byte(quantize(x[i], inv, 7))&0x0f | byte(quantize(x[i+1], inv, 7))<<4
		}
		if hi%2 != 0 {
			q[hi/2] = byte(quantize(x[hi-1], inv, 7)) & 0x0f
		}
	}
}

// nibble sign-extends the 4-bit two's complement value in the low bits of b.
func nibble(b byte) int8 { return int8(b<<4) >> 4 }

func getInt4(dst []float32, in []byte, block int, planar bool) error {
	n := len(dst)
	nb := (n + block - 1) / block
	scales, q := in[:4*nb], in[4*nb:4*nb+(n+1)/2]
	if n%2 != 0 && q[n/2]>>4 != 0 {
		return corrupt("int4 padding nibble after value %d is %#x, want 0", n-1, q[n/2]>>4)
	}
	for b := range nb {
		lo, hi := b*block, min((b+1)*block, n)
		s := getScale(scales, b, nb, planar)
		if err := int4Grid.checkScale(Int4, b, s); err != nil {
			return err
		}
		for j, p := range q[lo/2 : (hi+1)/2] {
			i := lo + 2*j
			lo4, hi4 := nibble(p), nibble(p>>4)
			if lo4 == -8 || hi4 == -8 || s == 0 && p != 0 {
				return int4Corrupt(i, lo4, hi4, b)
			}
			dst[i] = float32(lo4) * s
			if i+1 < hi {
				dst[i+1] = float32(hi4) * s
			}
		}
	}
	return nil
}

// int4Corrupt says what is wrong with values i and i+1, held in one byte
// as lo4 and hi4, in block b: a -8, or a non-zero value in a block of scale 0.
func int4Corrupt(i int, lo4, hi4 int8, b int) error {
	switch {
	case lo4 == -8:
		return corrupt("int4 value %d is -8, want [-7, 7]", i)
	case hi4 == -8:
		return corrupt("int4 value %d is -8, want [-7, 7]", i+1)
	case lo4 != 0:
		return corrupt("int4 value %d is %d in block %d of scale 0", i, lo4, b)
	}
	return corrupt("int4 value %d is %d in block %d of scale 0", i+1, hi4, b)
}

// zstd. One encoder and one decoder serve the process; both are safe for
// concurrent use and keep per-call state in their own pools.

const zstdBlockMax = 128 << 10 // the largest block a zstd frame may hold

// MaxRawBytes bounds the encoding of one tensor before zstd: 1 GiB, four
// times the largest frame p2p sends.
const MaxRawBytes = 1 << 30

var zstdEncoder = sync.OnceValue(func() *zstd.Encoder {
	e, err := zstd.NewWriter(nil,
		zstd.WithEncoderLevel(zstd.SpeedFastest), // on these payloads higher levels gain under 1%
		// Entropy-code literals even when there are no matches: quantised
		// values rarely repeat, but their bytes are far from uniform.
		zstd.WithAllLitEntropyCompression(true),
		zstd.WithEncoderCRC(false),   // the transport already authenticates every byte
		zstd.WithSingleSegment(true), // always declare the content size, which Decode checks
		zstd.WithZeroFrames(true),    // zero values still make a frame Decode accepts
	)
	if err != nil {
		panic(err)
	}
	return e
})

var zstdDecoder = sync.OnceValue(func() *zstd.Decoder {
	d, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(0), // up to GOMAXPROCS DecodeAll calls at once
		zstd.WithDecoderMaxMemory(MaxRawBytes),
		zstd.WithDecoderMaxWindow(MaxRawBytes),
		zstd.WithDecodeAllCapLimit(true), // never grow the output past the buffer unzstd gives
	)
	if err != nil {
		panic(err)
	}
	return d
})

// unzstd decompresses p, which must be exactly one zstd frame declaring
// want bytes, into buf (len 0), returning exactly want bytes. buf needs
// room for want + zstdBlockMax + 64 bytes: decoding stops with an error
// one block after the frame exceeds its declared size, and the spare
// block means even that never reallocates.
func unzstd(buf, p []byte, want int) ([]byte, error) {
	if err := checkZstdFrame(p, want); err != nil {
		return nil, err
	}
	out, err := zstdDecoder().DecodeAll(p, buf)
	if err != nil {
		return nil, corrupt("zstd: %v", err)
	}
	if len(out) != want {
		return nil, corrupt("zstd frame holds %d bytes, want %d", len(out), want)
	}
	return out, nil
}

// checkZstdFrame checks, before anything is decompressed, that p is one
// zstd frame with no dictionary that declares a content size of want
// bytes, and that its block headers account for every byte of p.
func checkZstdFrame(p []byte, want int) error {
	var h zstd.Header
	if err := h.Decode(p); err != nil {
		return corrupt("zstd header: %v", err)
	}
	switch {
	case h.Skippable:
		return corrupt("zstd: skippable frame, want a data frame")
	case h.DictionaryID != 0:
		return corrupt("zstd: frame needs dictionary %d", h.DictionaryID)
	case !h.HasFCS:
		return corrupt("zstd: frame does not declare its size, want %d bytes", want)
	case h.FrameContentSize != uint64(want):
		return corrupt("zstd: frame declares %d bytes, want %d", h.FrameContentSize, want)
	}
	i := h.HeaderSize
	for {
		if len(p)-i < 3 {
			return corrupt("zstd: truncated block header at byte %d", i)
		}
		bh := uint32(p[i]) | uint32(p[i+1])<<8 | uint32(p[i+2])<<16
		i += 3
		size := int(bh >> 3)
		if size > zstdBlockMax {
			return corrupt("zstd: block of %d bytes exceeds %d", size, zstdBlockMax)
		}
		switch typ := (bh >> 1) & 3; typ {
		case 1: // RLE: one byte, repeated size times
			size = 1
		case 3:
			return corrupt("zstd: reserved block type")
		}
		if len(p)-i < size {
			return corrupt("zstd: truncated block at byte %d", i)
		}
		i += size
		if bh&1 != 0 { // last block
			break
		}
	}
	if h.HasCheckSum {
		i += 4
	}
	if i != len(p) {
		return corrupt("zstd: frame ends at byte %d of %d", i, len(p))
	}
	return nil
}

// bytePool holds scratch buffers for encoding and decoding payloads.
var bytePool sync.Pool

// getBuf returns a pooled buffer with capacity at least n; put it back
// with bytePool.Put.
func getBuf(n int) *[]byte {
	if bp, ok := bytePool.Get().(*[]byte); ok {
		if cap(*bp) >= n {
			*bp = (*bp)[:0]
			return bp
		}
	}
	b := make([]byte, 0, n)
	return &b
}
