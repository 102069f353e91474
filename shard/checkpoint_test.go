package shard

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

var ckConfig = Config{Vocab: 11, DModel: 8, NLayers: 2, NHeads: 2, DFF: 12, SeqLen: 4, RopeTheta: 10000, NormEps: 1e-5}

// initStages builds the stages of c split n ways, initialised from seed.
func initStages(t testing.TB, c Config, n int, seed uint64) []*Stage {
	t.Helper()
	stages, err := NewStages(c, n)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range stages {
		s.Init(seed)
	}
	return stages
}

func writeCheckpointBytes(t testing.TB, meta map[string]string, stages ...*Stage) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := WriteCheckpoint(&buf, meta, stages...); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// rawSafetensors frames a hand-written JSON header and data as a safetensors file.
func rawSafetensors(header string, data []byte) []byte {
	for len(header)%8 != 0 {
		header += " "
	}
	out := binary.LittleEndian.AppendUint64(nil, uint64(len(header)))
	return append(append(out, header...), data...)
}

func sameBits(t *testing.T, what string, got, want []float32) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d values, want %d", what, len(got), len(want))
	}
	for i := range want {
		if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
			t.Fatalf("%s[%d] = %g (%#x), want %g (%#x)", what, i, got[i], math.Float32bits(got[i]), want[i], math.Float32bits(want[i]))
		}
	}
}

func TestCheckpointRoundTripOfTwoStagesIsBitExact(t *testing.T) {
	src := initStages(t, ckConfig, 2, 9)
	// Values a lossy or text encoding would mangle.
	odd := []float32{float32(math.Copysign(0, -1)), float32(math.Inf(1)), float32(math.Inf(-1)),
		math.Float32frombits(0x7fc00123), math.Float32frombits(1), math.MaxFloat32, -math.SmallestNonzeroFloat32}
	copy(src[1].Params[3:], odd)
	meta := map[string]string{"pipeswarm.spec": "name: tiny\nseed: 9\n", "format": "overridden"}

	check := func(t *testing.T, ck *Checkpoint) {
		if got := ck.Metadata["format"]; got != "pt" {
			t.Errorf("metadata format = %q, want pt", got)
		}
		if got := ck.Metadata[MetaLayers]; got != "0-2" {
			t.Errorf("metadata %s = %q, want 0-2", MetaLayers, got)
		}
		if got := ck.Metadata["pipeswarm.spec"]; got != meta["pipeswarm.spec"] {
			t.Errorf("metadata pipeswarm.spec = %q, want %q", got, meta["pipeswarm.spec"])
		}
		if want := len(src[0].Tensors()) + len(src[1].Tensors()); len(ck.Tensors) != want {
			t.Errorf("%d tensors, want %d", len(ck.Tensors), want)
		}
		dst := initStages(t, ckConfig, 2, 1234) // different values, to be overwritten
		for i, s := range dst {
			if err := s.Load(ck); err != nil {
				t.Fatalf("stage %d: %v", i, err)
			}
			sameBits(t, "stage "+strconv.Itoa(i)+" params", s.Params, src[i].Params)
		}
		for _, s := range src {
			for _, tn := range s.Tensors() {
				if !slices.Equal(ck.Tensors[tn.Name].Shape, tn.Shape) {
					t.Errorf("%s: shape %v, want %v", tn.Name, ck.Tensors[tn.Name].Shape, tn.Shape)
				}
			}
		}
	}
	t.Run("stream", func(t *testing.T) {
		ck, err := ReadCheckpoint(bytes.NewReader(writeCheckpointBytes(t, meta, src...)))
		if err != nil {
			t.Fatal(err)
		}
		check(t, ck)
	})
	t.Run("file", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "model.safetensors")
		if err := SaveCheckpoint(path, meta, src...); err != nil {
			t.Fatal(err)
		}
		ck, err := LoadCheckpoint(path)
		if err != nil {
			t.Fatal(err)
		}
		check(t, ck)
	})
}

func TestCheckpointWriteIsDeterministic(t *testing.T) {
	meta := map[string]string{"b": "2", "a": "1", "c": "3"}
	a := writeCheckpointBytes(t, meta, initStages(t, ckConfig, 1, 3)...)
	b := writeCheckpointBytes(t, meta, initStages(t, ckConfig, 1, 3)...)
	if !bytes.Equal(a, b) {
		t.Fatal("the same stages and metadata gave different bytes")
	}
}

func TestStageCheckpointHoldsOnlyItsTensors(t *testing.T) {
	c := ckConfig
	c.NLayers = 3
	stages := initStages(t, c, 3, 4)
	mid := stages[1]
	ck, err := ReadCheckpoint(bytes.NewReader(writeCheckpointBytes(t, nil, mid)))
	if err != nil {
		t.Fatal(err)
	}
	var got, want []string
	for name := range ck.Tensors {
		got = append(got, name)
	}
	for _, tn := range mid.Tensors() {
		want = append(want, tn.Name)
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("stage 1 checkpoint holds %v, want %v", got, want)
	}
	if l := ck.Metadata[MetaLayers]; l != "1-2" {
		t.Fatalf("metadata %s = %q, want 1-2", MetaLayers, l)
	}
	// Stage 0 needs the embedding and layer 0, which this checkpoint lacks.
	fresh := initStages(t, c, 3, 5)
	before := slices.Clone(fresh[0].Params)
	err = fresh[0].Load(ck)
	if !errors.Is(err, ErrCheckpoint) || !strings.Contains(err.Error(), "model.embed_tokens.weight") {
		t.Fatalf("loading stage 1's checkpoint into stage 0: %v, want ErrCheckpoint naming the embedding", err)
	}
	sameBits(t, "stage 0 params after a failed load", fresh[0].Params, before)
	if err := fresh[1].Load(ck); err != nil {
		t.Fatal(err)
	}
	sameBits(t, "stage 1 params", fresh[1].Params, mid.Params)

	// Non-adjacent stages are listed range by range.
	b := writeCheckpointBytes(t, nil, stages[0], stages[2])
	ck, err = ReadCheckpoint(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if l := ck.Metadata[MetaLayers]; l != "0-1,2-3" {
		t.Fatalf("metadata %s = %q, want 0-1,2-3", MetaLayers, l)
	}
}

func TestWriteCheckpointRejectsInconsistentStages(t *testing.T) {
	stages := initStages(t, ckConfig, 2, 1)
	other := ckConfig
	other.DFF = 16
	odd := initStages(t, other, 2, 1)
	short := initStages(t, ckConfig, 2, 1)
	short[0].Params = short[0].Params[:len(short[0].Params)-1]
	for name, ss := range map[string][]*Stage{
		"none":             nil,
		"same stage twice": {stages[0], stages[0]},
		"mixed configs":    {stages[0], odd[1]},
		"short params":     {short[0]},
	} {
		if err := WriteCheckpoint(io.Discard, nil, ss...); !errors.Is(err, ErrCheckpoint) {
			t.Errorf("%s: %v, want ErrCheckpoint", name, err)
		}
	}
}

// The header length and the data offset are multiples of 8 whatever the metadata, the
// header is JSON padded with spaces, and the data is the stage's Params in order.
func TestCheckpointHeaderIsAlignedAndDataIsParamsInOrder(t *testing.T) {
	s := initStages(t, ckConfig, 1, 2)[0]
	for k := range 9 {
		b := writeCheckpointBytes(t, map[string]string{"k": strings.Repeat("x", k)}, s)
		n := binary.LittleEndian.Uint64(b)
		if n%8 != 0 {
			t.Fatalf("metadata of %d bytes: header length %d not a multiple of 8", k, n)
		}
		header := b[8 : 8+n]
		if header[0] != '{' || !json.Valid(header) {
			t.Fatalf("header is not a JSON object: %q", header)
		}
		if trimmed := bytes.TrimRight(header, " "); len(header)-len(trimmed) >= 8 {
			t.Fatalf("%d bytes of padding", len(header)-len(trimmed))
		}
		var h map[string]json.RawMessage
		if err := json.Unmarshal(header, &h); err != nil {
			t.Fatal(err)
		}
		for _, tn := range s.Tensors() {
			var e struct {
				Dtype       string
				Shape       []int
				DataOffsets []int `json:"data_offsets"`
			}
			if err := json.Unmarshal(h[tn.Name], &e); err != nil {
				t.Fatalf("%s: %v", tn.Name, err)
			}
			if e.Dtype != "F32" || !slices.Equal(e.Shape, tn.Shape) || !slices.Equal(e.DataOffsets, []int{4 * tn.Off, 4 * (tn.Off + tn.Len())}) {
				t.Fatalf("%s: header entry %+v, want F32 %v at [%d,%d)", tn.Name, e, tn.Shape, 4*tn.Off, 4*(tn.Off+tn.Len()))
			}
		}
		data := b[8+n:]
		if len(data) != 4*len(s.Params) {
			t.Fatalf("%d data bytes for %d params", len(data), len(s.Params))
		}
		for i, v := range s.Params {
			if got := binary.LittleEndian.Uint32(data[4*i:]); got != math.Float32bits(v) {
				t.Fatalf("data word %d = %#x, param %#x", i, got, math.Float32bits(v))
			}
		}
	}
}

func f32bytes(vs ...float32) []byte {
	var b []byte
	for _, v := range vs {
		b = binary.LittleEndian.AppendUint32(b, math.Float32bits(v))
	}
	return b
}

func TestReadCheckpointRejectsCorruptInput(t *testing.T) {
	valid := writeCheckpointBytes(t, map[string]string{"a": "b"}, initStages(t, ckConfig, 2, 1)...)
	n := binary.LittleEndian.Uint64(valid)
	withLen := func(l uint64) []byte {
		b := slices.Clone(valid)
		binary.LittleEndian.PutUint64(b, l)
		return b
	}
	two := f32bytes(1, 2)
	four := f32bytes(1, 2, 3, 4)
	cases := []struct {
		name, input, mention string
	}{
		{"empty", "", "header length"},
		{"truncated length", string(valid[:5]), "header length"},
		{"truncated header", string(valid[:8+n/2]), "header"},
		{"truncated data", string(valid[:len(valid)-1]), "lm_head.weight"},
		{"trailing data", string(valid) + "x", "past the last tensor"},
		{"header length beyond the file", string(withLen(uint64(len(valid)))), "only"},
		{"header length over the limit", string(withLen(MaxCheckpointHeader + 1)), "header length"},
		{"header length huge", string(withLen(math.MaxUint64)), "header length"},
		{"header length zero", string(withLen(0)), "header length"},
		{"not JSON", string(rawSafetensors("hello", nil)), "not a JSON object"},
		{"JSON array", string(rawSafetensors("[1,2]", nil)), "not a JSON object"},
		{"unclosed JSON", string(rawSafetensors(`{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}`, two)), "JSON"},
		{"bad JSON value", string(rawSafetensors(`{"w":}`, nil)), "JSON"},
		{"garbage after JSON", string(rawSafetensors(`{} {}`, nil)), "trailing"},
		{"repeated tensor", string(rawSafetensors(`{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, two)), `"w"`},
		{"non-string metadata", string(rawSafetensors(`{"__metadata__":{"a":1}}`, nil)), "__metadata__"},
		{"entry not an object", string(rawSafetensors(`{"w":[1]}`, nil)), `"w"`},
		{"wrong dtype", string(rawSafetensors(`{"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}`, two[:4])), `tensor "w": dtype "F16"`},
		{"no dtype", string(rawSafetensors(`{"w":{"shape":[2],"data_offsets":[0,8]}}`, two)), `"w"`},
		{"no shape", string(rawSafetensors(`{"w":{"dtype":"F32","data_offsets":[0,8]}}`, two)), `"w"`},
		{"no offsets", string(rawSafetensors(`{"w":{"dtype":"F32","shape":[2]}}`, two)), `"w"`},
		{"three offsets", string(rawSafetensors(`{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}`, two)), `"w"`},
		{"negative offset", string(rawSafetensors(`{"w":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}}`, two)), `"w"`},
		{"end before begin", string(rawSafetensors(`{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}`, two)), `"w"`},
		{"fractional offset", string(rawSafetensors(`{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8.5]}}`, two)), `"w"`},
		{"negative dimension", string(rawSafetensors(`{"w":{"dtype":"F32","shape":[-2,-1],"data_offsets":[0,8]}}`, two)), `"w"`},
		{"overflowing shape", string(rawSafetensors(`{"w":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,8]}}`, two)), `"w"`},
		{"shape larger than data", string(rawSafetensors(`{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}`, two)), `tensor "w": shape [3]`},
		{"shape smaller than data", string(rawSafetensors(`{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,8]}}`, two)), `tensor "w": shape [1]`},
		{"overlapping offsets", string(rawSafetensors(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}`, f32bytes(1, 2, 3))), `tensor "b"`},
		{"same offsets", string(rawSafetensors(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`, two)), `tensor "b"`},
		{"gap between tensors", string(rawSafetensors(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}`, four)), `tensor "b"`},
		{"data not from zero", string(rawSafetensors(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, two)), `tensor "a"`},
		{"claims a huge tensor", string(rawSafetensors(`{"w":{"dtype":"F32","shape":[1000000000],"data_offsets":[0,4000000000]}}`, two)), `tensor "w"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ck, err := ReadCheckpoint(strings.NewReader(tc.input))
			if !errors.Is(err, ErrCheckpoint) {
				t.Fatalf("got %v, %v; want an ErrCheckpoint", ck, err)
			}
			if !strings.Contains(err.Error(), tc.mention) {
				t.Fatalf("error %q does not mention %q", err, tc.mention)
			}
			// The file path, which knows the size up front, must agree.
			path := filepath.Join(t.TempDir(), "ck.safetensors")
			if err := os.WriteFile(path, []byte(tc.input), 0o644); err != nil {
				t.Fatal(err)
			}
			if _, err := LoadCheckpoint(path); !errors.Is(err, ErrCheckpoint) {
				t.Fatalf("LoadCheckpoint: %v, want an ErrCheckpoint", err)
			}
		})
	}
}

func TestReadCheckpointAcceptsWhatTheFormatAllows(t *testing.T) {
	// Tensors listed out of data order, a scalar, an empty tensor, no metadata, extra
	// fields, whitespace: all valid safetensors.
	h := `{ "b": {"data_offsets":[4,12], "shape":[2,1], "dtype":"F32", "extra":1},
	        "s": {"dtype":"F32","shape":[],"data_offsets":[0,4]},
	        "e": {"dtype":"F32","shape":[0,3],"data_offsets":[12,12]} }`
	ck, err := ReadCheckpoint(bytes.NewReader(rawSafetensors(h, f32bytes(7, 1, 2))))
	if err != nil {
		t.Fatal(err)
	}
	if len(ck.Metadata) != 0 || len(ck.Tensors) != 3 {
		t.Fatalf("metadata %v, %d tensors", ck.Metadata, len(ck.Tensors))
	}
	if s := ck.Tensors["s"]; len(s.Shape) != 0 || !slices.Equal(s.Data, []float32{7}) {
		t.Fatalf("scalar = %+v", s)
	}
	if b := ck.Tensors["b"]; !slices.Equal(b.Shape, []int{2, 1}) || !slices.Equal(b.Data, []float32{1, 2}) {
		t.Fatalf("b = %+v", b)
	}
	if e := ck.Tensors["e"]; !slices.Equal(e.Shape, []int{0, 3}) || len(e.Data) != 0 {
		t.Fatalf("e = %+v", e)
	}
}

func TestStageLoadRejectsShapeMismatch(t *testing.T) {
	src := initStages(t, ckConfig, 1, 1)[0]
	ck, err := ReadCheckpoint(bytes.NewReader(writeCheckpointBytes(t, nil, src)))
	if err != nil {
		t.Fatal(err)
	}
	const name = "model.layers.1.mlp.up_proj.weight"
	good := ck.Tensors[name]

	dst := initStages(t, ckConfig, 1, 2)[0]
	before := slices.Clone(dst.Params)
	ck.Tensors[name] = CheckpointTensor{Shape: []int{good.Shape[1], good.Shape[0]}, Data: good.Data}
	if err := dst.Load(ck); !errors.Is(err, ErrCheckpoint) || !strings.Contains(err.Error(), name) {
		t.Fatalf("transposed %s: %v, want ErrCheckpoint naming it", name, err)
	}
	ck.Tensors[name] = CheckpointTensor{Shape: good.Shape, Data: good.Data[1:]}
	if err := dst.Load(ck); !errors.Is(err, ErrCheckpoint) || !strings.Contains(err.Error(), name) {
		t.Fatalf("short %s: %v, want ErrCheckpoint naming it", name, err)
	}
	sameBits(t, "params after failed loads", dst.Params, before)

	// A checkpoint of a wider model does not load.
	wide := ckConfig
	wide.DFF = 16
	dstWide := initStages(t, wide, 1, 2)[0]
	ck.Tensors[name] = good
	if err := dstWide.Load(ck); !errors.Is(err, ErrCheckpoint) || !strings.Contains(err.Error(), "gate_proj") {
		t.Fatalf("d_ff 12 checkpoint into a d_ff 16 stage: %v, want ErrCheckpoint naming gate_proj", err)
	}
}

func FuzzReadCheckpoint(f *testing.F) {
	tiny := Config{Vocab: 3, DModel: 2, NLayers: 1, NHeads: 1, DFF: 2, SeqLen: 2, RopeTheta: 10000, NormEps: 1e-5}
	stages := initStages(f, tiny, 1, 1)
	f.Add(writeCheckpointBytes(f, map[string]string{"k": "v"}, stages...))
	f.Add(rawSafetensors(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}`, f32bytes(1, 2, 3)))
	f.Add(rawSafetensors(`{"__metadata__":{"format":"pt"},"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}`, f32bytes(1)))
	f.Add(rawSafetensors(`{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}`, f32bytes(1, 2, 3)))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		ck, err := ReadCheckpoint(bytes.NewReader(b))
		ck2, err2 := readCheckpoint(bytes.NewReader(b), int64(len(b)), true)
		if (err == nil) != (err2 == nil) {
			t.Fatalf("stream and sized reads disagree: %v vs %v", err, err2)
		}
		if err != nil {
			if !errors.Is(err, ErrCheckpoint) || !errors.Is(err2, ErrCheckpoint) {
				t.Fatalf("errors %v, %v do not wrap ErrCheckpoint", err, err2)
			}
			return
		}
		if ck.Metadata == nil || len(ck.Tensors) != len(ck2.Tensors) {
			t.Fatalf("metadata %v; %d vs %d tensors", ck.Metadata, len(ck.Tensors), len(ck2.Tensors))
		}
		var total int
		for name, ct := range ck.Tensors {
			n := 1
			for _, d := range ct.Shape {
				n *= d
			}
			if n != len(ct.Data) {
				t.Fatalf("%s: shape %v, %d values", name, ct.Shape, len(ct.Data))
			}
			total += n
		}
		if hl := binary.LittleEndian.Uint64(b); 8+hl+4*uint64(total) != uint64(len(b)) {
			t.Fatalf("accepted %d bytes holding %d values after a %d-byte header", len(b), total, hl)
		}
		// Whatever parses must load into a stage or be refused cleanly.
		s := initStages(t, tiny, 1, 2)[0]
		if err := s.Load(ck); err != nil && !errors.Is(err, ErrCheckpoint) {
			t.Fatal(err)
		}
	})
}

func dirEntries(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

func TestSaveCheckpointIsAtomicAndLeavesNoTempFile(t *testing.T) {
	stages := initStages(t, ckConfig, 2, 1)

	t.Run("replaces an existing file", func(t *testing.T) {
		dir := t.TempDir()
		path := filepath.Join(dir, "model.safetensors")
		if err := os.WriteFile(path, []byte("old"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := SaveCheckpoint(path, nil, stages...); err != nil {
			t.Fatal(err)
		}
		if got := dirEntries(t, dir); !slices.Equal(got, []string{"model.safetensors"}) {
			t.Fatalf("directory holds %v", got)
		}
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o644 {
			t.Fatalf("mode %v, want 0644", st.Mode().Perm())
		}
		b, _ := os.ReadFile(path)
		if !bytes.Equal(b, writeCheckpointBytes(t, nil, stages...)) {
			t.Fatal("file differs from WriteCheckpoint's bytes")
		}
	})
	t.Run("writing fails", func(t *testing.T) {
		dir := t.TempDir()
		path := filepath.Join(dir, "model.safetensors")
		if err := os.WriteFile(path, []byte("old"), 0o644); err != nil {
			t.Fatal(err)
		}
		short := initStages(t, ckConfig, 1, 1)[0]
		short.Params = short.Params[:10]
		if err := SaveCheckpoint(path, nil, short); !errors.Is(err, ErrCheckpoint) {
			t.Fatalf("saving a broken stage: %v, want ErrCheckpoint", err)
		}
		boom := errors.New("disk full")
		err := writeFileAtomic(path, func(w io.Writer) error {
			w.Write(make([]byte, 1<<20))
			return boom
		})
		if !errors.Is(err, boom) {
			t.Fatalf("failing write: %v", err)
		}
		if got := dirEntries(t, dir); !slices.Equal(got, []string{"model.safetensors"}) {
			t.Fatalf("directory holds %v, want only the old file", got)
		}
		if b, _ := os.ReadFile(path); string(b) != "old" {
			t.Fatalf("old file now holds %d bytes", len(b))
		}
	})
	t.Run("rename fails", func(t *testing.T) {
		dir := t.TempDir()
		path := filepath.Join(dir, "model.safetensors")
		// A non-empty directory in the way: the temp file is written, the rename fails.
		if err := os.MkdirAll(filepath.Join(path, "x"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := SaveCheckpoint(path, nil, stages...); err == nil {
			t.Fatal("saved over a directory")
		}
		if got := dirEntries(t, dir); !slices.Equal(got, []string{"model.safetensors"}) {
			t.Fatalf("directory holds %v", got)
		}
	})
	t.Run("directory missing", func(t *testing.T) {
		dir := t.TempDir()
		if err := SaveCheckpoint(filepath.Join(dir, "no", "model.safetensors"), nil, stages...); err == nil {
			t.Fatal("saved into a missing directory")
		}
		if got := dirEntries(t, dir); len(got) != 0 {
			t.Fatalf("directory holds %v", got)
		}
	})
	t.Run("directory unwritable", func(t *testing.T) {
		dir := t.TempDir()
		if err := os.Chmod(dir, 0o500); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Chmod(dir, 0o700) })
		if f, err := os.CreateTemp(dir, "probe"); err == nil {
			f.Close()
			os.Remove(f.Name())
			t.Skip("running with privileges that ignore directory permissions")
		}
		if err := SaveCheckpoint(filepath.Join(dir, "model.safetensors"), nil, stages...); err == nil {
			t.Fatal("saved into a read-only directory")
		}
		if got := dirEntries(t, dir); len(got) != 0 {
			t.Fatalf("directory holds %v", got)
		}
	})
}

func TestHFConfigDescribesLlamaForCausalLM(t *testing.T) {
	c := Config{Vocab: 256, DModel: 128, NLayers: 4, NHeads: 4, DFF: 352, SeqLen: 128, RopeTheta: 10000, NormEps: 1e-5}
	b, err := HFConfig(c)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("%v in %s", err, b)
	}
	want := map[string]any{
		"architectures":           []any{"LlamaForCausalLM"},
		"model_type":              "llama",
		"vocab_size":              256.0,
		"hidden_size":             128.0,
		"intermediate_size":       352.0,
		"num_hidden_layers":       4.0,
		"num_attention_heads":     4.0,
		"num_key_value_heads":     4.0,
		"head_dim":                32.0,
		"max_position_embeddings": 128.0,
		"rms_norm_eps":            1e-5,
		"rope_theta":              10000.0,
		"rope_scaling":            nil,
		"hidden_act":              "silu",
		"initializer_range":       0.02,
		"tie_word_embeddings":     false,
		"attention_bias":          false,
		"attention_dropout":       0.0,
		"mlp_bias":                false,
		"pretraining_tp":          1.0,
		"use_cache":               true,
		"torch_dtype":             "float32",
	}
	for k, w := range want {
		g, ok := got[k]
		if !ok {
			t.Errorf("%s missing", k)
			continue
		}
		if gj, wj := mustJSON(t, g), mustJSON(t, w); gj != wj {
			t.Errorf("%s = %s, want %s", k, gj, wj)
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("unexpected field %s", k)
		}
	}
	if !bytes.Contains(b, []byte(`"rms_norm_eps": 1e-05`)) {
		t.Errorf("rms_norm_eps not written as the float32's shortest decimal:\n%s", b)
	}
	bad := c
	bad.NHeads = 3
	if _, err := HFConfig(bad); !errors.Is(err, ErrConfig) {
		t.Errorf("invalid config: %v, want ErrConfig", err)
	}
	bad = c
	bad.RopeTheta = math.Inf(1)
	if _, err := HFConfig(bad); !errors.Is(err, ErrConfig) {
		t.Errorf("infinite rope_theta: %v, want ErrConfig", err)
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

const python = "/usr/bin/python3"

// The model computes what Hugging Face's LlamaForCausalLM computes: a full checkpoint
// of a 2-stage model, with the config.json HFConfig writes, gives the same next-byte
// loss in an independent PyTorch transcription of modeling_llama.py
// (bench/hf_llama_loss.py), and in transformers itself where it is installed.
func TestCheckpointLossMatchesPyTorchLlama(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PyTorch; skipped in -short")
	}
	if out, err := exec.Command(python, "-c", "import torch").CombinedOutput(); err != nil {
		t.Skipf("PyTorch parity needs %s with torch importable (apt install python3-torch): %v %s", python, err, bytes.TrimSpace(out))
	}
	c := Config{Vocab: 256, DModel: 32, NLayers: 2, NHeads: 4, DFF: 64, SeqLen: 16, RopeTheta: 10000, NormEps: 1e-5}
	stages := initStages(t, c, 2, 17)
	// Move well away from a fresh init, whose near-uniform logits and attention would
	// hide errors: larger matrices, larger still for q and k so that attention is
	// peaked and position matters (a 1% error in the RoPE angles then moves the loss by
	// 1.6e-3), and unequal norm gains.
	rng := rand.New(rand.NewPCG(17, 17))
	for _, s := range stages {
		for _, tn := range s.Tensors() {
			scale := float32(10)
			if strings.HasSuffix(tn.Name, "q_proj.weight") || strings.HasSuffix(tn.Name, "k_proj.weight") {
				scale = 20
			}
			v := tn.View(s.Params)
			for i := range v {
				if len(tn.Shape) == 1 {
					v[i] = float32(0.5 + rng.Float64())
				} else {
					v[i] *= scale
				}
			}
		}
	}

	dir := t.TempDir()
	ckPath, dataPath := filepath.Join(dir, "model.safetensors"), filepath.Join(dir, "text.txt")
	cfgJSON, err := HFConfig(c)
	if err != nil {
		t.Fatal(err)
	}
	meta := map[string]string{"pipeswarm.config": string(mustJSON(t, c))}
	if err := SaveCheckpoint(ckPath, meta, stages...); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), cfgJSON, 0o644); err != nil {
		t.Fatal(err)
	}
	text := []byte(strings.Repeat("Peers pass the residual stream along; naïve café → 日本語 ∑λ. ", 4))
	if err := os.WriteFile(dataPath, text, 0o644); err != nil {
		t.Fatal(err)
	}

	// Go: the same windows, through both stages.
	const windows = 8
	T := c.SeqLen
	tokens, targets := make([]int32, windows*T), make([]int32, windows*T)
	for w := range windows {
		for i := range T {
			tokens[w*T+i] = int32(text[w*(T+1)+i])
			targets[w*T+i] = int32(text[w*(T+1)+i+1])
		}
	}
	t0, t1 := stages[0].NewTape(windows, T), stages[1].NewTape(windows, T)
	stages[1].Forward(t1, nil, stages[0].Forward(t0, tokens, nil))
	goLoss := stages[1].Loss(t1, targets, 1)
	if math.Abs(goLoss-math.Log(256)) < 0.1 {
		t.Fatalf("Go loss %.6f is too close to uniform ln 256 for the comparison to mean much", goLoss)
	}

	const script = "../bench/hf_llama_loss.py"
	// Read it here so that go test's cache reruns this test when the script changes.
	if _, err := os.ReadFile(script); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, python, script, "--checkpoint", ckPath,
		"--data", dataPath, "--seq-len", strconv.Itoa(T), "--windows", strconv.Itoa(windows))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("hf_llama_loss.py: %v\n%s", err, stderr.Bytes())
	}
	var res map[string]float64
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("hf_llama_loss.py printed %q: %v", out, err)
	}
	torchLoss, ok := res["loss"]
	if !ok {
		t.Fatalf("hf_llama_loss.py printed no loss: %s", out)
	}
	hfNote := "transformers not installed"
	if hf, ok := res["loss_transformers"]; ok {
		hfNote = "transformers " + strconv.FormatFloat(hf, 'f', 7, 64)
	}
	t.Logf("loss over %d windows of %d: Go %.7f, PyTorch %.7f (relative difference %.2g); %s", windows, T, goLoss, torchLoss, math.Abs(goLoss-torchLoss)/torchLoss, hfNote)
	if math.Abs(goLoss-torchLoss) > 1e-4*math.Abs(torchLoss) {
		t.Fatalf("Go loss %.7f, PyTorch Llama %.7f: relative difference above 1e-4", goLoss, torchLoss)
	}
	if hf, ok := res["loss_transformers"]; ok && math.Abs(goLoss-hf) > 1e-4*math.Abs(hf) {
		t.Fatalf("Go loss %.7f, transformers LlamaForCausalLM %.7f: relative difference above 1e-4", goLoss, hf)
	}
}

func TestCheckpointMetadataIsReadWithoutTheData(t *testing.T) {
	stages := initStages(t, ckConfig, 1, 1)
	path := filepath.Join(t.TempDir(), "ck.safetensors")
	if err := SaveCheckpoint(path, map[string]string{"step": "7"}, stages...); err != nil {
		t.Fatal(err)
	}
	meta, err := ReadCheckpointMetadata(path)
	if err != nil || meta["step"] != "7" {
		t.Fatalf("metadata %v, %v; want step 7", meta, err)
	}
	if err := os.WriteFile(path, []byte{3, 0, 0, 0, 0, 0, 0, 0, '{'}, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadCheckpointMetadata(path); !errors.Is(err, ErrCheckpoint) {
		t.Errorf("a truncated header: %v, want ErrCheckpoint", err)
	}
}

// A checkpoint records the precision its stages trained at, and keeps the float32
// master weights bit for bit whatever that precision was.
func TestCheckpointRecordsPrecisionAndKeepsFloat32Weights(t *testing.T) {
	c := Config{Vocab: 16, DModel: 8, NLayers: 2, NHeads: 2, DFF: 12, SeqLen: 4, RopeTheta: 10000, NormEps: 1e-5}
	for _, be := range backends(t) {
		stages, err := NewStages(c, 2, WithBackend(be))
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range stages {
			s.Init(3)
		}
		path := filepath.Join(t.TempDir(), "m.safetensors")
		if err := SaveCheckpoint(path, nil, stages...); err != nil {
			t.Fatal(err)
		}
		ck, err := LoadCheckpoint(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := ck.Metadata[MetaPrecision]; got != be.Precision() {
			t.Fatalf("%s: %s = %q, want %q", be.Name(), MetaPrecision, got, be.Precision())
		}
		for _, s := range stages {
			for _, tn := range s.Tensors() {
				sameBits(t, be.Name()+" "+tn.Name, ck.Tensors[tn.Name].Data, tn.View(s.Params))
			}
		}
	}
	if len(backends(t)) < 2 {
		return
	}
	a, _ := NewStage(c, Range{0, 1}, true, false, WithBackend(backends(t)[0]))
	b, _ := NewStage(c, Range{1, 2}, false, true, WithBackend(backends(t)[1]))
	if err := WriteCheckpoint(io.Discard, nil, a, b); !errors.Is(err, ErrCheckpoint) {
		t.Fatalf("stages of two precisions in one checkpoint: %v, want ErrCheckpoint", err)
	}
}

// A byte changed anywhere in a checkpoint or state file (header length, JSON,
// padding, the checksum itself, tensor data) fails the read, as a checksum
// mismatch or as a malformed file; never a silent load.
func TestAByteFlippedAnywhereInACheckpointOrStateFileIsDetected(t *testing.T) {
	src := initStages(t, ckConfig, 1, 3)
	dir := t.TempDir()
	weights, state := filepath.Join(dir, "stage-0.safetensors"), filepath.Join(dir, "stage-0.state.safetensors")
	if err := SaveCheckpoint(weights, map[string]string{"pipeswarm.step": "120"}, src...); err != nil {
		t.Fatal(err)
	}
	n := len(src[0].Params)
	m, v := make([]float32, n), make([]float32, n)
	for i := range m {
		m[i], v[i] = float32(i)*1e-3, float32(i%7)*1e-4
	}
	if err := SaveTensors(state, map[string]string{"adam_step": "120"}, []Named{{"adam_m", m}, {"adam_v", v}}); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{weights, state} {
		good, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		ck, err := ReadCheckpoint(bytes.NewReader(good))
		if err != nil || !ck.Sealed {
			t.Fatalf("%s as written: sealed %v, %v", path, ck != nil && ck.Sealed, err)
		}
		// Every byte of the header and its neighbourhood, and a spread of the data.
		hlen := 8 + int(binary.LittleEndian.Uint64(good))
		rng := rand.New(rand.NewPCG(1, uint64(len(good))))
		var positions []int
		for i := range min(hlen+64, len(good)) {
			positions = append(positions, i)
		}
		for range 2000 {
			positions = append(positions, hlen+rng.IntN(len(good)-hlen))
		}
		positions = append(positions, len(good)-1)
		bad := make([]byte, len(good))
		for _, i := range positions {
			copy(bad, good)
			bad[i] ^= byte(1 + rng.IntN(255)) // a change, never none
			// A change in the checksum's key leaves a file without one: read as
			// another tool's (not Sealed), refused by LoadSealed.
			if ck, err := ReadCheckpoint(bytes.NewReader(bad)); err == nil && ck.Sealed {
				t.Fatalf("%s: byte %d changed from %#x to %#x, and the file read as sealed", filepath.Base(path), i, good[i], bad[i])
			} else if err != nil && !errors.Is(err, ErrCheckpoint) {
				t.Fatalf("%s: byte %d: %v, want ErrCheckpoint", filepath.Base(path), i, err)
			}
		}
		// A change in the checksum's key: LoadSealed refuses the file.
		k := bytes.Index(good, []byte(MetaSHA256))
		copy(bad, good)
		bad[k+2] ^= 0x83
		if err := os.WriteFile(path, bad, 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadSealed(path); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("a file whose checksum key changed: %v, want ErrCorrupt", err)
		}
		// On disk the same: LoadCheckpoint and VerifyCheckpoint name the file.
		i := hlen + rng.IntN(len(good)-hlen)
		copy(bad, good)
		bad[i] ^= 0x40
		if err := os.WriteFile(path, bad, 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadCheckpoint(path); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), path) {
			t.Fatalf("load of a corrupt %s: %v, want ErrCorrupt naming the file", path, err)
		}
		if _, err := LoadSealed(path); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("sealed load of a corrupt %s: %v, want ErrCorrupt", path, err)
		}
		if _, err := VerifyCheckpoint(path); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("verify of a corrupt %s: %v, want ErrCorrupt", path, err)
		}
	}
}

// FuzzAChangedByteOfASealedFileIsDetected changes one byte of a sealed state file at
// any position to any other value: the read fails, or (the checksum's key changed)
// the file no longer reads as sealed.
func FuzzAChangedByteOfASealedFileIsDetected(f *testing.F) {
	path := filepath.Join(f.TempDir(), "s.safetensors")
	vals := make([]float32, 300)
	for i := range vals {
		vals[i] = float32(i) / 7
	}
	if err := SaveTensors(path, map[string]string{"adam_step": "7", "pipeswarm.step": "7"}, []Named{{"adam_m", vals}, {"adam_v", vals[:100]}}); err != nil {
		f.Fatal(err)
	}
	good, err := os.ReadFile(path)
	if err != nil {
		f.Fatal(err)
	}
	for _, pos := range []uint{0, 7, 8, 20, 60, 100, 150, uint(len(good)) - 1} {
		f.Add(pos, byte(1))
		f.Add(pos, byte(0x80))
	}
	f.Fuzz(func(t *testing.T, pos uint, x byte) {
		if x == 0 {
			return // no change
		}
		bad := slices.Clone(good)
		i := int(pos % uint(len(bad)))
		bad[i] ^= x
		if ck, err := ReadCheckpoint(bytes.NewReader(bad)); err == nil && ck.Sealed {
			t.Fatalf("byte %d changed from %#x to %#x: read as sealed", i, good[i], bad[i])
		}
	})
}
