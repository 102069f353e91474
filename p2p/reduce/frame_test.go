package reduce

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"github.com/libp2p/go-libp2p/core/peer"
	"io"
	"math"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/codec"
)

// fuzzLimits is the group FuzzReadReduceFrame reads frames for.
var fuzzLimits = newLimits(4, codec.Spec{Kind: codec.Int8, Block: 32}, 1<<20)

func fuzzFind(run uint64, group uint32) (*limits, bool) {
	if run != 7 || group != 2 {
		return nil, false
	}
	return &fuzzLimits, true
}

func encodeFrame(t testing.TB, h header, payload []byte) []byte {
	t.Helper()
	h.run, h.group = 7, 2
	var b bytes.Buffer
	if err := writeFrame(&b, &h, payload); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// seedFrames are valid frames of every type for fuzzLimits.
func seedFrames(t testing.TB) [][]byte {
	c := fuzzLimits.codec
	n := 3*PieceValues + 100
	ch := chunkRange(n, 4, fuzzLimits.align, 1)
	vals := make([]float32, PieceValues)
	for i := range vals {
		vals[i] = float32(i%7) - 3
	}
	last := pieceRange(ch.Len(), fuzzLimits.plen, 0)
	contrib := header{typ: typeContrib, codec: c, round: 3, n: uint32(n), index: 1, count: uint32(last.Len())}
	result := contrib
	result.typ, result.mask = typeResult, 0b1011
	empty := header{typ: typeContrib, codec: c, round: 3, n: 2, index: 0}
	state := header{typ: typeState, codec: c, round: 3, n: 3, count: 3}
	var sum [hashLen]byte
	return [][]byte{
		encodeFrame(t, contrib, c.Encode(nil, vals[:last.Len()])),
		encodeFrame(t, result, c.Encode(nil, vals[:last.Len()])),
		encodeFrame(t, empty, nil),
		encodeFrame(t, state, make([]byte, 12)),
		encodeFrame(t, header{typ: typeStateEnd, codec: c, round: 3, index: 1, mask: 3}, sum[:]),
		encodeFrame(t, header{typ: typeDrop, codec: c, round: 3, mask: 4}, nil),
		encodeFrame(t, header{typ: typeBehind, codec: c, round: 3}, nil),
		encodeFrame(t, header{typ: typeJoin, codec: c, round: 9}, nil),
		{},
		[]byte(frameMagic),
	}
}

// Whatever the input, readFrame returns io.EOF, an error wrapping
// ErrBadFrame, a truncation, errUnknownGroup, or a frame whose payload and values are
// within what the group's limits allow; it never panics.
func FuzzReadReduceFrame(f *testing.F) {
	for _, s := range seedFrames(f) {
		f.Add(s)
	}
	maxPayload := fuzzLimits.codec.MaxEncodedSize(fuzzLimits.plen)
	f.Fuzz(func(t *testing.T, in []byte) {
		fr, err := readFrame(bytes.NewReader(in), fuzzFind)
		if err != nil {
			if err != io.EOF && !errors.Is(err, ErrBadFrame) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, errUnknownGroup) {
				t.Fatalf("error neither io.EOF, ErrBadFrame, a truncation nor errUnknownGroup: %v", err)
			}
			return
		}
		if cap(fr.payload) > max(maxPayload, 4*fuzzLimits.plen) || len(fr.vals) > fuzzLimits.plen {
			t.Fatalf("frame of %d payload bytes and %d values exceeds the limits", cap(fr.payload), len(fr.vals))
		}
		if i := firstNonFinite(fr.vals); i >= 0 {
			t.Fatalf("accepted non-finite value %v", fr.vals[i])
		}
		var again bytes.Buffer
		if err := writeFrame(&again, &fr.hdr, fr.payload); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(again.Bytes(), in[:again.Len()]) {
			t.Fatal("re-encoding an accepted frame differs from the input")
		}
	})
}

// Every seed frame is accepted as written.
func TestSeedFramesRoundTrip(t *testing.T) {
	for i, s := range seedFrames(t)[:8] {
		if _, err := readFrame(bytes.NewReader(s), fuzzFind); err != nil {
			t.Errorf("seed %d: %v", i, err)
		}
	}
}

// countReader counts bytes read through it.
type countReader struct {
	r io.Reader
	n int
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// A header claiming more than the group allows is refused after its 64
// bytes, before any payload is read or allocated; so are frames that
// break each rule the header is checked against.
func TestBadHeadersRefusedBeforePayload(t *testing.T) {
	c := fuzzLimits.codec
	ok := header{typ: typeContrib, codec: c, round: 1, n: 1000, index: 1, count: 250}
	size := uint32(c.MaxEncodedSize(250))
	cases := map[string]func(h *header){
		"huge payload":       func(h *header) { h.plen = math.MaxUint32 },
		"vector too long":    func(h *header) { h.n = 1<<20 + 1 },
		"chunk out of range": func(h *header) { h.index = 4 },
		"piece too long":     func(h *header) { h.count = 251 },
		"offset off piece":   func(h *header) { h.offset = 1 },
		"other codec":        func(h *header) { h.codec = codec.Spec{Kind: codec.F32} },
		"contrib with mask":  func(h *header) { h.mask = 1 },
		"mask beyond R":      func(h *header) { h.typ, h.mask = typeResult, 1<<4 },
		"state too long":     func(h *header) { h.typ, h.index, h.count, h.n = typeState, 0, 1<<20, 1<<21 },
		"control with data":  func(h *header) { h.typ = typeJoin },
		"unknown type":       func(h *header) { h.typ = 99 },
	}
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			h := ok
			h.run, h.group, h.plen = 7, 2, size
			mutate(&h)
			var b [headerLen]byte
			h.put(&b)
			r := &countReader{r: io.MultiReader(bytes.NewReader(b[:]), bytes.NewReader(make([]byte, 1<<20)))}
			_, err := readFrame(r, fuzzFind)
			if !errors.Is(err, ErrBadFrame) {
				t.Fatalf("got %v, want ErrBadFrame", err)
			}
			if r.n != headerLen {
				t.Errorf("read %d bytes before refusing, want the %d-byte header only", r.n, headerLen)
			}
		})
	}
	var b [headerLen]byte
	h := ok
	h.run, h.group, h.plen = 7, 2, size
	h.put(&b)
	binary.LittleEndian.PutUint32(b[60:], 1)
	if _, err := readFrame(bytes.NewReader(b[:]), fuzzFind); !errors.Is(err, ErrBadFrame) {
		t.Errorf("reserved bytes set: %v", err)
	}
}

// A frame cut short is a stream that broke, as a member that dies mid-write
// leaves it: an error, but no violation; a malformed one is a violation.
func TestATruncatedFrameIsNoViolation(t *testing.T) {
	for i, s := range seedFrames(t)[:8] {
		_, err := readFrame(bytes.NewReader(s[:len(s)-1]), fuzzFind)
		if !errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, ErrBadFrame) || errors.Is(err, p2p.ErrViolation) {
			t.Errorf("seed %d cut short: %v, want a truncation that is no violation", i, err)
		}
	}
	bad := seedFrames(t)[0]
	bad[0] = 'X'
	if _, err := readFrame(bytes.NewReader(bad), fuzzFind); !errors.Is(err, p2p.ErrViolation) {
		t.Errorf("bad magic: %v, want a violation", err)
	}
}

// Decoded values must be finite: a bf16 payload holding +Inf is refused.
func TestNonFiniteValuesRefused(t *testing.T) {
	l := newLimits(2, codec.Spec{Kind: codec.BF16}, 100)
	find := func(uint64, uint32) (*limits, bool) { return &l, true }
	h := header{typ: typeContrib, codec: l.codec, round: 1, n: 4, index: 0, count: 2}
	payload := l.codec.Encode(nil, []float32{1, float32(math.Inf(1))})
	var b bytes.Buffer
	writeFrame(&b, &h, payload)
	if _, err := readFrame(&b, find); !errors.Is(err, ErrBadFrame) {
		t.Fatalf("got %v, want ErrBadFrame", err)
	}
}

// A bad frame on the wire resets the stream and penalises its sender;
// the receiving member keeps working.
func TestBadFramePenalises(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := spec(t, "fp32")
	cl := newCluster(t, 2, c, nil)
	bad := encodeFrame(t, header{typ: typeContrib, codec: c, round: 1, n: 4, index: 0, count: 2}, make([]byte, 8))
	bad[40] = 1 // offset 1: not a piece boundary
	st, err := cl.hosts[1].NewStream(ctx, cl.hosts[0].ID(), Proto)
	if err != nil {
		t.Fatal(err)
	}
	st.Write(bad)
	if _, err := st.Read(make([]byte, 1)); err == nil {
		t.Fatal("stream still open after a bad frame")
	}
	if cl.penalties.Load() != 1 {
		t.Fatalf("%d penalties, want 1", cl.penalties.Load())
	}
}

// Chunks covers [0, n) in order, every chunk but the last a whole number
// of blocks, as evenly as blocks allow.
func TestChunksAlignedAndCovering(t *testing.T) {
	for _, n := range []int{0, 1, 31, 32, 33, 1000, 65536*3 + 7} {
		for parts := 1; parts <= 9; parts++ {
			for _, al := range []int{1, 8, 32, 100} {
				cs := Chunks(n, parts, al)
				at := 0
				blocks := (n + al - 1) / al
				for i, c := range cs {
					if c.Lo != at || c.Hi < c.Lo {
						t.Fatalf("Chunks(%d,%d,%d)[%d] = %v, want to start at %d", n, parts, al, i, c, at)
					}
					if i < parts-1 && c.Len()%al != 0 {
						t.Fatalf("Chunks(%d,%d,%d)[%d] = %v: not whole blocks", n, parts, al, i, c)
					}
					if nb := (c.Len() + al - 1) / al; nb > blocks/parts+1 {
						t.Fatalf("Chunks(%d,%d,%d)[%d] = %v: %d blocks of %d", n, parts, al, i, c, nb, blocks)
					}
					at = c.Hi
				}
				if at != n {
					t.Fatalf("Chunks(%d,%d,%d) ends at %d", n, parts, al, at)
				}
			}
		}
	}
}

// Own, what this member sends, is within the codec's rounding of y:
// exact for fp32, half a bf16 step, or half an int8 block's scale.
func TestOwnWithinCodecBound(t *testing.T) {
	ys := randVecs(3, 5000, 1)
	for _, cs := range []string{"fp32", "bf16", "int8/32", "int8/64+zstd"} {
		c := spec(t, cs)
		_, own, _ := Reference(c, ys)
		for r, y := range ys {
			for i, v := range y {
				var bound float64
				switch c.Kind {
				case codec.BF16:
					bound = math.Abs(float64(v)) / 256
				case codec.Int8:
					lo := i / c.Block * c.Block
					var m float64
					for _, x := range y[lo:min(lo+c.Block, len(y))] {
						m = math.Max(m, math.Abs(float64(x)))
					}
					bound = m/127/2*(1+1e-6) + 1e-30
				}
				if d := math.Abs(float64(own[r][i]) - float64(v)); d > bound {
					t.Fatalf("%s: own[%d][%d] = %v, y = %v: error %g over bound %g", cs, r, i, own[r][i], v, d, bound)
				}
			}
		}
	}
}

// Validate names the field at fault.
func TestValidateRefusesBadConfig(t *testing.T) {
	good := GroupConfig{Peers: []peer.ID{"a", "b"}, Codec: codec.Spec{Kind: codec.F32}, MaxValues: 10}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, mutate := range map[string]func(*GroupConfig){
		"Peers":     func(c *GroupConfig) { c.Peers = nil },
		"duplicate": func(c *GroupConfig) { c.Peers = []peer.ID{"a", "a"} },
		"Self":      func(c *GroupConfig) { c.Self = 2 },
		"Codec":     func(c *GroupConfig) { c.Codec = codec.Spec{} },
		"MaxValues": func(c *GroupConfig) { c.MaxValues = 0 },
		"Margin":    func(c *GroupConfig) { c.Margin = 0.5 },
		"PriorRate": func(c *GroupConfig) { c.PriorRate = -1 },
		"Slack":     func(c *GroupConfig) { c.Slack = -1 },
	} {
		c := good
		mutate(&c)
		if err := c.Validate(); !errors.Is(err, ErrBadConfig) {
			t.Errorf("%s: %v, want ErrBadConfig", name, err)
		}
	}
}
