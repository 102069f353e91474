package p2p

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/pipeswarm/pipeswarm/p2p/codec"
)

// spec parses a codec the tests know to be valid.
func spec(s string) codec.Spec {
	c, err := codec.Parse(s)
	if err != nil {
		panic(err)
	}
	return c
}

var (
	// allCodecs is every kind of codec, with and without zstd.
	allCodecs = []codec.Spec{spec("fp32"), spec("bf16"), spec("int8/32"), spec("int8/64"), spec("int8/8"),
		spec("int4/32"), spec("int4/8"), spec("int4/10"),
		spec("fp32+zstd"), spec("bf16+zstd"), spec("int8/32+zstd"), spec("int8/64+zstd"), spec("int4/32+zstd"), spec("int4/64+zstd")}
	lossyCodecs = []codec.Spec{spec("bf16"), spec("int8/32"), spec("int8/64+zstd"), spec("bf16+zstd"), spec("int4/32"), spec("int4/64+zstd")}
)

// gaussian returns n values drawn from N(0, sigma²) with a fixed seed.
func gaussian(seed uint64, n int, sigma float64) []float32 {
	r := rand.New(rand.NewPCG(seed, 0x5eed))
	x := make([]float32, n)
	for i := range x {
		x[i] = float32(r.NormFloat64() * sigma)
	}
	return x
}

// checkDecoded checks that got, decoded from x with c, is within c's error
// bound: exact for fp32, 2^-8 relative for bf16, max|block|/254 for int8,
// max|block|/14 for int4.
// (p2p/codec tests the codecs; this checks that frames use them.)
func checkDecoded(t *testing.T, c codec.Spec, x, got []float32) {
	t.Helper()
	for lo := 0; lo < len(x); lo += max(c.Block, 1) {
		hi := min(lo+max(c.Block, 1), len(x))
		var m float64
		for _, v := range x[lo:hi] {
			m = max(m, math.Abs(float64(v)))
		}
		for i := lo; i < hi; i++ {
			err := math.Abs(float64(got[i]) - float64(x[i]))
			switch {
			case c.Kind == codec.F32 && math.Float32bits(got[i]) != math.Float32bits(x[i]),
				c.Kind == codec.BF16 && err > math.Abs(float64(x[i]))/256,
				c.Kind == codec.Int8 && err > m/254*(1+2e-5)+127*0x1p-149,
				c.Kind == codec.Int4 && err > m/14*(1+2e-5)+7*0x1p-149:
				t.Fatalf("%v value %d: got %v for %v", c, i, got[i], x[i])
			}
		}
	}
}

// testFrame is a small valid activation frame with tokens and targets.
func testFrame() *Frame {
	const b, t, d = 2, 3, 4
	f := &Frame{Kind: KindActivation, Run: 0xfeed, Step: 7, Micro: 3, Shape: []uint32{b, t, d}, Codec: CodecF32,
		Tokens: make([]int32, b*t), Targets: make([]int32, b*t), Data: make([]float32, b*t*d)}
	for i := range f.Tokens {
		f.Tokens[i] = int32(i)
		f.Targets[i] = int32(i + 1)
	}
	for i := range f.Data {
		f.Data[i] = float32(i)*0.25 - 1
	}
	return f
}

func testExpect() Expect {
	return Expect{Run: 0xfeed, Kind: KindActivation, Shape: []uint32{2, 3, 4}, Tokens: true, Vocab: 16, Codec: CodecF32}
}

func encode(t testing.TB, f *Frame) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := WriteFrame(&buf, f); err != nil {
		t.Fatalf("WriteFrame: %v", err)
	}
	return buf.Bytes()
}

// framesEqual compares frames bit for bit, so NaN payloads compare equal to themselves.
func framesEqual(a, b *Frame) bool {
	return a.Kind == b.Kind && a.Run == b.Run && a.Step == b.Step && a.Micro == b.Micro && a.Codec == b.Codec &&
		slices.Equal(a.Shape, b.Shape) && slices.Equal(a.Tokens, b.Tokens) && slices.Equal(a.Targets, b.Targets) &&
		slices.EqualFunc(a.Data, b.Data, func(x, y float32) bool { return math.Float32bits(x) == math.Float32bits(y) })
}

func TestFrameRoundTripsThroughWriteAndRead(t *testing.T) {
	for name, f := range map[string]*Frame{
		"activation with tokens": testFrame(),
		"gradient rank 1":        {Kind: KindGradient, Run: 1, Shape: []uint32{5}, Codec: CodecF32, Data: []float32{1, -2, 3, math.MaxFloat32, -0}},
		"eval rank 4":            {Kind: KindEval, Run: math.MaxUint64, Step: math.MaxUint32, Micro: 9, Shape: []uint32{1, 2, 1, 2}, Codec: CodecF32, Data: []float32{1, 2, 3, 4}},
	} {
		t.Run(name, func(t *testing.T) {
			b := encode(t, f)
			if want := frameHeaderLen + len(f.Tokens) + len(f.Targets) + 4*len(f.Data); len(b) != want {
				t.Fatalf("encoded %d bytes, want %d", len(b), want)
			}
			got, err := ReadFrame(bytes.NewReader(b), 0)
			if err != nil {
				t.Fatalf("ReadFrame: %v", err)
			}
			if !framesEqual(got, f) {
				t.Fatalf("round trip changed the frame:\n got %+v\nwant %+v", got, f)
			}
		})
	}
}

// Frames byte for byte: the int8 layout frames have always had, and int4's
// beside it, in the same version-2 header with the block size at byte 54.
func TestFrameBytesOfBlockCodecs(t *testing.T) {
	header := func(codecKind, payload byte) []byte {
		return []byte{
			'P', 'S', 'W', 'F', 2, byte(KindActivation), codecKind, 1,
			8, 7, 6, 5, 4, 3, 2, 1, // run
			7, 0, 0, 0, // step
			3, 0, 0, 0, // micro
			9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // shape [9]
			0, 0, 0, 0, // tokens
			0, 0, 0, 0, // targets
			payload, 0, 0, 0, // payload length
			0,    // codec flags
			1,    // id width
			8, 0, // block size
		}
	}
	scales := []byte{0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0x40} // 1, 2
	for _, c := range []struct {
		codec   string
		data    []float32 // decoded exactly as sent
		wire    []byte
		decoded []float32
	}{
		{"int8/8", []float32{127, -127, 1, 0, 0, 0, 0, 0, 254},
			slices.Concat(header(3, 17), scales, []byte{0x7f, 0x81, 0x01, 0, 0, 0, 0, 0, 0x7f}), nil},
		{"int4/8", []float32{7, -7, 1, 0, 0, 0, 0, 0, 14},
			slices.Concat(header(4, 13), scales, []byte{0x97, 0x01, 0x00, 0x00, 0x07}), nil},
		{"int4/8", []float32{7, -7, 1, 0.4, 0, 0, 0, 0, 7}, // scale 1 rounds 0.4 to 0; scale 1 again for the last block
			slices.Concat(header(4, 13), scales[:4], scales[:4], []byte{0x97, 0x01, 0x00, 0x00, 0x07}),
			[]float32{7, -7, 1, 0, 0, 0, 0, 0, 7}},
	} {
		t.Run(c.codec, func(t *testing.T) {
			f := &Frame{Kind: KindActivation, Run: 0x0102030405060708, Step: 7, Micro: 3, Shape: []uint32{9}, Codec: spec(c.codec), Data: c.data}
			if b := encode(t, f); !bytes.Equal(b, c.wire) {
				t.Fatalf("WriteFrame = % x\nwant         % x", b, c.wire)
			}
			got, err := ReadFrame(bytes.NewReader(c.wire), 0)
			if err != nil {
				t.Fatal(err)
			}
			want := *f
			if c.decoded != nil {
				want.Data = c.decoded
			}
			if !framesEqual(got, &want) {
				t.Fatalf("ReadFrame = %+v\nwant %+v", got, &want)
			}
		})
	}
}

func TestFrameRoundTripsWithEveryCodecAndIDWidth(t *testing.T) {
	data := gaussian(12, 2*3*40, 1)
	data[7] = 0
	for _, c := range allCodecs {
		for _, ids := range []struct {
			max   int32 // the largest id, or a negative one
			width int
		}{{0, 1}, {255, 1}, {256, 2}, {65535, 2}, {65536, 4}, {50257 * 4, 4}, {-1, 4}, {math.MaxInt32, 4}} {
			t.Run(fmt.Sprintf("%v/ids to %d", c, ids.max), func(t *testing.T) {
				f := &Frame{Kind: KindActivation, Run: 5, Step: 1, Micro: 2, Shape: []uint32{2, 3, 40}, Codec: c,
					Tokens: []int32{0, 1, 2, 3, 4, ids.max}, Targets: []int32{ids.max, 9, 8, 7, 6, 5}, Data: slices.Clone(data)}
				b := encode(t, f)
				payload := c.Encode(nil, data)
				if want := frameHeaderLen + ids.width*12 + len(payload); len(b) != want {
					t.Fatalf("encoded %d bytes, want %d (ids of %d bytes, payload %d)", len(b), want, ids.width, len(payload))
				}
				if b[53] != byte(ids.width) {
					t.Fatalf("id width %d, want %d", b[53], ids.width)
				}
				got, err := ReadFrame(bytes.NewReader(b), 0)
				if err != nil {
					t.Fatal(err)
				}
				want := *f
				want.Data = make([]float32, len(data))
				if err := c.Decode(want.Data, payload); err != nil {
					t.Fatal(err)
				}
				if !framesEqual(got, &want) {
					t.Fatalf("round trip changed the frame:\n got %+v\nwant %+v", got, &want)
				}
				checkDecoded(t, c, data, got.Data)
				if !slices.Equal(f.Data, data) {
					t.Fatal("WriteFrame changed f.Data")
				}
				e := Expect{Run: 5, Kind: KindActivation, Shape: f.Shape, Tokens: true, Codec: c}
				if ids.max >= 0 {
					if err := got.Check(e); err != nil {
						t.Fatalf("Check: %v", err)
					}
				}
				if _, err := ReadFrame(bytes.NewReader(b), e.MaxBytes()); err != nil {
					t.Fatalf("refused at Expect.MaxBytes %d: %v", e.MaxBytes(), err)
				}
			})
		}
	}
}

// A receiver refuses a codec it was not told to expect, however close.
func TestCheckRefusesACodecItWasNotToldToExpect(t *testing.T) {
	for _, sent := range allCodecs {
		f := testFrame()
		f.Codec = sent
		got, err := ReadFrame(bytes.NewReader(encode(t, f)), 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, expected := range allCodecs {
			e := testExpect()
			e.Codec = expected
			err := got.Check(e)
			if sent == expected && err != nil {
				t.Errorf("sent %v, expected %v: %v", sent, expected, err)
			}
			if sent != expected && (!errors.Is(err, ErrBadFrame) || !strings.Contains(err.Error(), fmt.Sprintf("codec: got %v, want %v", sent, expected))) {
				t.Errorf("sent %v, expected %v: Check gave %v", sent, expected, err)
			}
		}
	}
}

func TestReadFrameReadsConsecutiveFramesThenPlainEOF(t *testing.T) {
	var buf bytes.Buffer
	for step := range uint32(3) {
		f := testFrame()
		f.Step = step
		if err := WriteFrame(&buf, f); err != nil {
			t.Fatal(err)
		}
	}
	for step := range uint32(3) {
		f, err := ReadFrame(&buf, 0)
		if err != nil {
			t.Fatalf("frame %d: %v", step, err)
		}
		if f.Step != step {
			t.Fatalf("frame %d has step %d", step, f.Step)
		}
	}
	if _, err := ReadFrame(&buf, 0); err != io.EOF {
		t.Fatalf("at end of stream got %v, want io.EOF itself", err)
	}
}

type countingWriter struct {
	writes int
	bytes.Buffer
}

func (w *countingWriter) Write(p []byte) (int, error) { w.writes++; return w.Buffer.Write(p) }

func TestWriteFrameUsesOneWriteForSmallFramesAndChunksLargeOnes(t *testing.T) {
	var small countingWriter
	if err := WriteFrame(&small, testFrame()); err != nil {
		t.Fatal(err)
	}
	if small.writes != 1 {
		t.Errorf("small frame took %d writes, want 1", small.writes)
	}
	big := &Frame{Kind: KindGradient, Shape: []uint32{16, 128, 128}, Codec: CodecF32, Data: make([]float32, 16*128*128)}
	var large countingWriter
	if err := WriteFrame(&large, big); err != nil {
		t.Fatal(err)
	}
	if want := (large.Len() + chunkLen - 1) / chunkLen; large.writes != want {
		t.Errorf("1 MiB frame took %d writes, want %d chunks", large.writes, want)
	}
	got, err := ReadFrame(&large.Buffer, 0)
	if err != nil || !framesEqual(got, big) {
		t.Fatalf("large frame did not round trip: %v", err)
	}
}

func TestWriteFrameRefusesFramesReadFrameWouldRefuse(t *testing.T) {
	for _, c := range []struct {
		name   string
		mutate func(*Frame)
		want   string
	}{
		{"unknown kind", func(f *Frame) { f.Kind = 0 }, "unknown kind 0"},
		{"zero codec", func(f *Frame) { f.Codec = codec.Spec{} }, "write: codec: unknown kind 0"},
		{"unknown codec", func(f *Frame) { f.Codec = codec.Spec{Kind: 9} }, "write: codec: unknown kind 9"},
		{"int8 without a block size", func(f *Frame) { f.Codec = codec.Spec{Kind: codec.Int8} }, "codec int8/0: block size 0 outside [8, 4096]"},
		{"bf16 with a block size", func(f *Frame) { f.Codec = codec.Spec{Kind: codec.BF16, Block: 32, Zstd: true} }, "bf16 takes no block size"},
		{"NaN in int8", func(f *Frame) { f.Codec = spec("int8"); f.Data[3] = float32(math.NaN()) }, "data[3] is NaN, and int8/32 carries finite values only"},
		{"Inf in int8+zstd", func(f *Frame) { f.Codec = spec("int8/64+zstd"); f.Data[0] = float32(math.Inf(-1)) }, "data[0] is -Inf"},
		{"int4 with an odd block size", func(f *Frame) { f.Codec = codec.Spec{Kind: codec.Int4, Block: 9} }, "codec int4/9: block size 9 is odd"},
		{"NaN in int4", func(f *Frame) { f.Codec = spec("int4"); f.Data[5] = float32(math.NaN()) }, "data[5] is NaN, and int4/32 carries finite values only"},
		{"Inf in int4+zstd", func(f *Frame) { f.Codec = spec("int4/8+zstd"); f.Data[23] = float32(math.Inf(1)) }, "data[23] is +Inf"},
		{"rank 0", func(f *Frame) { f.Shape = nil }, "rank 0"},
		{"rank 5", func(f *Frame) { f.Shape = []uint32{1, 1, 1, 1, 24} }, "rank 5"},
		{"zero dim", func(f *Frame) { f.Shape = []uint32{2, 0, 4} }, "dim 1 is zero"},
		{"short data", func(f *Frame) { f.Data = f.Data[1:] }, "data has 23 values, shape [2 3 4] needs 24"},
		{"over MaxFrameBytes", func(f *Frame) { f.Shape = []uint32{MaxFrameBytes / 4} }, "exceeds MaxFrameBytes"},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := testFrame()
			c.mutate(f)
			var buf bytes.Buffer
			err := WriteFrame(&buf, f)
			if !errors.Is(err, ErrBadFrame) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want ErrBadFrame saying %q", err, c.want)
			}
			if buf.Len() != 0 {
				t.Fatalf("wrote %d bytes of a refused frame", buf.Len())
			}
		})
	}
}

// header returns a valid encoded header for an fp32 frame with the given
// shape and no tokens, to be edited by a test.
func header(shape ...uint32) []byte {
	h := make([]byte, frameHeaderLen)
	copy(h, frameMagic)
	h[4], h[5], h[6], h[7] = frameVersion, byte(KindActivation), byte(codec.F32), byte(len(shape))
	n := uint64(1)
	for i, d := range shape {
		binary.LittleEndian.PutUint32(h[24+4*i:], d)
		n *= uint64(d)
	}
	binary.LittleEndian.PutUint32(h[48:], uint32(4*n))
	h[53] = 1 // id width
	return h
}

// zstdHeader is header for an int8/32+zstd frame whose payload claims the given length.
func zstdHeader(payload uint32, shape ...uint32) []byte {
	h := header(shape...)
	h[6], h[52] = byte(codec.Int8), flagZstd
	binary.LittleEndian.PutUint16(h[54:], 32)
	binary.LittleEndian.PutUint32(h[48:], payload)
	return h
}

func TestReadFrameRejectsMalformedInput(t *testing.T) {
	valid := encode(t, testFrame())
	edit := func(f func(b []byte)) []byte {
		b := slices.Clone(valid)
		f(b)
		return b
	}
	put32 := func(off int, v uint32) []byte {
		return edit(func(b []byte) { binary.LittleEndian.PutUint32(b[off:], v) })
	}
	put16 := func(off int, v uint16) []byte {
		return edit(func(b []byte) { binary.LittleEndian.PutUint16(b[off:], v) })
	}
	// A frame whose ids need 2 bytes, then edited so that they all fit in 1.
	wide := testFrame()
	wide.Tokens[0] = 300
	overwide := encode(t, wide)
	overwide[frameHeaderLen+1] = 0
	zf := testFrame()
	zf.Codec = spec("int8/8+zstd")
	zvalid := encode(t, zf)
	i4 := testFrame()
	i4.Codec = spec("int4/8")
	i4valid := encode(t, i4) // 24 values: 3 scales, then 12 bytes
	for _, c := range []struct {
		name     string
		in       []byte
		maxBytes int
		want     string // in the error message
		trunc    bool   // must also wrap io.ErrUnexpectedEOF
	}{
		{name: "wrong magic", in: edit(func(b []byte) { b[0] = 'X' }), want: "magic"},
		{name: "version 1", in: edit(func(b []byte) { b[4] = 1 }), want: "version 1, want 2"},
		{name: "version 3", in: edit(func(b []byte) { b[4] = 3 }), want: "version 3, want 2"},
		{name: "kind 0", in: edit(func(b []byte) { b[5] = 0 }), want: "unknown kind 0"},
		{name: "kind 4", in: edit(func(b []byte) { b[5] = 4 }), want: "unknown kind 4"},
		{name: "codec kind 0", in: edit(func(b []byte) { b[6] = 0 }), want: "codec: unknown kind 0"},
		{name: "codec kind 7", in: edit(func(b []byte) { b[6] = 7 }), want: "codec: unknown kind 7"},
		{name: "unknown codec flag", in: edit(func(b []byte) { b[52] = 2 }), want: "unknown codec flags 0x02"},
		{name: "block size for fp32", in: put16(54, 32), want: "codec fp32/32: fp32 takes no block size, got 32"},
		{name: "int8 block size 0", in: edit(func(b []byte) { b[6] = byte(codec.Int8) }), want: "codec int8/0: block size 0 outside"},
		{name: "int8 block size 7", in: edit(func(b []byte) { b[6] = byte(codec.Int8); b[54] = 7 }), want: "codec int8/7: block size 7 outside"},
		{name: "int4 block size 0", in: edit(func(b []byte) { b[6] = byte(codec.Int4) }), want: "codec int4/0: block size 0 outside"},
		{name: "int4 block size 6", in: edit(func(b []byte) { b[6] = byte(codec.Int4); b[54] = 6 }), want: "codec int4/6: block size 6 outside [8, 4096]"},
		{name: "int4 odd block size", in: edit(func(b []byte) { b[6] = byte(codec.Int4); b[54] = 33 }), want: "codec int4/33: block size 33 is odd"},
		{name: "int4 payload length of int8", in: func() []byte {
			b := slices.Clone(i4valid)
			b[6] = byte(codec.Int8)
			return b
		}(), want: "payload length 24, shape [2 3 4] in int8/8 needs 36"},
		{name: "int4 value -8", in: func() []byte {
			b := slices.Clone(i4valid)
			b[len(b)-1] = 0x80
			return b
		}(), want: "int4 value 23 is -8"},
		{name: "id width 0", in: edit(func(b []byte) { b[53] = 0 }), want: "id width 0, want 1, 2 or 4"},
		{name: "id width 3", in: edit(func(b []byte) { b[53] = 3 }), want: "id width 3, want 1, 2 or 4"},
		{name: "id width wider than the ids need", in: overwide, want: "id width 2, but the ids need 1"},
		{name: "rank 0", in: edit(func(b []byte) { b[7] = 0 }), want: "rank 0"},
		{name: "rank 5", in: edit(func(b []byte) { b[7] = 5 }), want: "rank 5"},
		{name: "zero dim", in: put32(28, 0), want: "dim 1 is zero"},
		{name: "dim beyond rank", in: put32(36, 1), want: "dim 3 is 1, want 0"},
		{name: "shape product overflows", in: func() []byte {
			h := header(math.MaxUint32, math.MaxUint32, math.MaxUint32, 2)
			return h
		}(), want: "overflows"},
		{name: "shape over maxBytes", in: header(1024, 1024, 1024), want: "exceed limit"},
		{name: "shape over caller limit", in: valid, maxBytes: 64, want: "exceed"},
		{name: "token count over maxBytes", in: put32(40, math.MaxUint32), want: "token count 4294967295"},
		{name: "target count over maxBytes", in: put32(44, math.MaxUint32), want: "target count 4294967295"},
		{name: "payload length mismatch", in: put32(48, 4*24+4), want: "payload length 100, shape [2 3 4] in fp32 needs 96"},
		{name: "payload length huge", in: put32(48, math.MaxUint32), want: "payload length"},
		{name: "zstd payload over its bound", in: zstdHeader(92, 24), want: "payload length 92, shape [24] in int8/32+zstd needs at most 91"},
		{name: "zstd payload that is not zstd", in: edit(func(b []byte) { b[52] = flagZstd }), want: "zstd header"},
		{name: "corrupt zstd payload", in: func() []byte { b := slices.Clone(zvalid); b[frameHeaderLen+12+5]++; return b }(), want: "zstd: frame declares 37 bytes, want 36"},
		{name: "truncated magic", in: valid[:3], want: "truncated header", trunc: true},
		{name: "truncated header", in: valid[:frameHeaderLen-1], want: "truncated header", trunc: true},
		{name: "truncated tokens", in: valid[:frameHeaderLen+5], want: "truncated tokens", trunc: true},
		{name: "truncated targets", in: valid[:frameHeaderLen+6+1], want: "truncated targets", trunc: true},
		{name: "truncated payload", in: valid[:len(valid)-1], want: "truncated payload", trunc: true},
		{name: "truncated zstd payload", in: zvalid[:len(zvalid)-1], want: "truncated payload", trunc: true},
	} {
		t.Run(c.name, func(t *testing.T) {
			f, err := ReadFrame(bytes.NewReader(c.in), c.maxBytes)
			if err == nil {
				t.Fatalf("got frame %v, want an error", f)
			}
			// Malformed input is the sender's violation; input cut short is a
			// stream that broke, and no violation.
			if !c.trunc && (!errors.Is(err, ErrBadFrame) || !errors.Is(err, ErrViolation)) {
				t.Fatalf("error %v; want ErrBadFrame, a violation", err)
			}
			if c.trunc && (errors.Is(err, ErrBadFrame) || errors.Is(err, ErrViolation)) {
				t.Fatalf("error %v for a truncated frame; want no violation", err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not mention %q", err, c.want)
			}
			if c.trunc != errors.Is(err, io.ErrUnexpectedEOF) {
				t.Errorf("errors.Is(err, io.ErrUnexpectedEOF) = %v, want %v", !c.trunc, c.trunc)
			}
		})
	}
}

func TestReadFrameReportsTransportErrorsWithoutBlamingThePeer(t *testing.T) {
	boom := errors.New("stream reset")
	r := io.MultiReader(bytes.NewReader(encode(t, testFrame())[:70]), errReader{boom})
	_, err := ReadFrame(r, 0)
	if !errors.Is(err, boom) || errors.Is(err, ErrBadFrame) || errors.Is(err, ErrViolation) {
		t.Fatalf("got %v, want the transport error without ErrBadFrame or ErrViolation", err)
	}
}

type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }

func TestReadFrameDoesNotAllocateWhatAHeaderMerelyClaims(t *testing.T) {
	// A header claiming a 200 MB tensor (within MaxFrameBytes) and nothing
	// after it, whole or cut to 20 bytes; and one claiming a 50 MB zstd
	// payload for it that does not come.
	claim := header(50_000_000)
	for _, in := range [][]byte{claim, claim[:20], zstdHeader(50_000_000, 50_000_000)} {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		_, err := ReadFrame(bytes.NewReader(in), 0)
		runtime.ReadMemStats(&after)
		if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("%d-byte input: got %v, want a truncation", len(in), err)
		}
		if got := after.TotalAlloc - before.TotalAlloc; got > 2*eagerValues*4 {
			t.Fatalf("allocated %d bytes for a %d-byte input", got, len(in))
		}
	}
}

func TestReadFrameGrowsLargeBuffersAsDataArrives(t *testing.T) {
	n := 3*eagerValues + 5 // forces two doublings and a final exact size
	f := &Frame{Kind: KindEval, Shape: []uint32{uint32(n)}, Codec: CodecF32, Data: make([]float32, n)}
	for i := range f.Data {
		f.Data[i] = float32(i)
	}
	got, err := ReadFrame(bytes.NewReader(encode(t, f)), 0)
	if err != nil {
		t.Fatal(err)
	}
	if !framesEqual(got, f) || cap(got.Data) != n {
		t.Fatalf("large frame did not round trip exactly (len %d cap %d)", len(got.Data), cap(got.Data))
	}
}

func TestExpectMaxBytesAdmitsExactlyTheExpectedFrame(t *testing.T) {
	e := testExpect()
	b := encode(t, testFrame())
	if e.MaxBytes() != len(b) {
		t.Fatalf("MaxBytes %d, encoded frame %d", e.MaxBytes(), len(b))
	}
	if _, err := ReadFrame(bytes.NewReader(b), e.MaxBytes()); err != nil {
		t.Fatalf("expected frame refused: %v", err)
	}
	if _, err := ReadFrame(bytes.NewReader(b), e.MaxBytes()-1); !errors.Is(err, ErrBadFrame) {
		t.Fatalf("frame over the limit accepted: %v", err)
	}
	if got := (Expect{}).MaxBytes(); got != MaxFrameBytes {
		t.Fatalf("MaxBytes without a shape = %d, want MaxFrameBytes", got)
	}
}

func TestCheckAcceptsTheExpectedFrame(t *testing.T) {
	if err := testFrame().Check(testExpect()); err != nil {
		t.Fatal(err)
	}
	e := testExpect()
	e.Shape = nil
	if err := testFrame().Check(e); err != nil {
		t.Fatalf("nil Shape should accept any shape: %v", err)
	}
	g := &Frame{Kind: KindGradient, Run: 1, Shape: []uint32{2, 2}, Codec: CodecF32, Data: []float32{1, 2, 3, 4}}
	if err := g.Check(Expect{Run: 1, Kind: KindGradient, Shape: []uint32{2, 2}, Codec: CodecF32}); err != nil {
		t.Fatalf("gradient without tokens: %v", err)
	}
}

func TestCheckRejectsFramesThatAreNotWhatTheReceiverExpects(t *testing.T) {
	for _, c := range []struct {
		name   string
		frame  func(*Frame)
		expect func(*Expect)
		want   string
	}{
		{name: "run", frame: func(f *Frame) { f.Run = 1 }, want: "run: got 0000000000000001, want 000000000000feed"},
		{name: "kind", frame: func(f *Frame) { f.Kind = KindGradient }, want: "kind: got gradient, want activation"},
		{name: "codec", expect: func(e *Expect) { e.Codec = spec("bf16") }, want: "codec: got fp32, want bf16"},
		{name: "codec without zstd", expect: func(e *Expect) { e.Codec = spec("fp32+zstd") }, want: "codec: got fp32, want fp32+zstd"},
		{name: "int8 block size", frame: func(f *Frame) { f.Codec = spec("int8/32") }, expect: func(e *Expect) { e.Codec = spec("int8/64") }, want: "codec: got int8/32, want int8/64"},
		{name: "codec not set", expect: func(e *Expect) { e.Codec = codec.Spec{} }, want: "codec: got fp32, want Kind(0)"},
		{name: "shape", expect: func(e *Expect) { e.Shape = []uint32{2, 3, 8} }, want: "shape: got [2 3 4], want [2 3 8]"},
		{name: "rank 0", frame: func(f *Frame) { f.Shape = nil }, want: "rank 0"},
		{name: "zero dim", frame: func(f *Frame) { f.Shape = []uint32{2, 0, 4} }, want: "dim 1 is zero"},
		{name: "data length", frame: func(f *Frame) { f.Data = f.Data[:5] }, want: "data: got 5 values, shape [2 3 4] needs 24"},
		{name: "tokens missing", frame: func(f *Frame) { f.Tokens = nil }, want: "tokens: got 0, want 6"},
		{name: "targets short", frame: func(f *Frame) { f.Targets = f.Targets[:5] }, want: "targets: got 5, want 6"},
		{name: "tokens without B, T", frame: func(f *Frame) { f.Shape = []uint32{24} }, expect: func(e *Expect) { e.Shape = nil }, want: "no [B, T] prefix"},
		{name: "unexpected tokens", expect: func(e *Expect) { e.Tokens = false }, want: "tokens: got 6, want none"},
		{name: "unexpected targets", frame: func(f *Frame) { f.Tokens = nil }, expect: func(e *Expect) { e.Tokens = false }, want: "targets: got 6, want none"},
		{name: "token over vocab", frame: func(f *Frame) { f.Tokens[4] = 16 }, want: "tokens[4]: got id 16, want [0, 16)"},
		{name: "negative target", frame: func(f *Frame) { f.Targets[2] = -1 }, want: "targets[2]: got id -1, want [0, 16)"},
		{name: "negative token without vocab", frame: func(f *Frame) { f.Tokens[0] = -3 }, expect: func(e *Expect) { e.Vocab = 0 }, want: "tokens[0]: got id -3, want >= 0"},
		{name: "NaN", frame: func(f *Frame) { f.Data[7] = float32(math.NaN()) }, want: "data[7]: got NaN, want a finite value"},
		{name: "+Inf", frame: func(f *Frame) { f.Data[0] = float32(math.Inf(1)) }, want: "data[0]: got +Inf"},
		{name: "-Inf", frame: func(f *Frame) { f.Data[23] = float32(math.Inf(-1)) }, want: "data[23]: got -Inf"},
	} {
		t.Run(c.name, func(t *testing.T) {
			f, e := testFrame(), testExpect()
			if c.frame != nil {
				c.frame(f)
			}
			if c.expect != nil {
				c.expect(&e)
			}
			err := f.Check(e)
			if !errors.Is(err, ErrBadFrame) {
				t.Fatalf("got %v, want ErrBadFrame", err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not say %q", err, c.want)
			}
		})
	}
}

func TestNaNSurvivesTheWireButFailsCheck(t *testing.T) {
	for _, c := range []codec.Spec{CodecF32, spec("bf16"), spec("fp32+zstd"), spec("bf16+zstd")} {
		f := testFrame()
		f.Codec = c
		f.Data[3] = float32(math.NaN())
		got, err := ReadFrame(bytes.NewReader(encode(t, f)), 0)
		if err != nil {
			t.Fatalf("%v: ReadFrame should leave value checks to Check: %v", c, err)
		}
		e := testExpect()
		e.Codec = c
		// A frame claims finite values: a NaN is its sender's violation.
		if err := got.Check(e); !errors.Is(err, ErrBadFrame) || !errors.Is(err, ErrViolation) || !strings.Contains(err.Error(), "data[3]") {
			t.Fatalf("%v: Check: got %v, want ErrBadFrame, a violation, naming data[3]", c, err)
		}
	}
}

func BenchmarkWriteReadFrame(b *testing.B) {
	for _, c := range []codec.Spec{CodecF32, spec("bf16"), spec("int8/32+zstd")} {
		b.Run(c.String(), func(b *testing.B) {
			f := realisticFrame()
			f.Codec = c
			var buf bytes.Buffer
			b.SetBytes(int64(4 * (len(f.Data) + len(f.Tokens) + len(f.Targets))))
			for b.Loop() {
				buf.Reset()
				if err := WriteFrame(&buf, f); err != nil {
					b.Fatal(err)
				}
				if _, err := ReadFrame(&buf, 0); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// realisticFrame is a 16×128×128 float32 activation with tokens and targets (~1 MiB).
func realisticFrame() *Frame {
	const B, T, d = 16, 128, 128
	f := &Frame{Kind: KindActivation, Run: 42, Step: 1, Micro: 2, Shape: []uint32{B, T, d}, Codec: CodecF32,
		Tokens: make([]int32, B*T), Targets: make([]int32, B*T), Data: make([]float32, B*T*d)}
	for i := range f.Tokens {
		f.Tokens[i] = int32(i % 50257)
		f.Targets[i] = int32((i + 1) % 50257)
	}
	for i := range f.Data {
		f.Data[i] = float32(math.Sin(float64(i)))
	}
	return f
}

func FuzzReadFrame(f *testing.F) {
	f.Add(encode(f, testFrame()))
	f.Add(encode(f, &Frame{Kind: KindGradient, Run: 1, Shape: []uint32{3}, Codec: CodecF32, Data: []float32{float32(math.NaN()), 1, 2}}))
	f.Add(encode(f, &Frame{Kind: KindEval, Shape: []uint32{1, 1, 1, 2}, Codec: CodecF32, Tokens: []int32{-1}, Data: []float32{0, 0}}))
	for _, c := range allCodecs {
		fr := testFrame()
		fr.Codec = c
		f.Add(encode(f, fr))
	}
	wide := testFrame()
	wide.Codec, wide.Tokens[0], wide.Targets[5] = spec("bf16"), 300, 70000
	f.Add(encode(f, wide))
	f.Add(header(1024, 1024, 1024))
	f.Add(header(3))
	f.Add(zstdHeader(40, 3))
	f.Add([]byte{})
	f.Add([]byte("PSWF"))
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		fr, err := ReadFrame(r, 1<<20)
		if err != nil {
			if err != io.EOF && !errors.Is(err, ErrBadFrame) && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("error neither io.EOF, ErrBadFrame nor a truncation: %v", err)
			}
			return
		}
		var buf bytes.Buffer
		if err := WriteFrame(&buf, fr); err != nil {
			t.Fatalf("accepted frame does not re-encode: %v", err)
		}
		// Without zstd, fp32 and bf16 encodings are canonical: re-encoding
		// gives back exactly the bytes read. (A zstd stream can take many
		// forms, and an int8 or int4 scale recomputed from decoded values
		// may differ in its last bit.)
		blocked := fr.Codec.Kind == codec.Int8 || fr.Codec.Kind == codec.Int4
		if c := fr.Codec; !c.Zstd && !blocked {
			if consumed := in[:len(in)-r.Len()]; !bytes.Equal(buf.Bytes(), consumed) {
				t.Fatalf("re-encoding differs from input")
			}
		}
		again, err := ReadFrame(&buf, 1<<20)
		if err != nil {
			t.Fatalf("re-encoded frame refused: %v", err)
		}
		if blocked {
			checkDecoded(t, fr.Codec, fr.Data, again.Data)
			again.Data = fr.Data
		}
		if !framesEqual(fr, again) {
			t.Fatalf("re-decoded frame differs:\n%+v\n%+v", fr, again)
		}
	})
}

// Quantized values sent in a frame with the same codec arrive as they were:
// exactly for bf16, to within a float32 rounding for int8 and int4.
func TestQuantizedValuesCrossAFrameUnchanged(t *testing.T) {
	const b, tt, d = 2, 8, 40
	for _, c := range lossyCodecs {
		ef := codec.NewErrorFeedback(c, b*tt*d)
		f := &Frame{Kind: KindGradient, Run: 1, Shape: []uint32{b, tt, d}, Codec: c, Data: make([]float32, b*tt*d)}
		for step := range 3 {
			ef.Quantize(f.Data, gaussian(uint64(40+step), b*tt*d, 1e-6))
			var buf bytes.Buffer
			if err := WriteFrame(&buf, f); err != nil {
				t.Fatal(err)
			}
			got, err := ReadFrame(&buf, 0)
			if err != nil {
				t.Fatal(err)
			}
			for i, v := range f.Data {
				if d := math.Abs(float64(got.Data[i] - v)); c.Kind == codec.BF16 && d != 0 || d > math.Abs(float64(v))*0x1p-23 {
					t.Fatalf("%v value %d: sent %v, arrived %v", c, i, v, got.Data[i])
				}
			}
		}
	}
}

// A zstd payload that would expand past the size its frame declares is
// refused, having cost no more memory than that size.
func TestReadFrameRefusesAZstdBomb(t *testing.T) {
	const n = 200_000 // more than a zstd block, so the bomb's blocks are legal
	c := spec("int8/32+zstd")
	raw := n + 4*((n+31)/32) // what n int8/32 values take before zstd
	enc, err := zstd.NewWriter(nil, zstd.WithSingleSegment(true))
	if err != nil {
		t.Fatal(err)
	}
	bomb := enc.EncodeAll(make([]byte, 64<<20), nil) // 64 MiB of zeros in a few KiB
	var h zstd.Header
	if err := h.Decode(bomb); err != nil || h.HeaderSize != 9 {
		t.Fatalf("bomb header: %v %+v", err, h)
	}
	binary.LittleEndian.PutUint32(bomb[5:], uint32(raw)) // declare only what n values take

	f := &Frame{Kind: KindGradient, Shape: []uint32{n}, Codec: c, Data: make([]float32, n)}
	in := encode(t, f)[:frameHeaderLen]
	binary.LittleEndian.PutUint32(in[48:], uint32(len(bomb)))
	in = append(in, bomb...)

	read := func() error {
		_, err := ReadFrame(bytes.NewReader(in), Expect{Kind: KindGradient, Shape: f.Shape, Codec: c}.MaxBytes())
		return err
	}
	_ = read() // fill the buffer pools and the decoder's state, which later frames reuse
	// TotalAlloc counts every goroutine in the process (hosts other tests
	// left behind still run), so the fewest bytes over a few reads is this
	// read's cost: one stray allocation must not fail it, a bomb that got
	// through would cost 64 MiB every time.
	least := uint64(math.MaxUint64)
	for range 5 {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		err = read()
		runtime.ReadMemStats(&after)
		if !errors.Is(err, ErrBadFrame) || !errors.Is(err, codec.ErrCorrupt) {
			t.Fatalf("got %v, want ErrBadFrame and codec.ErrCorrupt", err)
		}
		least = min(least, after.TotalAlloc-before.TotalAlloc)
	}
	// At most Data (4n), the decompression buffer (raw + a block), the
	// payload and, should a GC have emptied the pools, a read buffer.
	if limit := uint64(4*n + raw + (128 << 10) + len(bomb) + chunkLen + (64 << 10)); least > limit {
		t.Fatalf("refusing the bomb allocated %d bytes, want at most %d", least, limit)
	}
	t.Logf("%v", err)
}
