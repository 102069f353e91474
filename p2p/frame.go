package p2p

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"math/bits"
	"slices"
	"sync"

	"github.com/pipeswarm/pipeswarm/p2p/codec"
)

// Kind says what a frame's tensor is.
type Kind uint8

const (
	KindActivation Kind = 1 // a training forward activation
	KindGradient   Kind = 2 // an activation-gradient, backward direction
	KindEval       Kind = 3 // a validation forward (no backward follows)
)

func (k Kind) valid() bool { return k >= KindActivation && k <= KindEval }

func (k Kind) String() string {
	switch k {
	case KindActivation:
		return "activation"
	case KindGradient:
		return "gradient"
	case KindEval:
		return "eval"
	}
	return fmt.Sprintf("Kind(%d)", uint8(k))
}

// Frame is one tensor on the wire, with the bookkeeping a stage needs to
// place it: which run, step and micro-batch it belongs to.
//
// A frame claims that its values are finite: Check refuses any that is not,
// and that counts against the sender. An honest sender whose values went
// non-finite has diverged; it says so to its launcher and sends nothing
// (see codec.Spec.FirstNonFinite for the check before sending).
//
// Data always holds float32 values: WriteFrame encodes them with Codec and
// ReadFrame decodes them, so with a lossy codec the receiver gets the
// values rounded as the codec rounds them (codec.ErrorFeedback.Quantize
// carries the rounding error of a stream of frames into the next one).
// Tokens and Targets travel as 1, 2 or 4 bytes per id, the fewest that
// hold every id.
type Frame struct {
	Kind    Kind
	Run     uint64     // run identifier
	Step    uint32     // training step
	Micro   uint32     // micro-batch (or validation batch) index
	Shape   []uint32   // e.g. [B, T, d]; rank 1..4, no zero dims
	Codec   codec.Spec // wire encoding of Data
	Tokens  []int32    // optional input token ids [B*T], sent from stage 0 so later stages have them
	Targets []int32    // optional target ids [B*T], so the last stage can compute the loss
	Data    []float32
}

// CodecF32 is raw float32, the codec of every frame before codecs could be
// chosen per run.
var CodecF32 = codec.Spec{Kind: codec.F32}

// MaxFrameBytes is the largest frame the protocol allows, and the limit
// ReadFrame applies when given none.
const MaxFrameBytes = 256 << 20

// ErrBadFrame is wrapped by every error that reports a malformed or
// unexpected frame. It wraps ErrViolation: the peer that sent it should be
// penalised. (WriteFrame's refusals wrap it too: what this host would refuse.)
var ErrBadFrame = NewViolation("p2p: bad frame")

// Wire layout of a frame, all integers little-endian:
//
//	offset size field
//	     0    4 magic "PSWF"
//	     4    1 version (frameVersion = 2)
//	     5    1 kind (Kind)
//	     6    1 codec kind (codec.Kind)
//	     7    1 rank, 1..4
//	     8    8 run
//	    16    4 step
//	    20    4 micro
//	    24   16 shape: 4 × uint32; dims [0, rank) are non-zero, the rest zero
//	    40    4 token count
//	    44    4 target count
//	    48    4 payload byte length: the codec's exact size for product(shape)
//	          values, or with zstd at most the zstd bound of that size
//	    52    1 codec flags: bit 0 zstd (codec.Spec.Zstd); the other bits are zero
//	    53    1 id width: 1 (uint8), 2 (uint16) or 4 (int32) bytes per token
//	          and target id, the fewest that hold them all (1 if there are none)
//	    54    2 block size (codec.Spec.Block) of int8 and int4; 0 for the other
//	          codec kinds
//	    56      tokens: token count × id width
//	            targets: target count × id width
//	            payload: product(shape) values in the codec's encoding
//
// The header has a fixed size so a reader knows the whole frame's size, and
// can refuse it, after reading 56 bytes. Version 1 had an 8-byte payload
// length, int32 ids and no codec flags, block or id width.
//
// A new codec kind (int4, kind 4) leaves the version as it is: the layout
// is unchanged, every frame of an older kind keeps its bytes and meaning,
// and a reader that predates a kind refuses such frames by value ("codec:
// unknown kind 4") before reading their payload. Peers of one run use the
// codecs its spec names, so they must all know them.
const (
	frameMagic     = "PSWF"
	frameVersion   = 2
	frameHeaderLen = 56
	maxRank        = 4
	flagZstd       = 1
)

// chunkLen is the size of the pooled buffers frames are encoded through and
// decoded from: small frames are written with one Write, large ones in
// chunks of this size, and fp32 values are never copied whole.
const chunkLen = 256 << 10

var chunkPool = sync.Pool{New: func() any { b := make([]byte, 0, chunkLen); return &b }}

func badFrame(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrBadFrame}, args...)...)
}

// shapeLen is the number of values of shape, or an error if the shape is
// not a valid frame shape.
func shapeLen(shape []uint32) (uint64, error) {
	if len(shape) == 0 || len(shape) > maxRank {
		return 0, badFrame("rank %d outside [1, %d]", len(shape), maxRank)
	}
	n := uint64(1)
	for i, d := range shape {
		if d == 0 {
			return 0, badFrame("shape %v: dim %d is zero", shape, i)
		}
		hi, lo := bits.Mul64(n, uint64(d))
		if hi != 0 {
			return 0, badFrame("shape %v: element count overflows", shape)
		}
		n = lo
	}
	return n, nil
}

// idWidth is the fewest bytes per id that hold every id: 1 if all are in
// [0, 256), 2 if all are in [0, 65536), else 4 (negative ids included).
func idWidth(ids ...[]int32) int {
	var hi uint32
	for _, s := range ids {
		for _, id := range s {
			hi = max(hi, uint32(id)) // a negative id becomes >= 1<<31
		}
	}
	return idWidthOf(hi)
}

func idWidthOf(hi uint32) int {
	switch {
	case hi < 1<<8:
		return 1
	case hi < 1<<16:
		return 2
	}
	return 4
}

// bytePool holds buffers for encoded payloads.
var bytePool sync.Pool

// getBuf returns a pooled buffer of length 0 and capacity at least n; put
// it back with bytePool.Put.
func getBuf(n int) *[]byte {
	if bp, ok := bytePool.Get().(*[]byte); ok && cap(*bp) >= n {
		*bp = (*bp)[:0]
		return bp
	}
	b := make([]byte, 0, n)
	return &b
}

// WriteFrame encodes f to w. It refuses (ErrBadFrame) a frame its own
// ReadFrame would refuse: an unknown kind, an invalid codec, a bad shape,
// Data not matching the shape, a total size over MaxFrameBytes, or, with
// an int8 or int4 codec, a value that is not finite. Frames up to 256 KiB are
// written with a single Write.
func WriteFrame(w io.Writer, f *Frame) error {
	if !f.Kind.valid() {
		return badFrame("write: unknown kind %d", f.Kind)
	}
	n, err := shapeLen(f.Shape)
	if err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if err := f.Codec.Validate(); err != nil {
		return badFrame("write: %v", err)
	}
	ntok, ntgt := uint64(len(f.Tokens)), uint64(len(f.Targets))
	if n > MaxFrameBytes/4 || 4*(n+ntok+ntgt) > MaxFrameBytes {
		return badFrame("write: shape %v with %d tokens and %d targets exceeds MaxFrameBytes %d", f.Shape, ntok, ntgt, MaxFrameBytes)
	}
	if uint64(len(f.Data)) != n {
		return badFrame("write: data has %d values, shape %v needs %d", len(f.Data), f.Shape, n)
	}
	if f.Codec.Kind == codec.Int8 || f.Codec.Kind == codec.Int4 {
		for i, v := range f.Data {
			if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
				return badFrame("write: data[%d] is %v, and %v carries finite values only", i, v, f.Codec)
			}
		}
	}
	width := idWidth(f.Tokens, f.Targets)

	var payload []byte // encoded Data, unless it is streamed as plain float32
	size := uint64(f.Codec.MaxEncodedSize(int(n)))
	if f.Codec != CodecF32 {
		pp := getBuf(int(size))
		defer bytePool.Put(pp)
		payload = f.Codec.Encode(*pp, f.Data)
		size = uint64(len(payload))
	}
	if total := frameHeaderLen + uint64(width)*(ntok+ntgt) + size; total > MaxFrameBytes {
		return badFrame("write: frame of %d bytes exceeds MaxFrameBytes %d", total, MaxFrameBytes)
	}

	bp := chunkPool.Get().(*[]byte)
	defer chunkPool.Put(bp)
	cw := chunkWriter{w: w, buf: (*bp)[:0]}

	var h [frameHeaderLen]byte
	copy(h[0:4], frameMagic)
	h[4] = frameVersion
	h[5] = byte(f.Kind)
	h[6] = byte(f.Codec.Kind)
	h[7] = byte(len(f.Shape))
	binary.LittleEndian.PutUint64(h[8:], f.Run)
	binary.LittleEndian.PutUint32(h[16:], f.Step)
	binary.LittleEndian.PutUint32(h[20:], f.Micro)
	for i, d := range f.Shape {
		binary.LittleEndian.PutUint32(h[24+4*i:], d)
	}
	binary.LittleEndian.PutUint32(h[40:], uint32(ntok))
	binary.LittleEndian.PutUint32(h[44:], uint32(ntgt))
	binary.LittleEndian.PutUint32(h[48:], uint32(size))
	if f.Codec.Zstd {
		h[52] = flagZstd
	}
	h[53] = byte(width)
	binary.LittleEndian.PutUint16(h[54:], uint16(f.Codec.Block))
	cw.buf = append(cw.buf, h[:]...)

	cw.putIDs(f.Tokens, width)
	cw.putIDs(f.Targets, width)
	if f.Codec == CodecF32 {
		cw.putFloat32s(f.Data)
	} else {
		cw.putBytes(payload)
	}
	cw.flush()
	if cw.err != nil {
		return fmt.Errorf("p2p: write frame: %w", cw.err)
	}
	return nil
}

// chunkWriter encodes values into buf and writes it to w whenever it fills.
// The first write error sticks.
type chunkWriter struct {
	w   io.Writer
	buf []byte
	err error
}

func (c *chunkWriter) flush() {
	if c.err == nil && len(c.buf) > 0 {
		_, c.err = c.w.Write(c.buf)
	}
	c.buf = c.buf[:0]
}

// room makes space for at least one value of size bytes and returns how
// many fit.
func (c *chunkWriter) room(size int) int {
	if cap(c.buf)-len(c.buf) < size {
		c.flush()
	}
	return (cap(c.buf) - len(c.buf)) / size
}

func (c *chunkWriter) putIDs(v []int32, width int) {
	for len(v) > 0 && c.err == nil {
		k := min(c.room(width), len(v))
		for _, x := range v[:k] {
			switch width {
			case 1:
				c.buf = append(c.buf, byte(x))
			case 2:
				c.buf = binary.LittleEndian.AppendUint16(c.buf, uint16(x))
			default:
				c.buf = binary.LittleEndian.AppendUint32(c.buf, uint32(x))
			}
		}
		v = v[k:]
	}
}

func (c *chunkWriter) putFloat32s(v []float32) {
	for len(v) > 0 && c.err == nil {
		k := min(c.room(4), len(v))
		for _, x := range v[:k] {
			c.buf = binary.LittleEndian.AppendUint32(c.buf, math.Float32bits(x))
		}
		v = v[k:]
	}
}

func (c *chunkWriter) putBytes(p []byte) {
	for len(p) > 0 && c.err == nil {
		k := min(c.room(1), len(p))
		c.buf = append(c.buf, p[:k]...)
		p = p[k:]
	}
}

// ReadFrame decodes one frame from r. A clean end of stream before the
// first byte is returned as io.EOF itself.
//
// maxBytes bounds both the frame's encoded size (header included) and the
// memory its decoded slices take; maxBytes <= 0 or over MaxFrameBytes means
// MaxFrameBytes. The bound is checked against the header before anything
// is allocated, and buffers then grow only as data actually arrives (see
// readValues), so a header claiming a huge tensor costs at most a few MiB.
// Receivers that know the expected shape should pass Expect.MaxBytes.
// (A legitimate frame of more than 4 MiB of values is assembled by
// doubling, so it may allocate up to twice its size in total on the way.)
//
// A payload in another codec than plain fp32 is read whole, then decoded.
// Decoding a zstd payload allocates the size the header declares once the
// compressed bytes have arrived, so a small zstd payload can cost up to
// maxBytes; decompression never produces more than that size, and a
// payload that would is refused.
//
// Malformed input is refused with an error wrapping ErrBadFrame that names
// the problem. Input that ends mid-frame gives an error wrapping
// io.ErrUnexpectedEOF and not ErrBadFrame: a stream cut short is what a
// peer that dies mid-write leaves, not a violation. Other read errors (a
// reset stream, say) are returned wrapped, without ErrBadFrame either.
func ReadFrame(r io.Reader, maxBytes int) (*Frame, error) {
	if maxBytes <= 0 || maxBytes > MaxFrameBytes {
		maxBytes = MaxFrameBytes
	}
	var h [frameHeaderLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		if err == io.EOF {
			return nil, io.EOF
		}
		return nil, readErr("header", err)
	}
	if string(h[0:4]) != frameMagic {
		return nil, badFrame("magic %q, want %q", h[0:4], frameMagic)
	}
	if h[4] != frameVersion {
		return nil, badFrame("version %d, want %d", h[4], frameVersion)
	}
	f := &Frame{
		Kind:  Kind(h[5]),
		Codec: codec.Spec{Kind: codec.Kind(h[6]), Block: int(binary.LittleEndian.Uint16(h[54:])), Zstd: h[52]&flagZstd != 0},
		Run:   binary.LittleEndian.Uint64(h[8:]),
		Step:  binary.LittleEndian.Uint32(h[16:]),
		Micro: binary.LittleEndian.Uint32(h[20:]),
	}
	if !f.Kind.valid() {
		return nil, badFrame("unknown kind %d", h[5])
	}
	if h[52]&^flagZstd != 0 {
		return nil, badFrame("unknown codec flags %#02x", h[52])
	}
	if err := f.Codec.Validate(); err != nil {
		return nil, badFrame("%v", err)
	}
	rank := int(h[7])
	if rank == 0 || rank > maxRank {
		return nil, badFrame("rank %d outside [1, %d]", rank, maxRank)
	}
	var dims [maxRank]uint32
	for i := range dims {
		dims[i] = binary.LittleEndian.Uint32(h[24+4*i:])
		if i >= rank && dims[i] != 0 {
			return nil, badFrame("rank %d but dim %d is %d, want 0", rank, i, dims[i])
		}
	}
	n, err := shapeLen(dims[:rank])
	if err != nil {
		return nil, err
	}
	width := uint64(h[53])
	if width != 1 && width != 2 && width != 4 {
		return nil, badFrame("id width %d, want 1, 2 or 4", width)
	}
	ntok := uint64(binary.LittleEndian.Uint32(h[40:]))
	ntgt := uint64(binary.LittleEndian.Uint32(h[44:]))
	payload := uint64(binary.LittleEndian.Uint32(h[48:]))
	limit := uint64(maxBytes)

	// Every size below is checked against limit before it is multiplied
	// or added, so nothing overflows.
	if n > limit/4 {
		return nil, badFrame("shape %v: %d values exceed limit of %d bytes", dims[:rank], n, limit)
	}
	if ntok > limit/4 {
		return nil, badFrame("token count %d exceeds limit of %d bytes", ntok, limit)
	}
	if ntgt > limit/4 {
		return nil, badFrame("target count %d exceeds limit of %d bytes", ntgt, limit)
	}
	// Exact without zstd, the zstd bound with it.
	if want := uint64(f.Codec.MaxEncodedSize(int(n))); !f.Codec.Zstd && payload != want {
		return nil, badFrame("payload length %d, shape %v in %v needs %d", payload, dims[:rank], f.Codec, want)
	} else if f.Codec.Zstd && payload > want {
		return nil, badFrame("payload length %d, shape %v in %v needs at most %d", payload, dims[:rank], f.Codec, want)
	}
	wire := frameHeaderLen + width*(ntok+ntgt) + payload
	mem := 4 * (n + ntok + ntgt)
	if wire > limit || mem > limit {
		return nil, badFrame("frame of %d bytes (%d decoded) exceeds limit of %d bytes", wire, mem, limit)
	}

	f.Shape = slices.Clone(dims[:rank])
	bp := chunkPool.Get().(*[]byte)
	defer chunkPool.Put(bp)
	scratch := (*bp)[:cap(*bp)]
	dec := idDecoder(int(width))
	if ntok > 0 {
		if f.Tokens, err = readValues(r, ntok, int(width), scratch, dec); err != nil {
			return nil, readErr("tokens", err)
		}
	}
	if ntgt > 0 {
		if f.Targets, err = readValues(r, ntgt, int(width), scratch, dec); err != nil {
			return nil, readErr("targets", err)
		}
	}
	if need := uint64(idWidth(f.Tokens, f.Targets)); width != need {
		return nil, badFrame("id width %d, but the ids need %d", width, need)
	}
	if f.Codec == CodecF32 {
		if f.Data, err = readValues(r, n, 4, scratch, decodeFloat32s); err != nil {
			return nil, readErr("payload", err)
		}
		return f, nil
	}
	pp := getBuf(0)
	defer bytePool.Put(pp)
	*pp, err = readBytes(r, payload, *pp)
	if err != nil {
		return nil, readErr("payload", err)
	}
	f.Data = make([]float32, n)
	if err := f.Codec.Decode(f.Data, *pp); err != nil {
		return nil, fmt.Errorf("%w: payload: %w", ErrBadFrame, err)
	}
	return f, nil
}

// readErr wraps an error met while reading part of a frame. None is a
// violation: running out of input mid-frame (io.ErrUnexpectedEOF) is a
// stream cut short, anything else the transport's failure.
func readErr(part string, err error) error {
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return fmt.Errorf("p2p: read frame: truncated %s: %w", part, io.ErrUnexpectedEOF)
	}
	return fmt.Errorf("p2p: read frame %s: %w", part, err)
}

// eagerValues is how many values readValues allocates before any arrive.
// Realistic frames fit (16×128×128 activations are 256 Ki values), so they
// cost one allocation; a header claiming more costs only this much until
// the sender actually sends the data.
const eagerValues = 1 << 20

// readValues reads n values of size bytes each from r through scratch,
// decoding each chunk with dec. The result starts with room for
// eagerValues and doubles as data arrives, so memory tracks the bytes
// received, never just the bytes claimed; its final length and capacity
// are exactly n.
func readValues[T int32 | float32](r io.Reader, n uint64, size int, scratch []byte, dec func(dst []T, src []byte)) ([]T, error) {
	dst := make([]T, 0, min(n, eagerValues))
	for uint64(len(dst)) < n {
		if len(dst) == cap(dst) {
			grown := make([]T, len(dst), min(n, 2*uint64(cap(dst))))
			copy(grown, dst)
			dst = grown
		}
		k := min(len(scratch)/size, cap(dst)-len(dst))
		b := scratch[:size*k]
		if _, err := io.ReadFull(r, b); err != nil {
			return nil, err
		}
		dec(dst[len(dst):len(dst)+k], b)
		dst = dst[:len(dst)+k]
	}
	return dst, nil
}

// readBytes reads n bytes from r into buf[:0], growing it (from
// 4×eagerValues bytes, then by doubling) only as data arrives.
func readBytes(r io.Reader, n uint64, buf []byte) ([]byte, error) {
	buf = buf[:0]
	for uint64(len(buf)) < n {
		if len(buf) == cap(buf) {
			grown := make([]byte, len(buf), min(n, max(4*eagerValues, 2*uint64(cap(buf)))))
			copy(grown, buf)
			buf = grown
		}
		k := min(uint64(cap(buf)), n) - uint64(len(buf))
		if _, err := io.ReadFull(r, buf[len(buf):uint64(len(buf))+k]); err != nil {
			return buf[:0], err
		}
		buf = buf[:uint64(len(buf))+k]
	}
	return buf, nil
}

func idDecoder(width int) func(dst []int32, src []byte) {
	switch width {
	case 1:
		return func(dst []int32, src []byte) {
			for i := range dst {
				dst[i] = int32(src[i])
			}
		}
	case 2:
		return func(dst []int32, src []byte) {
			for i := range dst {
				dst[i] = int32(binary.LittleEndian.Uint16(src[2*i:]))
			}
		}
	}
	return func(dst []int32, src []byte) {
		for i := range dst {
			dst[i] = int32(binary.LittleEndian.Uint32(src[4*i:]))
		}
	}
}

func decodeFloat32s(dst []float32, src []byte) {
	for i := range dst {
		dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:]))
	}
}

// Expect is what a receiver knows a valid frame must look like. Run, Kind
// and Codec are compared exactly (a zero Kind or Codec matches nothing): a
// receiver refuses a codec it was not told to expect.
type Expect struct {
	Run    uint64
	Kind   Kind
	Shape  []uint32   // exact shape expected (nil = any)
	Tokens bool       // Tokens and Targets must be present with product(Shape[:2]) entries each; if false they must be absent
	Vocab  int        // token and target ids must be in [0, Vocab); <= 0 only requires them non-negative
	Codec  codec.Spec // the codec the run uses for this kind of frame
}

// MaxBytes is the size limit to pass to ReadFrame for a frame matching e:
// the largest encoded or decoded size such a frame can have when Shape is
// set (exact for fp32, and for ids that need the width Vocab implies),
// MaxFrameBytes when it is not (or when that size would exceed it).
func (e Expect) MaxBytes() int {
	n, err := shapeLen(e.Shape)
	if err != nil || n > MaxFrameBytes/4 || e.Codec.Validate() != nil {
		return MaxFrameBytes
	}
	var ntok uint64
	if e.Tokens && len(e.Shape) >= 2 {
		ntok = 2 * uint64(e.Shape[0]) * uint64(e.Shape[1]) // tokens and targets
	}
	width := uint64(4)
	if e.Vocab > 0 {
		width = uint64(idWidthOf(uint32(min(uint64(e.Vocab-1), math.MaxUint32))))
	}
	payload := uint64(e.Codec.MaxEncodedSize(int(n)))
	size := max(frameHeaderLen+width*ntok+payload, 4*(n+ntok))
	if size > MaxFrameBytes {
		return MaxFrameBytes
	}
	return int(size)
}

// Check validates f against what the receiver expects: run id, kind,
// codec, shape (and that Data matches it), token and target counts and
// ranges, and that every value is finite. Errors wrap ErrBadFrame and name
// the field, what it was and what was expected.
func (f *Frame) Check(e Expect) error {
	if f.Run != e.Run {
		return badFrame("run: got %016x, want %016x", f.Run, e.Run)
	}
	if f.Kind != e.Kind {
		return badFrame("kind: got %v, want %v", f.Kind, e.Kind)
	}
	if f.Codec != e.Codec {
		return badFrame("codec: got %v, want %v", f.Codec, e.Codec)
	}
	n, err := shapeLen(f.Shape)
	if err != nil {
		return err
	}
	if e.Shape != nil && !slices.Equal(f.Shape, e.Shape) {
		return badFrame("shape: got %v, want %v", f.Shape, e.Shape)
	}
	if uint64(len(f.Data)) != n {
		return badFrame("data: got %d values, shape %v needs %d", len(f.Data), f.Shape, n)
	}
	if e.Tokens {
		if len(f.Shape) < 2 {
			return badFrame("tokens: shape %v has no [B, T] prefix", f.Shape)
		}
		bt := uint64(f.Shape[0]) * uint64(f.Shape[1]) // <= n, so no overflow
		if uint64(len(f.Tokens)) != bt {
			return badFrame("tokens: got %d, want %d (B×T of shape %v)", len(f.Tokens), bt, f.Shape)
		}
		if uint64(len(f.Targets)) != bt {
			return badFrame("targets: got %d, want %d (B×T of shape %v)", len(f.Targets), bt, f.Shape)
		}
	} else {
		if len(f.Tokens) != 0 {
			return badFrame("tokens: got %d, want none", len(f.Tokens))
		}
		if len(f.Targets) != 0 {
			return badFrame("targets: got %d, want none", len(f.Targets))
		}
	}
	if err := checkIDs("tokens", f.Tokens, e.Vocab); err != nil {
		return err
	}
	if err := checkIDs("targets", f.Targets, e.Vocab); err != nil {
		return err
	}
	for i, v := range f.Data {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			return badFrame("data[%d]: got %v, want a finite value", i, v)
		}
	}
	return nil
}

func checkIDs(field string, ids []int32, vocab int) error {
	for i, id := range ids {
		if id < 0 || (vocab > 0 && int(id) >= vocab) {
			if vocab > 0 {
				return badFrame("%s[%d]: got id %d, want [0, %d)", field, i, id, vocab)
			}
			return badFrame("%s[%d]: got id %d, want >= 0", field, i, id)
		}
	}
	return nil
}
