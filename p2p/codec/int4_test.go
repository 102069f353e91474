package codec

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// The int4 layout, byte by byte: scales first, then value 2i in the low
// nibble of byte i and 2i+1 in its high nibble, two's complement.
func TestInt4WireLayout(t *testing.T) {
	c := Spec{Kind: Int4, Block: 8}
	// Block 0 has max 7, so scale 1 and q = x. Block 1 (3 values, odd n)
	// has max 14, so scale 2: 14 → 7, -3.5 → -1.75 → -2, 7 → 3.5 → 4 (ties
	// to even).
	x := []float32{7, -7, 1, -1, 2, -3, 0, 6, 14, -3.5, 7}
	want := []byte{
		0x00, 0x00, 0x80, 0x3f, // scale 1
		0x00, 0x00, 0x00, 0x40, // scale 2
		0x97, // 7, -7
		0xf1, // 1, -1
		0xd2, // 2, -3
		0x60, // 0, 6
		0xe7, // 7, -2
		0x04, // 4, padding 0
	}
	p := c.Encode(nil, x)
	if !bytes.Equal(p, want) {
		t.Fatalf("Encode = % x\nwant     % x", p, want)
	}
	got := make([]float32, len(x))
	if err := c.Decode(got, want); err != nil {
		t.Fatal(err)
	}
	if dec := []float32{7, -7, 1, -1, 2, -3, 0, 6, 14, -4, 8}; !slices.Equal(got, dec) {
		t.Fatalf("Decode = %v, want %v", got, dec)
	}
	// With zstd the scales are shuffled byte by byte; the packed values are not.
	raw := make([]byte, len(want))
	c.put(raw, x, true)
	planar := []byte{0x00, 0x00, 0x00, 0x00, 0x80, 0x00, 0x3f, 0x40, 0x97, 0xf1, 0xd2, 0x60, 0xe7, 0x04}
	if !bytes.Equal(raw, planar) {
		t.Fatalf("planar layout % x\nwant            % x", raw, planar)
	}
	z := Spec{Kind: Int4, Block: 8, Zstd: true}
	zgot := make([]float32, len(x))
	if err := z.Decode(zgot, zstdFrame(t, planar, zstd.WithSingleSegment(true))); err != nil || !slices.Equal(zgot, got) {
		t.Fatalf("zstd of the planar layout decoded to %v, %v; want %v", zgot, err, got)
	}
}

func TestInt4ValuesAreRoundedToNearestAndClampedTo7(t *testing.T) {
	// max 7, so scale 1 and every value is its own rounding.
	x := []float32{7, -7, 0.49, 0.51, -0.51, 1.5, 2.5, -2.5, 6.6, 3, 0, float32(math.Copysign(0, -1)), 5, -6.5, -5.5, 4}
	want := []int8{7, -7, 0, 1, -1, 2, 2, -2, 7, 3, 0, 0, 5, -6, -6, 4}
	c := Spec{Kind: Int4, Block: 16}
	p := c.Encode(nil, x)
	if s := math.Float32frombits(binary.LittleEndian.Uint32(p)); s != 1 {
		t.Fatalf("scale %v, want 1", s)
	}
	for i := range x {
		if q := nibble(p[4+i/2] >> (4 * (i % 2))); q != want[i] {
			t.Errorf("x[%d] = %v quantised to %d, want %d", i, x[i], q, want[i])
		}
	}
	// The largest finite values do not overflow; nor does a block whose
	// max|x|/7 rounds above maxScale.
	for _, big := range [][]float32{
		{math.MaxFloat32, -math.MaxFloat32, 1e38, 0, 0, 0, 0, 0},
		{math.Nextafter32(math.MaxFloat32, 0), 3e38, -2e38, 1},
	} {
		c := Spec{Kind: Int4, Block: 8}
		got := make([]float32, len(big))
		if err := c.Decode(got, c.Encode(nil, big)); err != nil {
			t.Fatal(err)
		}
		checkDecoded(t, c, big, got)
	}
}

func TestInt4BlocksOfZerosHaveScaleZero(t *testing.T) {
	x := make([]float32, 71)
	x[65] = 3.5 // third block, the others zero
	p := int4x32.Encode(nil, x)
	if len(p) != 3*4+36 {
		t.Fatalf("payload of %d bytes, want 3 scales and 36 bytes of values", len(p))
	}
	for b, want := range []float32{0, 0, 0.5} {
		if got := math.Float32frombits(binary.LittleEndian.Uint32(p[4*b:])); got != want {
			t.Errorf("scale %d = %v, want %v", b, got, want)
		}
	}
	q := p[12:]
	if q[32] != 0x70 || bytes.Count(q, []byte{0}) != 35 {
		t.Errorf("quantised values % x, want 7 in the high nibble of byte 32 and zeros elsewhere", q)
	}
}

// randomBlocks returns n values in blocks of block, each block drawn at
// its own magnitude (10^-44 to 10^38, subnormals included), some blocks
// zero, some holding ties and exact multiples of their scale.
func randomBlocks(r *rand.Rand, n, block int) []float32 {
	x := make([]float32, n)
	for lo := 0; lo < n; lo += block {
		hi := min(lo+block, n)
		switch r.IntN(8) {
		case 0: // zeros, with a -0
			x[lo] = float32(math.Copysign(0, -1))
		case 1: // integers and half-integers up to 7: exact scale 1, and ties
			for i := lo; i < hi; i++ {
				x[i] = float32(r.IntN(29)-14) / 2
			}
			x[lo] = 7
		default:
			mag := math.Pow(10, -44+82*r.Float64())
			for i := lo; i < hi; i++ {
				v := float32(r.NormFloat64() * mag)
				if math.IsInf(float64(v), 0) {
					v = math.MaxFloat32
				}
				x[i] = v
			}
		}
	}
	return x
}

// Over random inputs of odd and even lengths and several block sizes: every
// value comes back within half its block's scale (as the payload states
// it), and roundTrip gives exactly what Decode(Encode(x)) does.
func TestInt4RoundTripsWithinHalfAScaleAndMatchesRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(40, 4))
	for _, block := range []int{MinBlock, 10, 32, 64, 4096} {
		for _, n := range []int{0, 1, 2, 3, 7, 8, 9, 10, 11, 31, 32, 33, 64, 65, 1000, 1001, 4097, 8193} {
			for _, z := range []bool{false, true} {
				c := Spec{Kind: Int4, Block: block, Zstd: z}
				for trial := range 3 {
					x := randomBlocks(r, n, block)
					got := make([]float32, n)
					if err := c.Decode(got, c.Encode(nil, x)); err != nil {
						t.Fatalf("%v n=%d: %v", c, n, err)
					}
					rt := make([]float32, n)
					c.roundTrip(rt, x)
					for i := range got {
						if !sameBits(rt[i], got[i]) {
							t.Fatalf("%v n=%d trial %d value %d: roundTrip %v (%#08x), Decode(Encode) %v (%#08x)",
								c, n, trial, i, rt[i], math.Float32bits(rt[i]), got[i], math.Float32bits(got[i]))
						}
					}
					checkDecoded(t, c, x, got)
					// The bound against the scale actually sent: scale/2, plus
					// the rounding of q×scale (half an ulp of 7·scale), plus up
					// to 7 subnormal steps should the scale have underflowed.
					raw := Spec{Kind: Int4, Block: block}.Encode(nil, x)
					for i := range x {
						s := float64(math.Float32frombits(binary.LittleEndian.Uint32(raw[4*(i/block):])))
						tol := s/2 + 7*s*0x1p-24 + 7*0x1p-149
						if err := math.Abs(float64(got[i]) - float64(x[i])); err > tol {
							t.Fatalf("%v n=%d value %d: got %v for %v, error %.3g > scale/2 = %.3g", c, n, i, got[i], x[i], err, s/2)
						}
					}
				}
			}
		}
	}
}

// Float32 scales keep int4's relative accuracy at any magnitude. Rounding
// to a grid of step s = max|block|/7 leaves an RMS error of s/√12: for
// Gaussian blocks of 32 to 64 values, whose max is 2.1σ to 2.4σ, that is
// 9% to 10% of σ.
func TestInt4KeepsTinyGradientsAccurate(t *testing.T) {
	for _, sigma := range []float64{1, 1e-6, 1e-7, 1e-20} {
		x := gaussian(7, 64*100, sigma)
		for _, c := range []Spec{int4x32, {Kind: Int4, Block: 64, Zstd: true}} {
			got := make([]float32, len(x))
			if err := c.Decode(got, c.Encode(nil, x)); err != nil {
				t.Fatal(err)
			}
			checkDecoded(t, c, x, got)
			if rel := rms(got, x) / rms(x, nil); rel > 0.11 {
				t.Errorf("σ=%g %v: relative RMS error %.4f, want < 11%%", sigma, c, rel)
			}
		}
	}
}

func TestInt4DecodeRefusesMalformedPayloads(t *testing.T) {
	c := Spec{Kind: Int4, Block: 8}
	x := gaussian(10, 21, 1) // int4/8: 3 scales, 11 bytes of values, the last half padding
	valid := c.Encode(nil, x)
	if len(valid) != 12+11 {
		t.Fatalf("payload of %d bytes, want 23", len(valid))
	}
	edit := func(p []byte, f func(b []byte)) []byte {
		b := slices.Clone(p)
		f(b)
		return b
	}
	setScale := func(bits uint32) []byte {
		return edit(valid, func(b []byte) { binary.LittleEndian.PutUint32(b[4:], bits) })
	}
	// The same edits under zstd, made to the planar layout before compressing.
	z := Spec{Kind: Int4, Block: 8, Zstd: true}
	planar := make([]byte, len(valid))
	c.put(planar, x, true)
	zedit := func(f func(b []byte)) []byte { return zstdFrame(t, edit(planar, f), zstd.WithSingleSegment(true)) }

	for _, tc := range []struct {
		name    string
		codec   Spec
		n       int
		payload []byte
		want    string
	}{
		{"short", c, 21, valid[:22], "int4/8 payload of 22 bytes, 21 values take 23"},
		{"long", c, 21, append(slices.Clone(valid), 0), "int4/8 payload of 24 bytes, 21 values take 23"},
		{"one value fewer", c, 20, valid, "int4/8 payload of 23 bytes, 20 values take 22"},
		{"block size differs", Spec{Kind: Int4, Block: 16}, 21, valid, "21 values take 19"},
		{"int8 bytes", c, 21, Spec{Kind: Int8, Block: 8}.Encode(nil, x), "int4/8 payload of 33 bytes"},
		{"NaN scale", c, 21, setScale(0x7fc00000), "int4 block 1: scale NaN"},
		{"+Inf scale", c, 21, setScale(0x7f800000), "int4 block 1: scale +Inf"},
		{"negative scale", c, 21, setScale(math.Float32bits(-0.5)), "int4 block 1: scale -0.5"},
		{"-0 scale", c, 21, setScale(0x80000000), "int4 block 1: scale -0"},
		{"scale past maxScale", c, 21, setScale(math.Float32bits(int4Grid.maxScale) + 1), "int4 block 1: scale 4.8"},
		{"-8 in a low nibble", c, 21, edit(valid, func(b []byte) { b[12+5] = b[12+5]&0xf0 | 0x08 }), "int4 value 10 is -8, want [-7, 7]"},
		{"-8 in a high nibble", c, 21, edit(valid, func(b []byte) { b[12+5] = b[12+5]&0x0f | 0x80 }), "int4 value 11 is -8, want [-7, 7]"},
		{"-8 as the last value", c, 21, edit(valid, func(b []byte) { b[22] = 0x08 }), "int4 value 20 is -8"},
		{"value in a zero block", c, 21, edit(valid, func(b []byte) {
			binary.LittleEndian.PutUint32(b[8:], 0)
			clear(b[12+8:])
			b[12+9] = 0x30 // value 19 = 3
		}), "int4 value 19 is 3 in block 2 of scale 0"},
		{"padding nibble", c, 21, edit(valid, func(b []byte) { b[22] |= 0x10 }), "int4 padding nibble after value 20 is 0x1, want 0"},
		{"padding nibble -8", c, 21, edit(valid, func(b []byte) { b[22] |= 0x80 }), "int4 padding nibble after value 20 is 0x8"},
		{"zstd NaN scale", z, 21, zedit(func(b []byte) { b[1], b[3+1], b[6+1], b[9+1] = 0, 0, 0xc0, 0x7f }), "int4 block 1: scale NaN"},
		{"zstd -8", z, 21, zedit(func(b []byte) { b[12] = b[12]&0xf0 | 0x08 }), "int4 value 0 is -8"},
		{"zstd padding nibble", z, 21, zedit(func(b []byte) { b[22] |= 0xf0 }), "int4 padding nibble after value 20 is 0xf"},
		{"zstd frame for even n", z, 20, z.Encode(nil, x), "declares 23 bytes, want 22"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.codec.Decode(make([]float32, tc.n), tc.payload)
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrCorrupt saying %q", err, tc.want)
			}
		})
	}
	// The unedited payloads decode, and an even n has no padding to check.
	for _, p := range []struct {
		codec   Spec
		n       int
		payload []byte
	}{{c, 21, valid}, {z, 21, zedit(func([]byte) {})}, {c, 20, c.Encode(nil, x[:20])}} {
		if err := p.codec.Decode(make([]float32, p.n), p.payload); err != nil {
			t.Errorf("%v of %d values: %v", p.codec, p.n, err)
		}
	}
}

// int4 quarters the bytes of fp32 activations and halves int8's, at the
// cost of a coarser grid: on Gaussian values the RMS error is about 18×
// int8's (127/7).
func TestInt4HalvesInt8sBytesAtACoarserGrid(t *testing.T) {
	x := gaussian(90, 64*1024, 1)
	i8, i4 := Spec{Kind: Int8, Block: 32}, int4x32
	p8, p4 := i8.Encode(nil, x), i4.Encode(nil, x)
	if len(p4) != len(x)/2+len(x)/32*4 || float64(len(p4))/float64(len(p8)) > 0.56 {
		t.Errorf("int4/32 takes %d bytes, int8/32 %d", len(p4), len(p8))
	}
	d8, d4 := make([]float32, len(x)), make([]float32, len(x))
	i8.roundTrip(d8, x)
	i4.roundTrip(d4, x)
	ratio := rms(d4, x) / rms(d8, x)
	t.Logf("RMS error: int8/32 %.4g, int4/32 %.4g (%.1f×)", rms(d8, x), rms(d4, x), ratio)
	if ratio < 127.0/7*0.9 || ratio > 127.0/7*1.1 {
		t.Errorf("int4's RMS error is %.1f× int8's, want about %.1f×", ratio, 127.0/7)
	}
}

func FuzzDecodeInt4(f *testing.F) {
	for _, x := range testData() {
		for _, b := range []int{8, 10, 32, 64} {
			f.Add(Spec{Kind: Int4, Block: b}.Encode(nil, x), uint16(len(x)), uint8((b-MinBlock)/2))
		}
	}
	f.Add([]byte{0, 0, 0x80, 0x3f, 0x97, 0xf1, 0xd2, 0x06}, uint16(7), uint8(0))
	f.Fuzz(func(t *testing.T, payload []byte, n uint16, block uint8) {
		c := Spec{Kind: Int4, Block: MinBlock + 2*(int(block)%((256-MinBlock)/2))}
		dst := make([]float32, n%4096)
		if err := c.Decode(dst, payload); err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error without ErrCorrupt: %v", err)
			}
			return
		}
		for i, v := range dst {
			if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
				t.Fatalf("decoded value %d is %v", i, v)
			}
		}
		// What decoded re-encodes, comes back within the error bound, and
		// exactly as roundTrip predicts.
		again := make([]float32, len(dst))
		if err := c.Decode(again, c.Encode(nil, dst)); err != nil {
			t.Fatalf("re-encoded payload refused: %v", err)
		}
		checkDecoded(t, c, dst, again)
		rt := make([]float32, len(dst))
		if c.roundTrip(rt, dst); !slices.EqualFunc(rt, again, sameBits) {
			t.Fatal("roundTrip differs from Decode(Encode(x))")
		}
	})
}
