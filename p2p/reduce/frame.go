package reduce

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"

	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/codec"
)

// ErrBadFrame is wrapped by every error that reports a malformed or
// unexpected frame. It wraps p2p.ErrViolation: the stream it came on is
// reset and its sender penalised.
var ErrBadFrame = p2p.NewViolation("reduce: bad frame")

func badFrame(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrBadFrame}, args...)...)
}

// errUnknownGroup is returned by readFrame for a well-formed frame of a
// (run, group) this host has not joined (yet): it is skipped, not
// penalised, since members join at slightly different times.
var errUnknownGroup = errors.New("reduce: frame for a group not joined")

// frameType says what a frame carries.
type frameType uint8

const (
	typeContrib   frameType = 1  // phase 1: a piece of a member's chunk, to the chunk's owner
	typeResult    frameType = 2  // phase 2: a piece of a chunk's average, from its owner; mask = contributors
	typeBehind    frameType = 3  // round is over (or the receiver is not a member): fetch state
	typeDrop      frameType = 4  // the sender declared the members in mask missing from round
	typeJoin      frameType = 5  // the sender takes part again from round on
	typeLeave     frameType = 6  // the sender is gone for good
	typeStateReq  frameType = 7  // send me your State
	typeState     frameType = 8  // a piece of state vector index (n values), raw little-endian float32
	typeStateEnd  frameType = 9  // end of state: index = vector count, payload = sha256, mask = live members
	typeStateNone frameType = 10 // no state to serve
	typeJoinAck   frameType = 11 // the sender counts the joiner in from round on
	// Fetching from several members at once: describe, then serve chosen pieces.
	typeStateInfoReq   frameType = 12 // describe your State as of round (0: the latest)
	typeStateInfo      frameType = 13 // index = vector count, mask = live members, payload = per vector its length and sha256
	typeStatePiecesReq frameType = 14 // send these pieces of your State as of round: index = count, payload = (vector, piece) pairs
	typeStatePiecesEnd frameType = 15 // the pieces asked are sent: index = count
	typeLast                     = typeStatePiecesEnd
)

// state reports whether frames of type t belong to a state fetch.
func (t frameType) state() bool {
	switch t {
	case typeStateReq, typeState, typeStateEnd, typeStateNone, typeStateInfoReq, typeStateInfo, typeStatePiecesReq, typeStatePiecesEnd:
		return true
	}
	return false
}

func (t frameType) String() string {
	names := [...]string{"", "contrib", "result", "behind", "drop", "join", "leave", "state-req", "state", "state-end", "state-none", "join-ack", "state-info-req", "state-info", "state-pieces-req", "state-pieces-end"}
	if t >= 1 && t <= typeLast {
		return names[t]
	}
	return fmt.Sprintf("frameType(%d)", uint8(t))
}

// Wire layout of a frame, all integers little-endian:
//
//	offset size field
//	     0    4 magic "PSWR"
//	     4    1 version (frameVersion = 1)
//	     5    1 type (frameType)
//	     6    1 codec kind (codec.Kind), the group's
//	     7    1 codec flags: bit 0 zstd; the other bits are zero
//	     8    2 codec block size (codec.Spec.Block)
//	    10    2 zero
//	    12    4 group
//	    16    8 run
//	    24    8 round
//	    32    4 n: the vector length of the round (state: of vector index)
//	    36    4 index: chunk (contrib, result), state vector (state),
//	          vector count (state-end, state-info) or piece count
//	          (state-pieces-req, state-pieces-end)
//	    40    4 offset of the piece within the chunk or vector, in values
//	    44    4 count: values in the piece
//	    48    8 mask: contributors (result), dropped members (drop), live
//	          members (state-end, state-info); bit r is replica r
//	    56    4 payload length in bytes
//	    60    4 tag: the state fetch a state frame belongs to (echoed from its
//	          request); zero in other frames
//	    64      payload: count values in the codec (contrib, result), count
//	            raw float32 (state), a sha256 (state-end), per vector its
//	            length (uint32) and sha256 (state-info), (vector, piece)
//	            uint32 pairs (state-pieces-req), else nothing
//
// Every field is checked against the group before the payload is
// allocated: the piece must be exactly piece offset/pieceLen of the chunk
// Chunks gives for n, so the payload has one possible size (an upper
// bound with zstd), at most the encoding of pieceLen values.
const (
	frameMagic     = "PSWR"
	frameVersion   = 1
	headerLen      = 64
	flagZstd       = 1
	hashLen        = 32
	infoEntry      = 4 + hashLen // a vector's length and sha256 in a state-info payload
	maxStateVecs   = 64          // state vectors a server may send
	maxDiscardSize = 64 << 20
)

// header is a decoded frame header.
type header struct {
	typ    frameType
	codec  codec.Spec
	group  uint32
	run    uint64
	round  uint64
	n      uint32
	index  uint32
	offset uint32
	count  uint32
	mask   uint64
	plen   uint32 // payload length
	tag    uint32 // state frames: the fetch they answer
}

func (h *header) put(b *[headerLen]byte) {
	copy(b[0:4], frameMagic)
	b[4] = frameVersion
	b[5] = byte(h.typ)
	b[6] = byte(h.codec.Kind)
	if h.codec.Zstd {
		b[7] = flagZstd
	}
	binary.LittleEndian.PutUint16(b[8:], uint16(h.codec.Block))
	binary.LittleEndian.PutUint32(b[12:], h.group)
	binary.LittleEndian.PutUint64(b[16:], h.run)
	binary.LittleEndian.PutUint64(b[24:], h.round)
	binary.LittleEndian.PutUint32(b[32:], h.n)
	binary.LittleEndian.PutUint32(b[36:], h.index)
	binary.LittleEndian.PutUint32(b[40:], h.offset)
	binary.LittleEndian.PutUint32(b[44:], h.count)
	binary.LittleEndian.PutUint64(b[48:], h.mask)
	binary.LittleEndian.PutUint32(b[56:], h.plen)
	binary.LittleEndian.PutUint32(b[60:], h.tag)
}

func parseHeader(b *[headerLen]byte) (header, error) {
	if string(b[0:4]) != frameMagic {
		return header{}, badFrame("magic %q, want %q", b[0:4], frameMagic)
	}
	if b[4] != frameVersion {
		return header{}, badFrame("version %d, want %d", b[4], frameVersion)
	}
	if b[7]&^flagZstd != 0 || b[10] != 0 || b[11] != 0 {
		return header{}, badFrame("reserved bits set")
	}
	h := header{
		typ:    frameType(b[5]),
		codec:  codec.Spec{Kind: codec.Kind(b[6]), Zstd: b[7]&flagZstd != 0, Block: int(binary.LittleEndian.Uint16(b[8:]))},
		group:  binary.LittleEndian.Uint32(b[12:]),
		run:    binary.LittleEndian.Uint64(b[16:]),
		round:  binary.LittleEndian.Uint64(b[24:]),
		n:      binary.LittleEndian.Uint32(b[32:]),
		index:  binary.LittleEndian.Uint32(b[36:]),
		offset: binary.LittleEndian.Uint32(b[40:]),
		count:  binary.LittleEndian.Uint32(b[44:]),
		mask:   binary.LittleEndian.Uint64(b[48:]),
		plen:   binary.LittleEndian.Uint32(b[56:]),
		tag:    binary.LittleEndian.Uint32(b[60:]),
	}
	if h.typ < 1 || h.typ > typeLast {
		return header{}, badFrame("unknown type %d", b[5])
	}
	if h.tag != 0 && !h.typ.state() {
		return header{}, badFrame("%v: tag %d, want 0", h.typ, h.tag)
	}
	return h, nil
}

// writeFrame writes h (its payload length set from payload) and payload
// to w in one Write. It is the only frame writer: the network path and
// Reference's byte counts both go through it.
func writeFrame(w io.Writer, h *header, payload []byte) error {
	if uint64(len(payload)) > math.MaxUint32 {
		return fmt.Errorf("reduce: payload of %d bytes", len(payload))
	}
	h.plen = uint32(len(payload))
	buf := make([]byte, headerLen+len(payload))
	h.put((*[headerLen]byte)(buf))
	copy(buf[headerLen:], payload)
	_, err := w.Write(buf)
	return err
}

// frameSize is the bytes writeFrame writes for a payload of size bytes.
func frameSize(payload int) int64 { return headerLen + int64(payload) }

// limits is what a receiver knows about a group's frames.
type limits struct {
	members   int // R
	codec     codec.Spec
	maxValues int
	align     int
	plen      int  // values per piece
	stranger  bool // the sender is not a member: refuse everything
	noRun     bool // the frame names a run this host does not hold: refuse everything
}

func newLimits(members int, c codec.Spec, maxValues int) limits {
	al := align(c)
	return limits{members: members, codec: c, maxValues: maxValues, align: al, plen: pieceLen(al)}
}

// check validates everything in h that does not depend on the group's
// round: codec, sizes, chunk and piece bounds, masks. When it returns nil
// the payload length is at most the encoding of l.plen values (or
// hashLen), so reading it allocates a bounded amount.
func (l *limits) check(h *header) error {
	if l.stranger {
		return badFrame("%v from a peer that is not a member of group %d", h.typ, h.group)
	}
	if l.noRun {
		return badFrame("%v for group %d of run %016x, which this host does not hold", h.typ, h.group, h.run)
	}
	if h.codec != l.codec {
		return badFrame("%v: codec %v, the group's is %v", h.typ, h.codec, l.codec)
	}
	if h.mask>>uint(l.members) != 0 && l.members < 64 {
		return badFrame("%v: mask %#x names members beyond %d", h.typ, h.mask, l.members)
	}
	switch h.typ {
	case typeContrib, typeResult:
		if uint64(h.n) > uint64(l.maxValues) {
			return badFrame("%v: vector of %d values exceeds MaxValues %d", h.typ, h.n, l.maxValues)
		}
		if uint64(h.index) >= uint64(l.members) {
			return badFrame("%v: chunk %d of %d", h.typ, h.index, l.members)
		}
		if err := l.checkPiece(h, chunkRange(int(h.n), l.members, l.align, int(h.index)).Len()); err != nil {
			return err
		}
		want := l.codec.MaxEncodedSize(int(h.count))
		if uint64(h.plen) > uint64(want) || (!l.codec.Zstd && int(h.plen) != want) {
			return badFrame("%v: payload of %d bytes for %d values in %v (%d)", h.typ, h.plen, h.count, l.codec, want)
		}
		if h.typ == typeContrib && h.mask != 0 {
			return badFrame("contrib: mask %#x, want 0", h.mask)
		}
		if h.typ == typeResult && h.mask == 0 {
			return badFrame("result: no contributors")
		}
		return nil
	case typeState:
		if uint64(h.n) > uint64(l.maxValues) {
			return badFrame("state: vector of %d values exceeds MaxValues %d", h.n, l.maxValues)
		}
		if h.index >= maxStateVecs {
			return badFrame("state: vector %d, at most %d", h.index, maxStateVecs)
		}
		if err := l.checkPiece(h, int(h.n)); err != nil {
			return err
		}
		if uint64(h.plen) != 4*uint64(h.count) {
			return badFrame("state: payload of %d bytes for %d values", h.plen, h.count)
		}
		return nil
	case typeStateEnd:
		if h.index > maxStateVecs || h.plen != hashLen || h.n != 0 || h.offset != 0 || h.count != 0 {
			return badFrame("state-end: %d vectors, payload %d bytes", h.index, h.plen)
		}
		return nil
	case typeStateInfo:
		if h.index > maxStateVecs || uint64(h.plen) != uint64(h.index)*infoEntry || h.n != 0 || h.offset != 0 || h.count != 0 {
			return badFrame("state-info: %d vectors, payload %d bytes", h.index, h.plen)
		}
		return nil
	case typeStatePiecesReq:
		if uint64(h.index) > l.maxPieces() || uint64(h.plen) != 8*uint64(h.index) || h.n != 0 || h.offset != 0 || h.count != 0 || h.mask != 0 {
			return badFrame("state-pieces-req: %d pieces (at most %d), payload %d bytes", h.index, l.maxPieces(), h.plen)
		}
		return nil
	case typeStatePiecesEnd:
		if uint64(h.index) > l.maxPieces() || h.plen != 0 || h.n != 0 || h.offset != 0 || h.count != 0 || h.mask != 0 {
			return badFrame("state-pieces-end: %d pieces", h.index)
		}
		return nil
	}
	if h.n != 0 || h.index != 0 || h.offset != 0 || h.count != 0 || h.plen != 0 {
		return badFrame("%v: carries data", h.typ)
	}
	if h.typ == typeDrop && h.mask == 0 {
		return badFrame("drop: nobody")
	}
	if h.typ != typeDrop && h.mask != 0 {
		return badFrame("%v: mask %#x, want 0", h.typ, h.mask)
	}
	return nil
}

// maxPieces is the most pieces a whole state can have.
func (l *limits) maxPieces() uint64 {
	return maxStateVecs * uint64(numPieces(l.maxValues, l.plen))
}

// checkPiece checks that h's offset and count are exactly one piece of a
// chunk (or vector) of size values.
func (l *limits) checkPiece(h *header, size int) error {
	off, cnt := int(h.offset), int(h.count) // both < 2^32: no overflow in int
	if off%l.plen != 0 || off > size || (off == size && size > 0) {
		return badFrame("%v: offset %d in a chunk of %d (pieces of %d)", h.typ, off, size, l.plen)
	}
	if want := pieceRange(size, l.plen, off/l.plen).Len(); cnt != want {
		return badFrame("%v: %d values at offset %d of %d, want %d", h.typ, cnt, off, size, want)
	}
	return nil
}

// frame is a received frame: the header, the payload as it came, and for
// data frames the decoded values.
type frame struct {
	hdr     header
	payload []byte
	vals    []float32
}

// wireSize is the frame's size on the wire.
func (f *frame) wireSize() int64 { return frameSize(len(f.payload)) }

// readFrame reads one frame from r. find returns the limits of the group a
// header names, or false if this host has none: such a frame's payload is
// skipped (if it is not absurdly long) and errUnknownGroup returned. A
// clean end of stream before the first byte is io.EOF. Malformed frames
// give errors wrapping ErrBadFrame; a payload is never allocated before
// its header passed limits.check. Data payloads are decoded and must hold
// finite values only.
func readFrame(r io.Reader, find func(run uint64, group uint32) (*limits, bool)) (*frame, error) {
	var b [headerLen]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		if err == io.EOF {
			return nil, io.EOF
		}
		return nil, readErr("header", err)
	}
	h, err := parseHeader(&b)
	if err != nil {
		return nil, err
	}
	l, ok := find(h.run, h.group)
	if !ok {
		if h.plen > maxDiscardSize {
			return nil, badFrame("%v for unknown group %d of run %016x with a %d-byte payload", h.typ, h.group, h.run, h.plen)
		}
		if _, err := io.CopyN(io.Discard, r, int64(h.plen)); err != nil {
			return nil, readErr("payload", err)
		}
		return nil, errUnknownGroup
	}
	if err := l.check(&h); err != nil {
		return nil, err
	}
	f := &frame{hdr: h, payload: make([]byte, h.plen)}
	if _, err := io.ReadFull(r, f.payload); err != nil {
		return nil, readErr("payload", err)
	}
	switch h.typ {
	case typeContrib, typeResult:
		f.vals = make([]float32, h.count)
		if err := l.codec.Decode(f.vals, f.payload); err != nil {
			return nil, fmt.Errorf("%w: %v: %w", ErrBadFrame, h.typ, err)
		}
	case typeState:
		f.vals = make([]float32, h.count)
		for i := range f.vals {
			f.vals[i] = math.Float32frombits(binary.LittleEndian.Uint32(f.payload[4*i:]))
		}
	default:
		return f, nil
	}
	if i := firstNonFinite(f.vals); i >= 0 {
		return nil, badFrame("%v: value %d is %v, want finite", h.typ, i, f.vals[i])
	}
	return f, nil
}

// firstNonFinite is the index of the first NaN or ±Inf in x, or -1.
func firstNonFinite(x []float32) int {
	for i, v := range x {
		if math.Float32bits(v)&0x7f800000 == 0x7f800000 {
			return i
		}
	}
	return -1
}

// readErr wraps an error met while reading part of a frame. None is a
// violation: running out of input mid-frame (io.ErrUnexpectedEOF) is a
// stream cut short, as a peer that dies mid-write leaves it; anything else
// is the transport's failure.
func readErr(part string, err error) error {
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return fmt.Errorf("reduce: read: truncated %s: %w", part, io.ErrUnexpectedEOF)
	}
	return fmt.Errorf("reduce: read %s: %w", part, err)
}

// bit is the mask of member r.
func bit(r int) uint64 { return 1 << uint(r) }

// members lists the members in mask, ascending.
func members(mask uint64) []int {
	out := make([]int, 0, bits.OnesCount64(mask))
	for mask != 0 {
		r := bits.TrailingZeros64(mask)
		out = append(out, r)
		mask &^= bit(r)
	}
	return out
}
