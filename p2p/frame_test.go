package p2p

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math"
	"runtime"
	"slices"
	"strings"
	"testing"
)

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
			if want := frameHeaderLen + 4*(len(f.Tokens)+len(f.Targets)+len(f.Data)); len(b) != want {
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
		{"unknown codec", func(f *Frame) { f.Codec = 9 }, "unknown codec 9"},
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

// header returns a valid encoded header for a frame with the given shape
// and no tokens, to be edited by a test.
func header(shape ...uint32) []byte {
	h := make([]byte, frameHeaderLen)
	copy(h, frameMagic)
	h[4], h[5], h[6], h[7] = frameVersion, byte(KindActivation), byte(CodecF32), byte(len(shape))
	n := uint64(1)
	for i, d := range shape {
		binary.LittleEndian.PutUint32(h[24+4*i:], d)
		n *= uint64(d)
	}
	binary.LittleEndian.PutUint64(h[48:], 4*n)
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
	for _, c := range []struct {
		name     string
		in       []byte
		maxBytes int
		want     string // in the error message
		trunc    bool   // must also wrap io.ErrUnexpectedEOF
	}{
		{name: "wrong magic", in: edit(func(b []byte) { b[0] = 'X' }), want: "magic"},
		{name: "wrong version", in: edit(func(b []byte) { b[4] = 2 }), want: "version 2"},
		{name: "kind 0", in: edit(func(b []byte) { b[5] = 0 }), want: "unknown kind 0"},
		{name: "kind 4", in: edit(func(b []byte) { b[5] = 4 }), want: "unknown kind 4"},
		{name: "unknown codec", in: edit(func(b []byte) { b[6] = 7 }), want: "unknown codec 7"},
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
		{name: "payload length mismatch", in: edit(func(b []byte) { binary.LittleEndian.PutUint64(b[48:], 4*24+4) }), want: "payload length 100"},
		{name: "payload length huge", in: edit(func(b []byte) { binary.LittleEndian.PutUint64(b[48:], math.MaxUint64) }), want: "payload length"},
		{name: "truncated magic", in: valid[:3], want: "truncated header", trunc: true},
		{name: "truncated header", in: valid[:frameHeaderLen-1], want: "truncated header", trunc: true},
		{name: "truncated tokens", in: valid[:frameHeaderLen+5], want: "truncated tokens", trunc: true},
		{name: "truncated targets", in: valid[:frameHeaderLen+4*6+1], want: "truncated targets", trunc: true},
		{name: "truncated payload", in: valid[:len(valid)-1], want: "truncated payload", trunc: true},
	} {
		t.Run(c.name, func(t *testing.T) {
			f, err := ReadFrame(bytes.NewReader(c.in), c.maxBytes)
			if !errors.Is(err, ErrBadFrame) {
				t.Fatalf("got frame %v, error %v; want ErrBadFrame", f, err)
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
	if !errors.Is(err, boom) || errors.Is(err, ErrBadFrame) {
		t.Fatalf("got %v, want the transport error without ErrBadFrame", err)
	}
}

type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }

func TestReadFrameDoesNotAllocateWhatAHeaderMerelyClaims(t *testing.T) {
	// A header claiming a 200 MB tensor (within MaxFrameBytes) and nothing
	// after it, whole or cut to 20 bytes.
	claim := header(50_000_000)
	for _, in := range [][]byte{claim, claim[:20]} {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		_, err := ReadFrame(bytes.NewReader(in), 0)
		runtime.ReadMemStats(&after)
		if !errors.Is(err, ErrBadFrame) || !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("%d-byte input: got %v, want a truncation ErrBadFrame", len(in), err)
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
		{name: "codec", expect: func(e *Expect) { e.Codec = 2 }, want: "codec: got f32, want Codec(2)"},
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
	f := testFrame()
	f.Data[3] = float32(math.NaN())
	got, err := ReadFrame(bytes.NewReader(encode(t, f)), 0)
	if err != nil {
		t.Fatalf("ReadFrame should leave value checks to Check: %v", err)
	}
	if err := got.Check(testExpect()); !errors.Is(err, ErrBadFrame) || !strings.Contains(err.Error(), "data[3]") {
		t.Fatalf("Check: got %v, want ErrBadFrame naming data[3]", err)
	}
}

func BenchmarkWriteReadFrame(b *testing.B) {
	f := realisticFrame()
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
	f.Add(header(1024, 1024, 1024))
	f.Add(header(3))
	f.Add([]byte{})
	f.Add([]byte("PSWF"))
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		fr, err := ReadFrame(r, 1<<20)
		if err != nil {
			if err != io.EOF && !errors.Is(err, ErrBadFrame) {
				t.Fatalf("error neither io.EOF nor ErrBadFrame: %v", err)
			}
			return
		}
		var buf bytes.Buffer
		if err := WriteFrame(&buf, fr); err != nil {
			t.Fatalf("accepted frame does not re-encode: %v", err)
		}
		// The encoding is canonical: re-encoding gives back exactly the bytes read.
		if consumed := in[:len(in)-r.Len()]; !bytes.Equal(buf.Bytes(), consumed) {
			t.Fatalf("re-encoding differs from input")
		}
		again, err := ReadFrame(&buf, 1<<20)
		if err != nil {
			t.Fatalf("re-encoded frame refused: %v", err)
		}
		if !framesEqual(fr, again) {
			t.Fatalf("re-decoded frame differs:\n%+v\n%+v", fr, again)
		}
	})
}
