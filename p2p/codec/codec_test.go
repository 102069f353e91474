package codec

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// The codecs without zstd.
var (
	fp32    = Spec{Kind: F32}
	bf16    = Spec{Kind: BF16}
	int8x32 = Spec{Kind: Int8, Block: 32}
	int4x32 = Spec{Kind: Int4, Block: 32}
)

// allCodecs is every kind of codec, with and without zstd.
var allCodecs = []Spec{
	fp32, bf16, int8x32, {Kind: Int8, Block: 64}, {Kind: Int8, Block: MinBlock},
	int4x32, {Kind: Int4, Block: 64}, {Kind: Int4, Block: MinBlock},
	{Kind: F32, Zstd: true}, {Kind: BF16, Zstd: true}, {Kind: Int8, Block: 32, Zstd: true}, {Kind: Int8, Block: 64, Zstd: true},
	{Kind: Int4, Block: 32, Zstd: true}, {Kind: Int4, Block: 64, Zstd: true},
}

// gaussian returns n values drawn from N(0, sigma²) with a fixed seed.
func gaussian(seed uint64, n int, sigma float64) []float32 {
	r := rand.New(rand.NewPCG(seed, 0x5eed))
	x := make([]float32, n)
	for i := range x {
		x[i] = float32(r.NormFloat64() * sigma)
	}
	return x
}

// testData are the tensors every codec must carry within its error bound.
// Lengths are not multiples of the int8 and int4 block sizes, and some are odd.
func testData() map[string][]float32 {
	outlier := gaussian(3, 1000, 0.01)
	outlier[40] = 100
	zeroBlocks := gaussian(4, 300, 1)
	clear(zeroBlocks[:128])
	clear(zeroBlocks[200:264])
	magnitudes := gaussian(5, 64*12+7, 1)
	for i := range magnitudes {
		magnitudes[i] *= float32(math.Pow(10, float64(i/64)*5-30)) // one magnitude per 64-block, 1e-30 to 1e30
	}
	return map[string][]float32{
		"gaussian activations":     gaussian(1, 4096+5, 1),
		"gradients ~1e-6":          gaussian(2, 4096+17, 1e-6),
		"gradients ~1e-7":          gaussian(6, 2048+33, 1e-7),
		"a block with an outlier":  outlier,
		"all zeros":                make([]float32, 100),
		"zero blocks among values": zeroBlocks,
		"magnitudes 1e-30 to 1e30": magnitudes,
		"one value":                {-3.5},
		"no values":                {},
	}
}

func TestParseAndStringAreInverses(t *testing.T) {
	for _, c := range []struct {
		in   string
		want Spec
		text string // String of the parsed codec, if not in
	}{
		{"fp32", fp32, ""},
		{"bf16", bf16, ""},
		{"int8", int8x32, "int8/32"},
		{"int8/32", int8x32, ""},
		{"int8/64", Spec{Kind: Int8, Block: 64}, ""},
		{"int8/8", Spec{Kind: Int8, Block: 8}, ""},
		{"int8/4096", Spec{Kind: Int8, Block: 4096}, ""},
		{"fp32+zstd", Spec{Kind: F32, Zstd: true}, ""},
		{"bf16+zstd", Spec{Kind: BF16, Zstd: true}, ""},
		{"int8+zstd", Spec{Kind: Int8, Block: 32, Zstd: true}, "int8/32+zstd"},
		{"int8/32+zstd", Spec{Kind: Int8, Block: 32, Zstd: true}, ""},
		{"int4", int4x32, "int4/32"},
		{"int4/32", int4x32, ""},
		{"int4/8", Spec{Kind: Int4, Block: 8}, ""},
		{"int4/10", Spec{Kind: Int4, Block: 10}, ""},
		{"int4/4096", Spec{Kind: Int4, Block: 4096}, ""},
		{"int4+zstd", Spec{Kind: Int4, Block: 32, Zstd: true}, "int4/32+zstd"},
		{"int4/64+zstd", Spec{Kind: Int4, Block: 64, Zstd: true}, ""},
	} {
		got, err := Parse(c.in)
		if err != nil || got != c.want {
			t.Errorf("Parse(%q) = %+v, %v; want %+v", c.in, got, err, c.want)
			continue
		}
		text := cmp.Or(c.text, c.in)
		if got.String() != text {
			t.Errorf("Parse(%q).String() = %q, want %q", c.in, got, text)
		}
		if again, err := Parse(got.String()); err != nil || again != got {
			t.Errorf("Parse(%q) = %+v, %v; want %+v", got.String(), again, err, got)
		}
		if err := got.Validate(); err != nil {
			t.Errorf("%v.Validate() = %v", got, err)
		}
	}
}

func TestParseRefusesAnythingElse(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"", `unknown encoding ""`},
		{"FP32", `unknown encoding "FP32"`},
		{"f32", `unknown encoding "f32"`},
		{"fp16", `unknown encoding "fp16"`},
		{"int2", `unknown encoding "int2"`},
		{"int16", `unknown encoding "int16"`},
		{"uint4", `unknown encoding "uint4"`},
		{"zstd", `unknown encoding "zstd"`},
		{"+zstd", `unknown encoding ""`},
		{"bf16+zstd+zstd", `unknown encoding "bf16+zstd"`},
		{"bf16+gzip", `unknown encoding "bf16+gzip"`},
		{"int8+zstd/32", `unknown encoding "int8+zstd"`},
		{" int8", `unknown encoding " int8"`},
		{"bf16/32", "only int8 and int4 take a block size"},
		{"fp32/4", "only int8 and int4 take a block size"},
		{"int8/", `block size "" is not a decimal number`},
		{"int8/x", `block size "x" is not a decimal number`},
		{"int8/+64", `block size "+64" is not a decimal number`},
		{"int8/064", `block size "064" is not a decimal number`},
		{"int8/64/2", `block size "64/2" is not a decimal number`},
		{"int8/7", "block size 7 outside [8, 4096]"},
		{"int8/0", "block size 0 outside [8, 4096]"},
		{"int8/-32", "block size -32 outside [8, 4096]"},
		{"int8/4097", "block size 4097 outside [8, 4096]"},
		{"int4/", `block size "" is not a decimal number`},
		{"int4/07", `block size "07" is not a decimal number`},
		{"int4+zstd/32", `unknown encoding "int4+zstd"`},
		{"int4/7", "block size 7 is odd: int4 packs two values a byte and needs an even block size in [8, 4096]"},
		{"int4/33", "block size 33 is odd: int4 packs two values a byte"},
		{"int4/4095+zstd", "block size 4095 is odd"},
		{"int4/4", "block size 4 outside [8, 4096]"},
		{"int4/0", "block size 0 outside [8, 4096]"},
		{"int4/-2", "block size -2 outside [8, 4096]"},
		{"int4/4098", "block size 4098 outside [8, 4096]"},
	} {
		got, err := Parse(c.in)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), fmt.Sprintf("%q", c.in)) {
			t.Errorf("Parse(%q) = %v, %v; want an error naming the input and saying %q", c.in, got, err, c.want)
		}
	}
}

func TestCodecValidateNamesTheProblem(t *testing.T) {
	for _, c := range []struct {
		codec Spec
		want  string
	}{
		{Spec{}, "codec: unknown kind 0"},
		{Spec{Kind: 5}, "codec: unknown kind 5"},
		{Spec{Kind: Int4}, "codec int4/0: block size 0 outside [8, 4096]"},
		{Spec{Kind: Int4, Block: 31, Zstd: true}, "codec int4/31+zstd: block size 31 is odd"},
		{Spec{Kind: Int4, Block: 8192}, "codec int4/8192: block size 8192 outside [8, 4096]"},
		{Spec{Kind: Int8}, "codec int8/0: block size 0 outside [8, 4096]"},
		{Spec{Kind: Int8, Block: 5000, Zstd: true}, "codec int8/5000+zstd: block size 5000"},
		{Spec{Kind: BF16, Block: 32}, "codec bf16/32: bf16 takes no block size, got 32"},
	} {
		if err := c.codec.Validate(); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v.Validate() = %v, want %q", c.codec, err, c.want)
		}
	}
}

func TestCodecIsTextInConfigs(t *testing.T) {
	type cfg struct {
		Act  Spec `json:"act"`
		Grad Spec `json:"grad"`
	}
	in := cfg{Act: Spec{Kind: Int8, Block: 64, Zstd: true}, Grad: bf16}
	b, err := json.Marshal(in)
	if err != nil || string(b) != `{"act":"int8/64+zstd","grad":"bf16"}` {
		t.Fatalf("Marshal = %s, %v", b, err)
	}
	var out cfg
	if err := json.Unmarshal(b, &out); err != nil || out != in {
		t.Fatalf("Unmarshal = %+v, %v; want %+v", out, err, in)
	}
	if err := json.Unmarshal([]byte(`{"act":"int9"}`), &out); err == nil || !strings.Contains(err.Error(), `"int9"`) {
		t.Fatalf("Unmarshal of int9: %v", err)
	}
	if _, err := json.Marshal(cfg{}); err == nil {
		t.Fatal("Marshal of the zero Spec succeeded")
	}
}

// checkDecoded checks that got, decoded from x with c, is within c's error bound.
func checkDecoded(t *testing.T, c Spec, x, got []float32) {
	t.Helper()
	switch c.Kind {
	case F32:
		for i := range x {
			if math.Float32bits(got[i]) != math.Float32bits(x[i]) {
				t.Fatalf("value %d: got %v, want %v exactly", i, got[i], x[i])
			}
		}
	case BF16:
		for i := range x {
			if err := math.Abs(float64(got[i]) - float64(x[i])); err > math.Abs(float64(x[i]))/256 {
				t.Fatalf("value %d: got %v for %v, relative error %.3g > 2^-8", i, got[i], x[i], err/math.Abs(float64(x[i])))
			}
		}
	case Int8:
		for lo := 0; lo < len(x); lo += c.Block {
			hi := min(lo+c.Block, len(x))
			var m float64
			for _, v := range x[lo:hi] {
				m = max(m, math.Abs(float64(v)))
			}
			// scale/2 = max|block|/254, plus float32 rounding of the scale and
			// of q×scale, which for a subnormal scale (max|block| < 1.5e-36)
			// is up to 127 subnormal steps.
			tol := m/254*(1+2e-5) + 127*0x1p-149
			for i := lo; i < hi; i++ {
				if err := math.Abs(float64(got[i]) - float64(x[i])); err > tol {
					t.Fatalf("value %d: got %v for %v, error %.3g > max|block|/254 = %.3g", i, got[i], x[i], err, m/254)
				}
			}
		}
	case Int4:
		for lo := 0; lo < len(x); lo += c.Block {
			hi := min(lo+c.Block, len(x))
			var m float64
			for _, v := range x[lo:hi] {
				m = max(m, math.Abs(float64(v)))
			}
			// scale/2 = max|block|/14, plus float32 rounding of the scale and
			// of q×scale, up to 7 subnormal steps for a subnormal scale.
			tol := m/14*(1+2e-5) + 7*0x1p-149
			for i := lo; i < hi; i++ {
				if err := math.Abs(float64(got[i]) - float64(x[i])); err > tol {
					t.Fatalf("value %d: got %v for %v, error %.3g > max|block|/14 = %.3g", i, got[i], x[i], err, m/14)
				}
			}
		}
	default:
		t.Fatalf("checkDecoded: no error bound for %v", c)
	}
}

func TestCodecsRoundTripWithinTheirErrorBounds(t *testing.T) {
	for _, c := range allCodecs {
		for name, x := range testData() {
			t.Run(c.String()+"/"+name, func(t *testing.T) {
				payload := c.Encode([]byte("prefix"), x)
				if string(payload[:6]) != "prefix" {
					t.Fatal("Encode did not append to dst")
				}
				payload = payload[6:]
				if size := c.MaxEncodedSize(len(x)); c.Zstd && len(payload) > size || !c.Zstd && len(payload) != size {
					t.Fatalf("payload of %d bytes, MaxEncodedSize %d", len(payload), size)
				}
				got := make([]float32, len(x))
				if err := c.Decode(got, payload); err != nil {
					t.Fatal(err)
				}
				checkDecoded(t, c, x, got)
				rt := make([]float32, len(x))
				c.roundTrip(rt, x)
				if !slices.EqualFunc(rt, got, sameBits) {
					t.Fatal("roundTrip differs from Decode(Encode(x))")
				}
			})
		}
	}
}

func sameBits(a, b float32) bool { return math.Float32bits(a) == math.Float32bits(b) }

// rms is the root mean square of a − b (or of a if b is nil), in float64.
func rms(a, b []float32) float64 {
	var s float64
	for i := range a {
		d := float64(a[i])
		if b != nil {
			d -= float64(b[i])
		}
		s += d * d
	}
	return math.Sqrt(s / float64(len(a)))
}

// Gradients are ~1e-6 and smaller: float32 block scales keep int8's
// relative accuracy at any magnitude, where a float16 scale would underflow.
func TestInt8KeepsTinyGradientsAccurate(t *testing.T) {
	for _, sigma := range []float64{1, 1e-6, 1e-7, 1e-20} {
		x := gaussian(7, 64*100, sigma)
		for _, c := range []Spec{int8x32, {Kind: Int8, Block: 64, Zstd: true}} {
			got := make([]float32, len(x))
			if err := c.Decode(got, c.Encode(nil, x)); err != nil {
				t.Fatal(err)
			}
			checkDecoded(t, c, x, got)
			if rel := rms(got, x) / rms(x, nil); rel > 0.01 {
				t.Errorf("σ=%g %v: relative RMS error %.4f, want < 1%%", sigma, c, rel)
			}
		}
	}
}

func TestInt8BlocksOfZerosHaveScaleZero(t *testing.T) {
	x := make([]float32, 70)
	x[65] = 2.54 // third block, the others zero
	p := int8x32.Encode(nil, x)
	if len(p) != 3*4+70 {
		t.Fatalf("payload of %d bytes, want 3 scales and 70 values", len(p))
	}
	for b, want := range []float32{0, 0, 2.54 / 127} {
		if got := math.Float32frombits(binary.LittleEndian.Uint32(p[4*b:])); got != want {
			t.Errorf("scale %d = %v, want %v", b, got, want)
		}
	}
	if q := p[12:]; q[65] != 127 || bytes.Count(q, []byte{0}) != 69 {
		t.Errorf("quantised values %v, want 127 at 65 and zeros elsewhere", q)
	}
}

func TestInt8ValuesAreRoundedToNearestAndClampedTo127(t *testing.T) {
	// max 127, so scale 1 and every value is its own rounding.
	x := []float32{127, -127, 0.49, 0.51, -0.51, 1.5, 2.5, -2.5, 126.6, 3, 0, -0, 5, 6, 7, 8}
	want := []int8{127, -127, 0, 1, -1, 2, 2, -2, 127, 3, 0, 0, 5, 6, 7, 8}
	p := Spec{Kind: Int8, Block: 16}.Encode(nil, x)
	if s := math.Float32frombits(binary.LittleEndian.Uint32(p)); s != 1 {
		t.Fatalf("scale %v, want 1", s)
	}
	for i, q := range p[4:] {
		if int8(q) != want[i] {
			t.Errorf("x[%d] = %v quantised to %d, want %d", i, x[i], int8(q), want[i])
		}
	}
	// The largest finite values do not overflow.
	big := []float32{math.MaxFloat32, -math.MaxFloat32, 1e38, 0, 0, 0, 0, 0}
	got := make([]float32, len(big))
	if err := (Spec{Kind: Int8, Block: 8}).Decode(got, Spec{Kind: Int8, Block: 8}.Encode(nil, big)); err != nil {
		t.Fatal(err)
	}
	checkDecoded(t, Spec{Kind: Int8, Block: 8}, big, got)
}

func TestMaxScaleIsTheLargestScaleThatDecodesFinitely(t *testing.T) {
	for _, g := range []grid{int8Grid, int4Grid} {
		if math.IsInf(float64(g.levels*g.maxScale), 0) {
			t.Fatalf("%v × maxScale = %v", g.levels, g.levels*g.maxScale)
		}
		if up := math.Nextafter32(g.maxScale, math.MaxFloat32); !math.IsInf(float64(g.levels*up), 0) {
			t.Fatalf("%v × the next float32 after maxScale is finite", g.levels)
		}
	}
	if int8Grid.levels != 127 || int4Grid.levels != 7 {
		t.Fatalf("levels %v and %v, want 127 and 7", int8Grid.levels, int4Grid.levels)
	}
}

func TestBF16RoundsToNearestEvenAndKeepsNaN(t *testing.T) {
	f := math.Float32frombits
	for _, c := range []struct {
		in   float32
		want uint16
	}{
		{1, 0x3f80},
		{-2, 0xc000},
		{0, 0x0000},
		{float32(math.Copysign(0, -1)), 0x8000},
		{f(0x3f808000), 0x3f80},         // 1 + 2^-8: a tie, to the even 1
		{f(0x3f818000), 0x3f82},         // 1 + 3·2^-8: a tie, to the even 1 + 2^-6
		{f(0x3f808001), 0x3f81},         // just above the tie rounds up
		{f(0x3f807fff), 0x3f80},         // just below rounds down
		{f(0x7f7fffff), 0x7f80},         // MaxFloat32 rounds to +Inf
		{f(0xff7f7fff), 0xff7f},         // the largest bf16 below -Inf's threshold
		{float32(math.Inf(1)), 0x7f80},  // +Inf
		{float32(math.Inf(-1)), 0xff80}, // -Inf
		{f(0x7fc00000), 0x7fc0},         // quiet NaN
		{f(0x7f800001), 0x7fc0},         // NaN with payload only in the dropped bits: quiet, not Inf
		{f(0xff800001), 0xffc0},         // likewise negative
		{f(0x7fa00000), 0x7fa0},         // signalling NaN with a kept payload: unchanged
		{f(0x00000001), 0x0000},         // the smallest subnormal rounds to 0
		{f(0x00018000), 0x0002},         // subnormal tie to even
	} {
		if got := toBF16(c.in); got != c.want {
			t.Errorf("toBF16(%v = %#08x) = %#04x, want %#04x", c.in, math.Float32bits(c.in), got, c.want)
		}
	}
	// Every bfloat16 survives a round trip, NaNs bit for bit.
	for h := range 1 << 16 {
		if got := toBF16(fromBF16(uint16(h))); got != uint16(h) {
			t.Fatalf("bf16 %#04x came back as %#04x", h, got)
		}
	}
	x := []float32{float32(math.NaN()), f(0x7f800001), float32(math.Inf(-1)), 0.5}
	for _, c := range []Spec{bf16, {Kind: BF16, Zstd: true}} {
		got := make([]float32, len(x))
		if err := c.Decode(got, c.Encode(nil, x)); err != nil {
			t.Fatal(err)
		}
		if !math.IsNaN(float64(got[0])) || !math.IsNaN(float64(got[1])) || !math.IsInf(float64(got[2]), -1) || got[3] != 0.5 {
			t.Errorf("%v: %v came back as %v", c, x, got)
		}
	}
}

func TestInt8AndInt4RefuseToCarryNonFiniteValues(t *testing.T) {
	for _, bad := range []float32{float32(math.NaN()), float32(math.Inf(1)), float32(math.Inf(-1))} {
		x := gaussian(8, 100, 1)
		x[50] = bad
		for _, c := range []Spec{int8x32, {Kind: Int8, Block: 64, Zstd: true}, int4x32, {Kind: Int4, Block: 64, Zstd: true}, {Kind: Int4, Block: 8}} {
			err := c.Decode(make([]float32, len(x)), c.Encode(nil, x))
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "scale NaN") {
				t.Errorf("%v with %v: Decode gave %v, want a NaN scale refused", c, bad, err)
			}
		}
	}
}

func TestMaxEncodedSize(t *testing.T) {
	for _, c := range []struct {
		codec Spec
		n     int
		want  int
	}{
		{fp32, 1000, 4000},
		{bf16, 1000, 2000},
		{int8x32, 1000, 1000 + 4*32}, // ⌈1000/32⌉ = 32 scales
		{Spec{Kind: Int8, Block: 64}, 1024, 1024 + 4*16},
		{Spec{Kind: Int8, Block: 64}, 0, 0},
		{Spec{Kind: BF16, Zstd: true}, 0, 64},
		{Spec{Kind: F32, Zstd: true}, 1 << 20, 4<<20 + 4<<20>>8},
		{int4x32, 1000, 500 + 4*32},
		{int4x32, 1001, 501 + 4*32}, // ⌈1001/2⌉ bytes, ⌈1001/32⌉ = 32 scales
		{int4x32, 1, 1 + 4},
		{Spec{Kind: Int4, Block: 64}, 1024, 512 + 4*16},
		{Spec{Kind: Int4, Block: 64}, 0, 0},
	} {
		if got := c.codec.MaxEncodedSize(c.n); got != c.want {
			t.Errorf("%v.MaxEncodedSize(%d) = %d, want %d", c.codec, c.n, got, c.want)
		}
	}
	// Incompressible input stays within the zstd bound.
	r := rand.New(rand.NewPCG(9, 9))
	for _, n := range []int{0, 1, 7, 1000, 100_000} {
		x := make([]float32, n)
		for i := range x {
			x[i] = math.Float32frombits(r.Uint32() &^ (1 << 30)) // random bits, finite
		}
		for _, c := range allCodecs {
			if c.Zstd {
				if p := c.Encode(nil, x); len(p) > c.MaxEncodedSize(n) {
					t.Errorf("%v of %d random values: %d bytes > MaxEncodedSize %d", c, n, len(p), c.MaxEncodedSize(n))
				}
			}
		}
	}
}

func TestEncodeAndDecodePanicOnAnInvalidCodec(t *testing.T) {
	for name, f := range map[string]func(){
		"Encode":         func() { Spec{Kind: Int8}.Encode(nil, []float32{1}) },
		"Decode":         func() { _ = Spec{}.Decode(make([]float32, 1), []byte{0, 0, 0, 0}) },
		"MaxEncodedSize": func() { Spec{Kind: 9}.MaxEncodedSize(1) },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s did not panic", name)
				}
			}()
			f()
		}()
	}
}

// zstdFrame compresses raw with the given encoder options.
func zstdFrame(t testing.TB, raw []byte, opts ...zstd.EOption) []byte {
	t.Helper()
	e, err := zstd.NewWriter(nil, opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	return e.EncodeAll(raw, nil)
}

func TestDecodeRefusesMalformedPayloads(t *testing.T) {
	i8 := Spec{Kind: Int8, Block: 8}
	x := gaussian(10, 20, 1) // int8/8: 3 scales, 20 values
	valid := i8.Encode(nil, x)
	edit := func(p []byte, f func(b []byte)) []byte {
		b := slices.Clone(p)
		f(b)
		return b
	}
	setScale := func(bits uint32) []byte {
		return edit(valid, func(b []byte) { binary.LittleEndian.PutUint32(b[4:], bits) })
	}
	zf32 := Spec{Kind: F32, Zstd: true}
	raw40 := fp32.Encode(nil, x[:10]) // 10 values, 40 bytes
	shuffled := make([]byte, 40)
	putF32(shuffled, x[:10], true)
	zvalid := zf32.Encode(nil, x[:10])
	skippable := append([]byte{0x50, 0x2a, 0x4d, 0x18, 2, 0, 0, 0, 'h', 'i'}, zvalid...)

	for _, c := range []struct {
		name    string
		codec   Spec
		n       int
		payload []byte
		want    string
	}{
		{"fp32 short", fp32, 10, raw40[:39], "fp32 payload of 39 bytes, 10 values take 40"},
		{"fp32 long", fp32, 9, raw40, "fp32 payload of 40 bytes, 9 values take 36"},
		{"bf16 odd", bf16, 10, make([]byte, 21), "bf16 payload of 21 bytes, 10 values take 20"},
		{"int8 short", i8, 20, valid[:len(valid)-1], "int8/8 payload of 31 bytes, 20 values take 32"},
		{"block size differs", Spec{Kind: Int8, Block: 16}, 20, valid, "20 values take 28"},
		{"int8 NaN scale", i8, 20, setScale(0x7fc00000), "int8 block 1: scale NaN"},
		{"int8 +Inf scale", i8, 20, setScale(0x7f800000), "int8 block 1: scale +Inf"},
		{"int8 negative scale", i8, 20, setScale(math.Float32bits(-0.5)), "int8 block 1: scale -0.5"},
		{"int8 -0 scale", i8, 20, setScale(0x80000000), "int8 block 1: scale -0"},
		{"int8 scale past maxScale", i8, 20, setScale(math.Float32bits(int8Grid.maxScale) + 1), "int8 block 1: scale 2.6"},
		{"int8 value -128", i8, 20, edit(valid, func(b []byte) { b[12+17] = 0x80 }), "int8 value 17 is -128"},
		{"int8 value in a zero block", i8, 20, edit(valid, func(b []byte) { binary.LittleEndian.PutUint32(b[8:], 0); b[12+19] = 3 }), "int8 value 16 is"},
		{"zstd empty", zf32, 10, nil, "zstd header"},
		{"zstd garbage", zf32, 10, []byte("not a zstd frame"), "zstd header"},
		{"zstd truncated", zf32, 10, zvalid[:len(zvalid)-1], "zstd: truncated block"},
		{"zstd truncated header", zf32, 10, zvalid[:5], "zstd header"},
		{"zstd trailing byte", zf32, 10, append(slices.Clone(zvalid), 0), "zstd: frame ends at byte"},
		{"zstd two frames", zf32, 10, append(slices.Clone(zvalid), zvalid...), "zstd: frame ends at byte"},
		{"zstd skippable frame", zf32, 10, skippable, "skippable"},
		{"zstd frame for other values", zf32, 9, zvalid, "declares 40 bytes, want 36"},
		{"zstd without content size", zf32, 10, zstdFrame(t, shuffled, zstd.WithSingleSegment(false)), "does not declare its size"},
		{"zstd with a dictionary id", zf32, 10, zstdFrame(t, shuffled, zstd.WithEncoderDictRaw(77, []byte("dictionary content"))), "needs dictionary 77"},
		{"zstd reserved block type", zf32, 10, edit(zvalid, func(b []byte) { b[6] |= 6 }), "reserved block type"},
		{"zstd corrupt block", zf32, 10, edit(zvalid, func(b []byte) { b[6] = b[6]&^6 | 4; b[9] ^= 0xff }), "zstd: "},
		{"zstd payload over the bound", zf32, 0, make([]byte, 65), "at most 64"},
		{"zstd payload of a raw codec", fp32, 10, zvalid, "fp32 payload of"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := c.codec.Decode(make([]float32, c.n), c.payload)
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want ErrCorrupt saying %q", err, c.want)
			}
		})
	}
	// With a checksum the frame is still accepted.
	got := make([]float32, 10)
	if err := zf32.Decode(got, zstdFrame(t, shuffled, zstd.WithEncoderCRC(true), zstd.WithSingleSegment(true))); err != nil || !slices.Equal(got, x[:10]) {
		t.Fatalf("frame with a checksum: %v", err)
	}
}

// Outboxes write frames to many peers at once: Encode and Decode share the
// zstd encoder, decoder and buffer pools.
func TestCodecsAreSafeForConcurrentUse(t *testing.T) {
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i, c := range allCodecs {
				x := gaussian(uint64(100*g+i), 1000+g*37, 1)
				got, want := make([]float32, len(x)), make([]float32, len(x))
				if err := c.Decode(got, c.Encode(nil, x)); err != nil {
					t.Error(err)
					return
				}
				if c.roundTrip(want, x); !slices.EqualFunc(got, want, sameBits) {
					t.Errorf("%v: values differ when coded concurrently", c)
				}
			}
		})
	}
	wg.Wait()
}

// A zstd frame that expands past the size it declares is refused after at
// most one block, without allocating for what it would have produced.
func TestZstdDecodeNeverExceedsTheDeclaredSize(t *testing.T) {
	bomb := zstdFrame(t, make([]byte, 64<<20)) // 64 MiB of zeros in a few KiB
	const n = 50_000                           // 200 kB, more than a block
	var h zstd.Header
	if err := h.Decode(bomb); err != nil || !h.HasFCS {
		t.Fatalf("header: %v %+v", err, h)
	}
	// Rewrite the declared size to what n values take, keeping the field width.
	lied := slices.Clone(bomb)
	fcsAt := h.HeaderSize - 4
	binary.LittleEndian.PutUint32(lied[fcsAt:], 4*n)
	if err := h.Decode(lied); err != nil || h.FrameContentSize != 4*n {
		t.Fatalf("patched header: %v %+v", err, h)
	}
	c := Spec{Kind: F32, Zstd: true}
	dst := make([]float32, n)
	for _, p := range [][]byte{bomb, lied} {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		err := c.Decode(dst, p)
		runtime.ReadMemStats(&after)
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("bomb of %d bytes decoded: %v", len(p), err)
		}
		if got := after.TotalAlloc - before.TotalAlloc; got > 1<<20 {
			t.Errorf("refusing a %d-byte bomb allocated %d bytes", len(p), got)
		}
		t.Logf("%d-byte bomb: %v", len(p), err)
	}
}

func FuzzDecodeBF16(f *testing.F) {
	for _, x := range testData() {
		f.Add(bf16.Encode(nil, x), uint16(len(x)))
	}
	f.Add([]byte{0x01, 0x7f, 0xc0, 0xff}, uint16(2))
	f.Fuzz(func(t *testing.T, payload []byte, n uint16) {
		dst := make([]float32, n%4096)
		if err := bf16.Decode(dst, payload); err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error without ErrCorrupt: %v", err)
			}
			return
		}
		// bf16 is canonical: every payload of the right size is some
		// tensor's only encoding.
		if again := bf16.Encode(nil, dst); !bytes.Equal(again, payload) {
			t.Fatalf("re-encoding differs from the payload")
		}
	})
}

func FuzzDecodeInt8(f *testing.F) {
	for _, x := range testData() {
		for _, b := range []int{8, 32, 64} {
			f.Add(Spec{Kind: Int8, Block: b}.Encode(nil, x), uint16(len(x)), uint8(b))
		}
	}
	f.Fuzz(func(t *testing.T, payload []byte, n uint16, block uint8) {
		c := Spec{Kind: Int8, Block: MinBlock + int(block)%(256-MinBlock)}
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
		// What decoded re-encodes, and comes back within the error bound.
		again := make([]float32, len(dst))
		if err := c.Decode(again, c.Encode(nil, dst)); err != nil {
			t.Fatalf("re-encoded payload refused: %v", err)
		}
		checkDecoded(t, c, dst, again)
	})
}

func FuzzDecodeZstd(f *testing.F) {
	for _, x := range testData() {
		for _, c := range allCodecs {
			if c.Zstd {
				f.Add(c.Encode(nil, x), uint16(len(x)), byte(c.Kind), uint8(c.Block))
			}
		}
	}
	f.Add(zstdFrame(f, make([]byte, 1<<20)), uint16(1000), byte(F32), uint8(0))
	f.Add(zstdFrame(f, []byte("0123456789abcdef0123456789abcdef0123456789abcdef"), zstd.WithSingleSegment(false)), uint16(12), byte(F32), uint8(0))
	f.Fuzz(func(t *testing.T, payload []byte, n uint16, kind byte, block uint8) {
		c := Spec{Kind: F32 + Kind(kind%4), Zstd: true}
		switch c.Kind {
		case Int8:
			c.Block = MinBlock + int(block)%(256-MinBlock)
		case Int4:
			c.Block = MinBlock + 2*(int(block)%((256-MinBlock)/2))
		}
		dst := make([]float32, n%4096)
		if err := c.Decode(dst, payload); err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error without ErrCorrupt: %v", err)
			}
			return
		}
		again := make([]float32, len(dst))
		if err := c.Decode(again, c.Encode(nil, dst)); err != nil {
			t.Fatalf("re-encoded payload refused: %v", err)
		}
		if c.Kind.blocked() {
			checkDecoded(t, c, dst, again)
		} else if !slices.EqualFunc(dst, again, sameBits) {
			t.Fatalf("%v: values changed on re-encoding", c)
		}
	})
}

// BenchmarkCodec measures encoding and decoding a 2048×128 Gaussian
// activation; throughput is in float32 bytes (4 per value), and B/value
// is the encoded size.
func BenchmarkCodec(b *testing.B) {
	x := gaussian(11, 2048*128, 1)
	for _, c := range allCodecs {
		payload := c.Encode(nil, x)
		b.Run(c.String()+"/encode", func(b *testing.B) {
			b.SetBytes(int64(4 * len(x)))
			buf := make([]byte, 0, c.MaxEncodedSize(len(x)))
			for b.Loop() {
				buf = c.Encode(buf[:0], x)
			}
			b.ReportMetric(float64(len(payload))/float64(len(x)), "B/value")
		})
		b.Run(c.String()+"/decode", func(b *testing.B) {
			b.SetBytes(int64(4 * len(x)))
			dst := make([]float32, len(x))
			for b.Loop() {
				if err := c.Decode(dst, payload); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(payload))/float64(len(x)), "B/value")
		})
	}
}

// The sizes the codecs reach on typical tensors: Gaussian activations,
// ~1e-6 gradients and heavy-tailed values (Gaussian over the square root
// of an exponential, as outlier-prone activations are). Without zstd the
// sizes are exact. With it, fp32 and bf16 save over 10% (the shuffled
// exponent bytes compress), int8 and int4 save as much only on heavy-tailed
// values (Gaussian int8 values are nearly 8 bits of entropy), and zstd
// never costs more than its few bytes of framing.
func TestEncodedBytesPerValue(t *testing.T) {
	const n = 64 * 1024
	r := rand.New(rand.NewPCG(12, 12))
	heavy := make([]float32, n)
	for i := range heavy {
		heavy[i] = float32(r.NormFloat64() / math.Sqrt(r.ExpFloat64()))
	}
	data := []struct {
		name string
		x    []float32
	}{{"activations", gaussian(13, n, 1)}, {"gradients", gaussian(14, n, 1e-6)}, {"heavy-tailed", heavy}}
	raw := map[Kind]float64{F32: 4, BF16: 2}
	t.Logf("%-14s %12s %12s %12s", "B/value", data[0].name, data[1].name, data[2].name)
	for _, c := range allCodecs {
		line := fmt.Sprintf("%-14v", c)
		for _, d := range data {
			bpv := float64(len(c.Encode(nil, d.x))) / n
			want := raw[c.Kind]
			switch c.Kind {
			case Int8:
				want = 1 + 4/float64(c.Block)
			case Int4:
				want = 0.5 + 4/float64(c.Block)
			}
			saves := !c.Kind.blocked() || d.name == "heavy-tailed"
			switch {
			case !c.Zstd && bpv != want:
				t.Errorf("%v on %s: %.4f bytes per value, want %.4f", c, d.name, bpv, want)
			case c.Zstd && saves && bpv > 0.9*want:
				t.Errorf("%v on %s: %.4f bytes per value, want under 90%% of %.4f", c, d.name, bpv, want)
			case c.Zstd && bpv > want+32.0/n:
				t.Errorf("%v on %s: %.4f bytes per value, more than %.4f without zstd", c, d.name, bpv, want)
			}
			line += fmt.Sprintf(" %12.4f", bpv)
		}
		t.Log(line)
	}
}

// FirstNonFinite finds what a receiver would find after Decode: a value
// beyond bfloat16's range arrives as ±Inf in bf16 but stays finite in fp32.
func TestFirstNonFiniteFindsWhatArrivesNonFinite(t *testing.T) {
	nan, inf := float32(math.NaN()), float32(math.Inf(-1))
	for _, c := range []struct {
		spec string
		x    []float32
		want int
	}{
		{"fp32", []float32{1, math.MaxFloat32, -2}, -1},
		{"fp32", []float32{1, 2, nan}, 2},
		{"fp32+zstd", []float32{inf, 1}, 0},
		{"bf16", []float32{1, 3e38, -3e38}, -1},
		{"bf16", []float32{1, -math.MaxFloat32}, 1},
		{"bf16", []float32{nan}, 0},
		{"int8/32", []float32{1, math.MaxFloat32, 3}, -1},
		{"int8/32", []float32{1, 2, 3, inf}, 3},
		{"int4/8", []float32{0, nan}, 1},
	} {
		s, err := Parse(c.spec)
		if err != nil {
			t.Fatal(err)
		}
		if got := s.FirstNonFinite(c.x); got != c.want {
			t.Errorf("%s %v: got %d, want %d", c.spec, c.x, got, c.want)
		}
		if c.want >= 0 {
			continue
		}
		dst := make([]float32, len(c.x))
		if err := s.Decode(dst, s.Encode(nil, c.x)); err != nil {
			t.Fatalf("%s %v: %v", c.spec, c.x, err)
		}
		for i, v := range dst {
			if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
				t.Errorf("%s %v: value %d arrives as %v, FirstNonFinite said all finite", c.spec, c.x, i, v)
			}
		}
	}
}
