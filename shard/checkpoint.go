package shard

import (
	"bufio"
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Checkpoints are safetensors files (https://github.com/huggingface/safetensors):
//
//	[8 bytes]  N, the header length, little-endian uint64
//	[N bytes]  JSON: {"__metadata__": {str: str}, "<name>": {"dtype": "F32",
//	           "shape": [...], "data_offsets": [begin, end]}, ...}, padded with spaces
//	           so that the data starts at an 8-byte-aligned offset
//	[...]      the tensors' raw little-endian bytes; offsets are relative to here
//
// Tensor names and shapes are Hugging Face Llama's, so a full checkpoint (all stages)
// loads into transformers' LlamaForCausalLM beside the config.json HFConfig writes.

// ErrCheckpoint is wrapped by every error about a malformed checkpoint, or one that
// does not fit the stage it is loaded into.
var ErrCheckpoint = errors.New("shard: bad checkpoint")

// MaxCheckpointHeader bounds the JSON header ReadCheckpoint accepts, as the reference
// implementation does (100 MB).
const MaxCheckpointHeader = 100_000_000

// Metadata keys that WriteCheckpoint sets itself.
const (
	// MetaFormat is "pt", the value Hugging Face's loaders expect.
	MetaFormat = "format"
	// MetaLayers lists the half-open global layer ranges held, "lo-hi" (hi exclusive),
	// adjacent stages merged: "0-4" for a full 4-layer model, "2-4" for its last half.
	MetaLayers = "pipeswarm.layers"
	// MetaPrecision is the precision the stages trained at, their backend's: "fp32"
	// or "bf16". The tensors are float32 (the master weights) either way.
	MetaPrecision = "pipeswarm.precision"
	// MetaSHA256 is the file's checksum, in hex: sha256 over the whole file as
	// written, with this value's 64 digits as zeros. Every file this package writes
	// carries it, and every read checks it (a file without it, another tool's,
	// reads as before; Checkpoint.Sealed tells which).
	MetaSHA256 = "pipeswarm.sha256"
	// MetaGEMM is the GEMM provider the stages computed with, its library version and
	// kernels: "go: pipeswarm Go kernels, avx512", "onednn: oneDNN 2.6.3 matmul ...".
	MetaGEMM = "pipeswarm.gemm"
)

// ErrCorrupt is wrapped (with ErrCheckpoint) by the error of a read whose bytes do
// not hash to the checksum the file carries: the file changed after it was written.
var ErrCorrupt = errors.New("checksum mismatch")

// sealPlaceholder is MetaSHA256's value while the checksum is computed.
var sealPlaceholder = strings.Repeat("0", 2*sha256.Size)

// Checkpoint is a set of named float32 tensors with string metadata, as stored in a
// safetensors file.
type Checkpoint struct {
	Tensors  map[string]CheckpointTensor
	Metadata map[string]string
	// Sealed says the file carried a checksum (MetaSHA256) and its bytes matched it.
	Sealed bool
}

// CheckpointTensor is one tensor: its shape and its row-major values.
type CheckpointTensor struct {
	Shape []int
	Data  []float32
}

// WriteCheckpoint writes the tensors of the given stages (one stage, or all stages of
// a model = a full checkpoint) and metadata to w in safetensors format, in stage order
// and each stage's Tensors() order. meta is the caller's (run spec, model config, ...);
// MetaFormat, MetaLayers, MetaPrecision and MetaGEMM are set over it. The stages must share one Config and hold
// no tensor twice.
func WriteCheckpoint(w io.Writer, meta map[string]string, stages ...*Stage) error {
	header, err := checkpointHeader(meta, stages)
	if err != nil {
		return err
	}
	seal(header, func(w io.Writer) {
		for _, s := range stages {
			_ = writeFloats(w, s.Params) // a hash takes every write
		}
	})
	bw := bufio.NewWriterSize(w, 1<<16)
	if _, err := bw.Write(header); err != nil {
		return fmt.Errorf("write checkpoint header: %w", err)
	}
	for _, s := range stages {
		if err := writeFloats(bw, s.Params); err != nil {
			return fmt.Errorf("write checkpoint data: %w", err)
		}
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write checkpoint data: %w", err)
	}
	return nil
}

// checkpointHeader validates the stages and returns the length prefix and the padded
// JSON header: metadata first, then the tensors in data order.
func checkpointHeader(meta map[string]string, stages []*Stage) ([]byte, error) {
	if len(stages) == 0 {
		return nil, fmt.Errorf("%w: no stages to write", ErrCheckpoint)
	}
	m := make(map[string]string, len(meta)+3)
	for k, v := range meta {
		m[k] = v
	}
	m[MetaFormat] = "pt"
	m[MetaLayers] = layersString(stages)
	m[MetaPrecision] = stages[0].be.Precision()
	if g := stages[0].be.GEMM(); g != nil {
		m[MetaGEMM] = g.Name + ": " + g.Describe()
	}
	h, err := newHeader(m)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	for _, s := range stages {
		if s.Config != stages[0].Config {
			return nil, fmt.Errorf("%w: stages of different model configs (%+v, %+v)", ErrCheckpoint, stages[0].Config, s.Config)
		}
		if p := s.be.Precision(); p != m[MetaPrecision] {
			return nil, fmt.Errorf("%w: stages trained at different precisions (%s, %s)", ErrCheckpoint, m[MetaPrecision], p)
		}
		if len(s.Params) != s.lay.size {
			return nil, fmt.Errorf("%w: stage %d-%d has %d parameters, its layout %d", ErrCheckpoint, s.Layers.Lo, s.Layers.Hi, len(s.Params), s.lay.size)
		}
		for _, t := range s.Tensors() {
			if seen[t.Name] {
				return nil, fmt.Errorf("%w: tensor %q held by two stages", ErrCheckpoint, t.Name)
			}
			seen[t.Name] = true
			h.add(t.Name, t.Shape, t.Len())
		}
	}
	return h.finish(), nil
}

// header builds a safetensors header: an 8-byte length, then JSON with the metadata
// first and the F32 tensors in data order, padded with spaces to a multiple of 8.
type header struct {
	b   bytes.Buffer
	off int
}

func newHeader(meta map[string]string) (*header, error) {
	m := make(map[string]string, len(meta)+1)
	for k, v := range meta {
		m[k] = v
	}
	m[MetaSHA256] = sealPlaceholder // seal fills it in
	mj, err := json.Marshal(m)      // sorted keys: the same inputs give the same bytes
	if err != nil {
		return nil, fmt.Errorf("%w: metadata: %v", ErrCheckpoint, err)
	}
	h := &header{}
	h.b.Write(make([]byte, 8))
	h.b.WriteString(`{"__metadata__":`)
	h.b.Write(mj)
	return h, nil
}

func (h *header) add(name string, shape []int, n int) {
	nj, _ := json.Marshal(name)
	sj, _ := json.Marshal(shape)
	end := h.off + 4*n
	fmt.Fprintf(&h.b, `,%s:{"dtype":"F32","shape":%s,"data_offsets":[%d,%d]}`, nj, sj, h.off, end)
	h.off = end
}

func (h *header) finish() []byte {
	h.b.WriteByte('}')
	for h.b.Len()%8 != 0 {
		h.b.WriteByte(' ')
	}
	b := h.b.Bytes()
	binary.LittleEndian.PutUint64(b, uint64(len(b)-8))
	return b
}

// sealField is how MetaSHA256 appears in a header, up to its value.
var sealField = []byte(`"` + MetaSHA256 + `":"`)

// seal puts into header (from newHeader) the checksum of the file it begins: the
// header with the placeholder, then what data writes.
func seal(header []byte, data func(io.Writer)) {
	i := bytes.Index(header, []byte(`"`+MetaSHA256+`":"`+sealPlaceholder+`"`))
	h := sha256.New()
	h.Write(header)
	data(h)
	hex.Encode(header[i+len(sealField):], h.Sum(nil))
}

// unsealed is header with its checksum's digits as zeros, and the checksum, if
// it carries one (sum is nil if not). A header whose metadata names a checksum
// that is not where the writer puts it is corrupt.
func unsealed(header []byte, meta map[string]string) (zeroed, sum []byte, err error) {
	want, ok := meta[MetaSHA256]
	if !ok {
		return header, nil, nil
	}
	sum, err = hex.DecodeString(want)
	if err != nil || len(sum) != sha256.Size || hex.EncodeToString(sum) != want { // lower case, as written
		return nil, nil, fmt.Errorf("%w: %w: %s %q is not a sha256", ErrCheckpoint, ErrCorrupt, MetaSHA256, want)
	}
	field := append(slices.Clone(sealField), want...)
	i := bytes.Index(header, field)
	if i < 0 || bytes.Count(header, sealField) != 1 {
		return nil, nil, fmt.Errorf("%w: %w: the header's checksum field is not as written", ErrCheckpoint, ErrCorrupt)
	}
	zeroed = slices.Clone(header)
	copy(zeroed[i+len(sealField):], sealPlaceholder)
	return zeroed, sum, nil
}

// writeFloats writes v as little-endian float32s through a small buffer.
func writeFloats(w io.Writer, v []float32) error {
	var buf [4096]byte
	for i := 0; i < len(v); i += len(buf) / 4 {
		chunk := v[i:min(i+len(buf)/4, len(v))]
		for j, x := range chunk {
			binary.LittleEndian.PutUint32(buf[4*j:], math.Float32bits(x))
		}
		if _, err := w.Write(buf[:4*len(chunk)]); err != nil {
			return err
		}
	}
	return nil
}

// layersString renders the stages' layer ranges as "lo-hi[,lo-hi...]", merging
// adjacent ranges.
func layersString(stages []*Stage) string {
	var out []Range
	for _, s := range stages {
		if n := len(out); n > 0 && out[n-1].Hi == s.Layers.Lo {
			out[n-1].Hi = s.Layers.Hi
			continue
		}
		out = append(out, s.Layers)
	}
	parts := make([]string, len(out))
	for i, r := range out {
		parts[i] = fmt.Sprintf("%d-%d", r.Lo, r.Hi)
	}
	return strings.Join(parts, ",")
}

// SaveCheckpoint writes the checkpoint to path atomically: to a temporary file in the
// same directory, fsynced, renamed over path, and the directory fsynced. On any error
// the temporary file is removed and path is left as it was. The file gets mode 0644.
func SaveCheckpoint(path string, meta map[string]string, stages ...*Stage) error {
	return writeFileAtomic(path, func(w io.Writer) error { return WriteCheckpoint(w, meta, stages...) })
}

// CopyCheckpoint copies the checkpoint file src to dst as SaveCheckpoint writes one:
// atomically and durably.
func CopyCheckpoint(dst, src string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	return writeFileAtomic(dst, func(w io.Writer) error {
		_, err := io.Copy(w, in)
		return err
	})
}

func writeFileAtomic(path string, write func(io.Writer) error) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("save %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := write(f); err != nil {
		return fmt.Errorf("save %s: %w", path, err)
	}
	if err := f.Chmod(0o644); err != nil {
		return fmt.Errorf("save %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("save %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("save %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("save %s: %w", path, err)
	}
	// The rename is done; make it durable. Failing here leaves a complete file.
	if d, derr := os.Open(dir); derr == nil {
		derr = d.Sync()
		d.Close()
		if derr != nil {
			return fmt.Errorf("save %s: sync directory: %w", path, derr)
		}
	}
	return nil
}

// tensorEntry is one tensor of a safetensors header.
type tensorEntry struct {
	name        string
	Dtype       string  `json:"dtype"`
	Shape       []int64 `json:"shape"`
	DataOffsets []int64 `json:"data_offsets"`
}

// ReadCheckpoint parses a safetensors stream. Only F32 tensors are accepted. The header
// is checked in full before any data is read: its length (at most MaxCheckpointHeader),
// the JSON (one object, no repeated keys, string metadata), each tensor's dtype, shape
// and offsets, that the offsets tile the data exactly (from 0, contiguous, no overlap,
// no gap), and that each shape's product matches its byte length. The data must then
// be exactly as long as the header says. Memory grows with the bytes actually read, not
// with what a header claims. Every error wraps ErrCheckpoint (and the reader's error,
// if any) and names the tensor concerned.
func ReadCheckpoint(r io.Reader) (*Checkpoint, error) { return readCheckpoint(r, -1, true) }

// readCheckpoint is ReadCheckpoint for a stream of known size (-1 if unknown), which
// lets it check the data length before reading and allocate each tensor once. With
// keep false it checks the file and its checksum without keeping the tensors.
func readCheckpoint(r io.Reader, size int64, keep bool) (*Checkpoint, error) {
	var lenBuf [8]byte
	if _, err := io.ReadFull(r, lenBuf[:]); err != nil {
		return nil, fmt.Errorf("%w: header length: %w", ErrCheckpoint, eofIsUnexpected(err))
	}
	n := binary.LittleEndian.Uint64(lenBuf[:])
	if n < 2 || n > MaxCheckpointHeader {
		return nil, fmt.Errorf("%w: header length %d outside 2..%d", ErrCheckpoint, n, MaxCheckpointHeader)
	}
	header, err := io.ReadAll(io.LimitReader(r, int64(n)))
	if err != nil {
		return nil, fmt.Errorf("%w: header: %w", ErrCheckpoint, err)
	}
	if uint64(len(header)) != n {
		return nil, fmt.Errorf("%w: header length %d but only %d bytes follow", ErrCheckpoint, n, len(header))
	}
	meta, entries, err := parseHeader(header)
	if err != nil {
		return nil, err
	}
	zeroed, sum, err := unsealed(header, meta)
	if err != nil {
		return nil, err
	}
	hash := sha256.New()
	hash.Write(lenBuf[:])
	hash.Write(zeroed)
	if size >= 0 {
		var want int64
		if k := len(entries); k > 0 {
			want = entries[k-1].DataOffsets[1]
		}
		if have := size - 8 - int64(n); have != want {
			return nil, fmt.Errorf("%w: header describes %d bytes of data, the file holds %d", ErrCheckpoint, want, have)
		}
	}
	ck := &Checkpoint{Tensors: make(map[string]CheckpointTensor, len(entries)), Metadata: meta}
	var buf [1 << 16]byte
	for _, e := range entries { // in offset order
		elems := int((e.DataOffsets[1] - e.DataOffsets[0]) / 4)
		capacity := elems
		if size < 0 {
			capacity = min(elems, len(buf)/4) // grow with what arrives, not what is claimed
		}
		if !keep {
			capacity = 0
		}
		data := make([]float32, 0, capacity)
		for read := 0; read < elems; {
			k := min(elems-read, len(buf)/4)
			if _, err := io.ReadFull(r, buf[:4*k]); err != nil {
				return nil, fmt.Errorf("%w: tensor %q: data: %w", ErrCheckpoint, e.name, eofIsUnexpected(err))
			}
			hash.Write(buf[:4*k])
			read += k
			if !keep {
				continue
			}
			for j := range k {
				data = append(data, math.Float32frombits(binary.LittleEndian.Uint32(buf[4*j:])))
			}
		}
		shape := make([]int, len(e.Shape))
		for i, d := range e.Shape {
			shape[i] = int(d)
		}
		ck.Tensors[e.name] = CheckpointTensor{Shape: shape, Data: data}
	}
	switch k, err := io.ReadFull(r, buf[:1]); {
	case k > 0:
		return nil, fmt.Errorf("%w: data continues past the last tensor", ErrCheckpoint)
	case err != io.EOF:
		return nil, fmt.Errorf("%w: after the data: %w", ErrCheckpoint, err)
	}
	if sum != nil {
		if got := hash.Sum(nil); !bytes.Equal(got, sum) {
			return nil, fmt.Errorf("%w: %w: the file hashes to %x, it was written as %x", ErrCheckpoint, ErrCorrupt, got, sum)
		}
		ck.Sealed = true
	}
	return ck, nil
}

func eofIsUnexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// parseHeader decodes and validates a safetensors JSON header; it returns the metadata
// and the tensors sorted by data offset.
func parseHeader(header []byte) (map[string]string, []tensorEntry, error) {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: header: %s", ErrCheckpoint, fmt.Sprintf(format, a...))
	}
	dec := json.NewDecoder(bytes.NewReader(header))
	dec.UseNumber()
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, nil, bad("not a JSON object")
	}
	meta := map[string]string{}
	var entries []tensorEntry
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, nil, bad("malformed JSON: %v", err)
		}
		name, ok := tok.(string)
		if !ok {
			return nil, nil, bad("malformed JSON: key %v", tok)
		}
		if seen[name] {
			return nil, nil, bad("key %q appears twice", name)
		}
		seen[name] = true
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, nil, bad("value of %q: malformed JSON: %v", name, err)
		}
		if name == "__metadata__" {
			if err := json.Unmarshal(raw, &meta); err != nil {
				return nil, nil, bad("__metadata__ is not an object of strings")
			}
			if meta == nil { // "__metadata__": null
				meta = map[string]string{}
			}
			continue
		}
		e := tensorEntry{name: name}
		if err := json.Unmarshal(raw, &e); err != nil {
			return nil, nil, fmt.Errorf("%w: tensor %q: malformed entry: %v", ErrCheckpoint, name, err)
		}
		if err := e.validate(); err != nil {
			return nil, nil, err
		}
		entries = append(entries, e)
	}
	if tok, err := dec.Token(); err != nil || tok != json.Delim('}') {
		return nil, nil, bad("malformed JSON: object not closed")
	}
	if rest := header[dec.InputOffset():]; len(bytes.TrimRight(rest, " \t\r\n")) != 0 {
		return nil, nil, bad("%d bytes of trailing garbage after the JSON", len(rest))
	}
	// The tensors must tile [0, total) exactly.
	slices.SortFunc(entries, func(a, b tensorEntry) int {
		return cmp.Or(cmp.Compare(a.DataOffsets[0], b.DataOffsets[0]),
			cmp.Compare(a.DataOffsets[1], b.DataOffsets[1]), strings.Compare(a.name, b.name))
	})
	var end int64
	for _, e := range entries {
		if b := e.DataOffsets[0]; b != end {
			if b < end {
				return nil, nil, fmt.Errorf("%w: tensor %q: data [%d,%d) overlaps the tensor before it, which ends at %d", ErrCheckpoint, e.name, b, e.DataOffsets[1], end)
			}
			return nil, nil, fmt.Errorf("%w: tensor %q: data starts at %d, leaving a gap after %d", ErrCheckpoint, e.name, b, end)
		}
		end = e.DataOffsets[1]
	}
	return meta, entries, nil
}

// maxTensorBytes keeps every tensor's byte length, and so its element count, an int.
const maxTensorBytes = math.MaxInt &^ 3

func (e *tensorEntry) validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: tensor %q: %s", ErrCheckpoint, e.name, fmt.Sprintf(format, a...))
	}
	switch {
	case e.Dtype == "":
		return bad("no dtype")
	case e.Dtype != "F32":
		return bad("dtype %q not supported, want F32", e.Dtype)
	case e.Shape == nil:
		return bad("no shape")
	case len(e.DataOffsets) != 2:
		return bad("data_offsets %v is not [begin, end]", e.DataOffsets)
	}
	b, end := e.DataOffsets[0], e.DataOffsets[1]
	if b < 0 || end < b {
		return bad("data_offsets [%d,%d] out of range", b, end)
	}
	if end-b > maxTensorBytes {
		return bad("%d bytes is too large", end-b)
	}
	elems := int64(1)
	for _, d := range e.Shape {
		if d < 0 {
			return bad("negative dimension in shape %v", e.Shape)
		}
		if d != 0 && elems > maxTensorBytes/4/d {
			return bad("shape %v is too large", e.Shape)
		}
		elems *= d
	}
	if 4*elems != end-b {
		return bad("shape %v holds %d bytes of F32, data_offsets [%d,%d] hold %d", e.Shape, 4*elems, b, end, end-b)
	}
	return nil
}

// LoadCheckpoint reads the safetensors file at path, checking its checksum if it
// carries one (an error wrapping ErrCorrupt if its bytes do not match).
func LoadCheckpoint(path string) (*Checkpoint, error) { return loadCheckpoint(path, true, false) }

// LoadSealed is LoadCheckpoint for a file this package wrote: one without a checksum
// is corrupt too (a byte changed in the checksum's key leaves none).
func LoadSealed(path string) (*Checkpoint, error) { return loadCheckpoint(path, true, true) }

// VerifyCheckpoint reads the whole safetensors file at path as LoadSealed does,
// keeping nothing but its metadata: how a node checks a checkpoint before it offers
// to resume from it.
func VerifyCheckpoint(path string) (meta map[string]string, err error) {
	ck, err := loadCheckpoint(path, false, true)
	if err != nil {
		return nil, err
	}
	return ck.Metadata, nil
}

func loadCheckpoint(path string, keep, sealed bool) (*Checkpoint, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("load checkpoint: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("load checkpoint: %w", err)
	}
	size := st.Size()
	if !st.Mode().IsRegular() {
		size = -1
	}
	ck, err := readCheckpoint(bufio.NewReaderSize(f, 1<<16), size, keep)
	if err == nil && sealed && !ck.Sealed {
		err = fmt.Errorf("%w: %w: the file carries no %s", ErrCheckpoint, ErrCorrupt, MetaSHA256)
	}
	if err != nil {
		return nil, fmt.Errorf("load checkpoint %s: %w", path, err)
	}
	return ck, nil
}

// ReadCheckpointMetadata reads only the header of the safetensors file at path and
// returns its metadata, checked as LoadCheckpoint checks it; the data is not read, so
// a node can list what its checkpoints hold without loading them.
func ReadCheckpointMetadata(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read checkpoint metadata: %w", err)
	}
	defer f.Close()
	var lenBuf [8]byte
	if _, err := io.ReadFull(f, lenBuf[:]); err != nil {
		return nil, fmt.Errorf("read checkpoint metadata %s: %w: header length: %w", path, ErrCheckpoint, eofIsUnexpected(err))
	}
	n := binary.LittleEndian.Uint64(lenBuf[:])
	if n < 2 || n > MaxCheckpointHeader {
		return nil, fmt.Errorf("read checkpoint metadata %s: %w: header length %d outside 2..%d", path, ErrCheckpoint, n, MaxCheckpointHeader)
	}
	header := make([]byte, n)
	if _, err := io.ReadFull(f, header); err != nil {
		return nil, fmt.Errorf("read checkpoint metadata %s: %w: header: %w", path, ErrCheckpoint, eofIsUnexpected(err))
	}
	meta, _, err := parseHeader(header)
	if err != nil {
		return nil, fmt.Errorf("read checkpoint metadata %s: %w", path, err)
	}
	return meta, nil
}

// Load copies into s.Params every tensor s owns. A missing tensor, or one whose shape
// or length differs from the stage's, is an error naming it, and then s.Params is left
// unchanged. Tensors the stage does not own (other stages') are ignored.
func (s *Stage) Load(ck *Checkpoint) error {
	for _, t := range s.Tensors() {
		ct, ok := ck.Tensors[t.Name]
		switch {
		case !ok:
			return fmt.Errorf("%w: tensor %q missing", ErrCheckpoint, t.Name)
		case !slices.Equal(ct.Shape, t.Shape):
			return fmt.Errorf("%w: tensor %q has shape %v, the stage wants %v", ErrCheckpoint, t.Name, ct.Shape, t.Shape)
		case len(ct.Data) != t.Len():
			return fmt.Errorf("%w: tensor %q has %d values for shape %v", ErrCheckpoint, t.Name, len(ct.Data), t.Shape)
		}
	}
	for _, t := range s.Tensors() {
		copy(t.View(s.Params), ck.Tensors[t.Name].Data)
	}
	return nil
}

// hfConfig is config.json for transformers' LlamaForCausalLM, in its field order.
type hfConfig struct {
	Architectures         []string    `json:"architectures"`
	ModelType             string      `json:"model_type"`
	VocabSize             int         `json:"vocab_size"`
	HiddenSize            int         `json:"hidden_size"`
	IntermediateSize      int         `json:"intermediate_size"`
	NumHiddenLayers       int         `json:"num_hidden_layers"`
	NumAttentionHeads     int         `json:"num_attention_heads"`
	NumKeyValueHeads      int         `json:"num_key_value_heads"`
	HeadDim               int         `json:"head_dim"`
	MaxPositionEmbeddings int         `json:"max_position_embeddings"`
	RMSNormEps            json.Number `json:"rms_norm_eps"`
	RopeTheta             json.Number `json:"rope_theta"`
	RopeScaling           *struct{}   `json:"rope_scaling"`
	HiddenAct             string      `json:"hidden_act"`
	InitializerRange      float64     `json:"initializer_range"`
	TieWordEmbeddings     bool        `json:"tie_word_embeddings"`
	AttentionBias         bool        `json:"attention_bias"`
	AttentionDropout      float64     `json:"attention_dropout"`
	MLPBias               bool        `json:"mlp_bias"`
	PretrainingTP         int         `json:"pretraining_tp"`
	UseCache              bool        `json:"use_cache"`
	TorchDtype            string      `json:"torch_dtype"`
}

// HFConfig returns the Hugging Face config.json (indented, newline-terminated) under
// which transformers' LlamaForCausalLM computes exactly our model: multi-head attention
// (num_key_value_heads = num_attention_heads), no biases, untied embeddings, SiLU,
// float32, max_position_embeddings = SeqLen. There are no BOS/EOS tokens (bytes), so
// those ids are omitted. rms_norm_eps is written as the shortest decimal of the
// float32 epsilon (1e-05, not 9.999999747378752e-06).
func HFConfig(c Config) ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if math.IsInf(c.RopeTheta, 0) || math.IsNaN(c.RopeTheta) || math.IsInf(float64(c.NormEps), 0) || math.IsNaN(float64(c.NormEps)) {
		return nil, fmt.Errorf("%w: rope_theta %g, norm_eps %g must be finite", ErrConfig, c.RopeTheta, c.NormEps)
	}
	hc := hfConfig{
		Architectures:         []string{"LlamaForCausalLM"},
		ModelType:             "llama",
		VocabSize:             c.Vocab,
		HiddenSize:            c.DModel,
		IntermediateSize:      c.DFF,
		NumHiddenLayers:       c.NLayers,
		NumAttentionHeads:     c.NHeads,
		NumKeyValueHeads:      c.NHeads,
		HeadDim:               c.HeadDim(),
		MaxPositionEmbeddings: c.SeqLen,
		RMSNormEps:            json.Number(strconv.FormatFloat(float64(c.NormEps), 'g', -1, 32)),
		RopeTheta:             json.Number(strconv.FormatFloat(c.RopeTheta, 'g', -1, 64)),
		HiddenAct:             "silu",
		InitializerRange:      0.02,
		PretrainingTP:         1,
		UseCache:              true,
		TorchDtype:            "float32",
	}
	b, err := json.MarshalIndent(hc, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// Named is one flat tensor to store by name: optimiser state, which has no layout of
// its own beyond the stage's parameter buffer it shadows.
type Named struct {
	Name string
	Data []float32
}

// SaveTensors writes flat tensors (1-D, in the given order) and metadata to path in
// safetensors format, atomically as SaveCheckpoint does; ReadCheckpoint and
// LoadCheckpoint read them back.
func SaveTensors(path string, meta map[string]string, tensors []Named) error {
	h, err := newHeader(meta)
	if err != nil {
		return err
	}
	seen := map[string]bool{}
	for _, t := range tensors {
		if seen[t.Name] || t.Name == "" {
			return fmt.Errorf("%w: tensor name %q empty or repeated", ErrCheckpoint, t.Name)
		}
		seen[t.Name] = true
		h.add(t.Name, []int{len(t.Data)}, len(t.Data))
	}
	hb := h.finish()
	seal(hb, func(w io.Writer) {
		for _, t := range tensors {
			_ = writeFloats(w, t.Data) // a hash takes every write
		}
	})
	return writeFileAtomic(path, func(w io.Writer) error {
		bw := bufio.NewWriterSize(w, 1<<16)
		if _, err := bw.Write(hb); err != nil {
			return fmt.Errorf("write tensors: %w", err)
		}
		for _, t := range tensors {
			if err := writeFloats(bw, t.Data); err != nil {
				return fmt.Errorf("write tensors: %w", err)
			}
		}
		if err := bw.Flush(); err != nil {
			return fmt.Errorf("write tensors: %w", err)
		}
		return nil
	})
}
