package data

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
)

// A prepared dataset is a directory of shard files of token ids and a manifest.json that
// lists them. A shard file is a 24-byte header and then its ids, little-endian:
//
//	bytes 0-7    magic "PSTOKENS"
//	bytes 8-11   uint32 width of one id in bytes: 2 (uint16) or 4 (uint32)
//	bytes 12-15  uint32 zero (reserved)
//	bytes 16-23  uint64 number of ids
//	bytes 24-    the ids
//
// The manifest names each shard's file, sha256 (of the whole file) and token count, so a
// shard can be served and cached by its hash and checked wherever it lands.

// ManifestName is the manifest's file name inside a prepared directory.
const ManifestName = "manifest.json"

// ManifestFormat is the manifest's format field.
const ManifestFormat = "pipeswarm-tokens/1"

const (
	shardMagic  = "PSTOKENS"
	shardHeader = 24
)

// ErrBadShard means a shard file or manifest is malformed or does not match its hash.
var ErrBadShard = errors.New("bad prepared shard")

// Manifest describes a prepared dataset.
type Manifest struct {
	Format          string      `json:"format"`
	Tokenizer       string      `json:"tokenizer"`        // "bytes" or the tokenizer file's base name
	TokenizerSHA256 string      `json:"tokenizer_sha256"` // of the tokenizer.json; empty for bytes
	Vocab           int         `json:"vocab"`            // ids are below this
	Dtype           string      `json:"dtype"`            // uint16 or uint32
	ShardTokens     int64       `json:"shard_tokens"`     // ids per shard; the last may hold fewer
	Separator       []int32     `json:"separator"`        // the ids between two documents
	Shards          []ShardInfo `json:"shards"`
	Tokens          int64       `json:"tokens"`    // all shards'
	Documents       int64       `json:"documents"` // records and text pieces tokenised
	Bytes           int64       `json:"bytes"`     // of text read
}

// ShardInfo is one shard in a manifest.
type ShardInfo struct {
	File   string `json:"file"`
	SHA256 string `json:"sha256"`
	Tokens int64  `json:"tokens"`
	Bytes  int64  `json:"bytes"` // file size, header included
}

// DtypeFor is the id type for a vocabulary: uint16 when every id fits, else uint32.
func DtypeFor(vocab int) (name string, width int) {
	if vocab <= 1<<16 {
		return "uint16", 2
	}
	return "uint32", 4
}

// Width is the bytes of one id.
func (m *Manifest) Width() int {
	if m.Dtype == "uint32" {
		return 4
	}
	return 2
}

// ManifestPath returns the manifest of the prepared dataset at path (the directory or the
// manifest file itself), and whether there is one.
func ManifestPath(path string) (string, bool) {
	if filepath.Base(path) == ManifestName {
		_, err := os.Stat(path)
		return path, err == nil
	}
	p := filepath.Join(path, ManifestName)
	if info, err := os.Stat(p); err == nil && info.Mode().IsRegular() {
		return p, true
	}
	return "", false
}

// IsPrepared reports whether path is a prepared dataset.
func IsPrepared(path string) bool {
	_, ok := ManifestPath(path)
	return ok
}

// ReadManifest reads and checks the manifest of the prepared dataset at path.
func ReadManifest(path string) (*Manifest, string, error) {
	mp, ok := ManifestPath(path)
	if !ok {
		return nil, "", fmt.Errorf("%s: no %s: %w", path, ManifestName, os.ErrNotExist)
	}
	b, err := os.ReadFile(mp)
	if err != nil {
		return nil, "", err
	}
	var m Manifest
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return nil, "", fmt.Errorf("%s: %w: %w", mp, ErrBadShard, err)
	}
	if err := m.check(); err != nil {
		return nil, "", fmt.Errorf("%s: %w", mp, err)
	}
	return &m, filepath.Dir(mp), nil
}

func (m *Manifest) check() error {
	bad := func(f string, a ...any) error { return fmt.Errorf("%w: %s", ErrBadShard, fmt.Sprintf(f, a...)) }
	switch {
	case m.Format != ManifestFormat:
		return bad("format %q, want %q", m.Format, ManifestFormat)
	case m.Dtype != "uint16" && m.Dtype != "uint32":
		return bad("dtype %q, want uint16 or uint32", m.Dtype)
	case m.Vocab < 1 || (m.Dtype == "uint16" && m.Vocab > 1<<16):
		return bad("vocab %d does not fit dtype %s", m.Vocab, m.Dtype)
	case len(m.Shards) == 0:
		return bad("no shards")
	}
	var total int64
	for i, s := range m.Shards {
		if s.File == "" || s.File != filepath.Base(s.File) || strings.HasPrefix(s.File, ".") {
			return bad("shards[%d].file %q: want a file name in the manifest's directory", i, s.File)
		}
		if len(s.SHA256) != 64 {
			return bad("shards[%d].sha256 %q is not a sha256", i, s.SHA256)
		}
		if s.Tokens < 1 || s.Bytes != shardHeader+s.Tokens*int64(m.Width()) {
			return bad("shards[%d]: %d tokens in %d bytes", i, s.Tokens, s.Bytes)
		}
		total += s.Tokens
	}
	if total != m.Tokens {
		return bad("tokens %d, but the shards hold %d", m.Tokens, total)
	}
	return nil
}

// ReadShardFile reads shard i of a manifest in dir, checking its hash, and returns the
// file's bytes (what is served and cached as its blob).
func (m *Manifest) ReadShardFile(dir string, i int) ([]byte, error) {
	s := m.Shards[i]
	b, err := os.ReadFile(filepath.Join(dir, s.File))
	if err != nil {
		return nil, err
	}
	if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != s.SHA256 {
		return nil, fmt.Errorf("%s: %w: sha256 %x, the manifest says %s", filepath.Join(dir, s.File), ErrBadShard, sum, s.SHA256)
	}
	return b, nil
}

// AppendShard decodes a shard file's ids onto dst, checking each is below vocab.
func AppendShard(dst []int32, file []byte, vocab int) ([]int32, error) {
	if len(file) < shardHeader || string(file[:8]) != shardMagic {
		return nil, fmt.Errorf("%w: no %q header", ErrBadShard, shardMagic)
	}
	w := int(binary.LittleEndian.Uint32(file[8:]))
	n := binary.LittleEndian.Uint64(file[16:])
	if (w != 2 && w != 4) || uint64(len(file)-shardHeader) != n*uint64(w) {
		return nil, fmt.Errorf("%w: width %d and %d ids in %d bytes", ErrBadShard, w, n, len(file))
	}
	body := file[shardHeader:]
	for i := range int(n) {
		var id uint32
		if w == 2 {
			id = uint32(binary.LittleEndian.Uint16(body[2*i:]))
		} else {
			id = binary.LittleEndian.Uint32(body[4*i:])
		}
		if id >= uint32(vocab) {
			return nil, fmt.Errorf("%w: id %d at %d is outside the vocabulary of %d", ErrBadShard, id, i, vocab)
		}
		dst = append(dst, int32(id))
	}
	return dst, nil
}

// ReplicaShards is the rule that gives replica pipelines their shards: shard i goes to
// replica i mod n, round-robin by index. It returns replica r's shard indices.
func ReplicaShards(shards, r, n int) []int {
	var out []int
	for i := r; i < shards; i += n {
		out = append(out, i)
	}
	return out
}

// LoadShards reads and decodes the given shards of the prepared dataset in dir, in order.
func (m *Manifest) LoadShards(dir string, idx []int) ([]int32, error) {
	var n int64
	for _, i := range idx {
		n += m.Shards[i].Tokens
	}
	out := make([]int32, 0, n)
	for _, i := range idx {
		b, err := m.ReadShardFile(dir, i)
		if err != nil {
			return nil, err
		}
		if out, err = AppendShard(out, b, m.Vocab); err != nil {
			return nil, fmt.Errorf("%s: %w", m.Shards[i].File, err)
		}
	}
	return out, nil
}

// shardWriter writes ids into numbered shard files of a fixed size.
type shardWriter struct {
	dir, prefix string
	per         int64
	width       int
	m           *Manifest

	f   *os.File
	buf []byte
	n   int64 // ids in the open shard
}

func (w *shardWriter) add(ids []int32) error {
	for len(ids) > 0 {
		if w.f == nil {
			if err := w.open(); err != nil {
				return err
			}
		}
		k := min(int64(len(ids)), w.per-w.n)
		for _, id := range ids[:k] {
			if w.width == 2 {
				w.buf = binary.LittleEndian.AppendUint16(w.buf, uint16(id))
			} else {
				w.buf = binary.LittleEndian.AppendUint32(w.buf, uint32(id))
			}
		}
		ids = ids[k:]
		w.n += k
		if len(w.buf) >= 1<<20 {
			if _, err := w.f.Write(w.buf); err != nil {
				return err
			}
			w.buf = w.buf[:0]
		}
		if w.n == w.per {
			if err := w.close(); err != nil {
				return err
			}
		}
	}
	return nil
}

func (w *shardWriter) open() error {
	name := fmt.Sprintf("%s-%05d.bin", w.prefix, len(w.m.Shards))
	f, err := os.Create(filepath.Join(w.dir, name))
	if err != nil {
		return err
	}
	w.f, w.n = f, 0
	w.buf = append(w.buf[:0], make([]byte, shardHeader)...) // the header is written on close
	w.m.Shards = append(w.m.Shards, ShardInfo{File: name})
	return nil
}

// close finishes the open shard: flushes it, writes its header and hashes the file.
func (w *shardWriter) close() error {
	if w.f == nil {
		return nil
	}
	f := w.f
	w.f = nil
	defer f.Close()
	if _, err := f.Write(w.buf); err != nil {
		return err
	}
	w.buf = w.buf[:0]
	var hdr [shardHeader]byte
	copy(hdr[:], shardMagic)
	binary.LittleEndian.PutUint32(hdr[8:], uint32(w.width))
	binary.LittleEndian.PutUint64(hdr[16:], uint64(w.n))
	if _, err := f.WriteAt(hdr[:], 0); err != nil {
		return err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	h := sha256.New()
	size, err := io.Copy(h, f)
	if err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	s := &w.m.Shards[len(w.m.Shards)-1]
	s.SHA256, s.Tokens, s.Bytes = hex.EncodeToString(h.Sum(nil)), w.n, size
	w.m.Tokens += w.n
	return nil
}

// MapShardFile maps shard i of a manifest in dir read-only and checks its hash: the
// bytes live in the page cache, not in the process's heap, so a launcher serving a
// dataset larger than its memory can. The mapping lasts as long as the process.
func (m *Manifest) MapShardFile(dir string, i int) ([]byte, error) {
	s := m.Shards[i]
	name := filepath.Join(dir, s.File)
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if info.Size() != s.Bytes {
		return nil, fmt.Errorf("%s: %w: %d bytes, the manifest says %d", name, ErrBadShard, info.Size(), s.Bytes)
	}
	// Hashed by reading, not through the mapping, so checking it does not page the whole
	// file into this process's resident set.
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if sum := h.Sum(nil); hex.EncodeToString(sum) != s.SHA256 {
		return nil, fmt.Errorf("%s: %w: sha256 %x, the manifest says %s", name, ErrBadShard, sum, s.SHA256)
	}
	b, err := syscall.Mmap(int(f.Fd()), 0, int(s.Bytes), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("%s: map: %w", name, err)
	}
	return b, nil
}

// ShardView reads the ids of shard files, one after another, from the files themselves
// (a read per sequence drawn), so a process samples a dataset larger than its memory and
// holds none of it.
type ShardView struct {
	files  []*os.File
	lens   []int // ids in each file
	starts []int // index of each file's first id
	width  int
	n      int
	buf    []byte
}

// OpenShardView checks the shard files at paths (header, width, every id below vocab,
// and the sha256 given for each, unless that is "") by reading them through once, and
// returns a view of their ids in order, which keeps the files open. The files must not
// change while the view is in use.
func OpenShardView(paths, sha256s []string, vocab int) (*ShardView, error) {
	v := &ShardView{}
	for i, p := range paths {
		want := ""
		if sha256s != nil {
			want = sha256s[i]
		}
		w, n, err := checkShardFile(p, want, vocab)
		if err != nil {
			return nil, err
		}
		if v.width != 0 && w != v.width {
			return nil, fmt.Errorf("%s: %w: ids of %d bytes after shards of %d", p, ErrBadShard, w, v.width)
		}
		v.width = w
		f, err := os.Open(p)
		if err != nil {
			return nil, err
		}
		v.files = append(v.files, f)
		v.lens = append(v.lens, int(n))
		v.starts = append(v.starts, v.n)
		v.n += int(n)
	}
	return v, nil
}

// checkShardFile reads a shard file through once: its header, its ids against vocab and
// its sha256 against want (when not ""). It returns the id width and count.
func checkShardFile(name, want string, vocab int) (width int, n int64, err error) {
	f, err := os.Open(name)
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	h := sha256.New()
	r := io.TeeReader(f, h)
	var hdr [shardHeader]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil || string(hdr[:8]) != shardMagic {
		return 0, 0, fmt.Errorf("%s: %w: no %q header", name, ErrBadShard, shardMagic)
	}
	width = int(binary.LittleEndian.Uint32(hdr[8:]))
	n = int64(binary.LittleEndian.Uint64(hdr[16:]))
	if width != 2 && width != 4 {
		return 0, 0, fmt.Errorf("%s: %w: id width %d", name, ErrBadShard, width)
	}
	buf := make([]byte, 1<<20-(1<<20)%width)
	var seen int64
	for {
		k, err := io.ReadFull(r, buf)
		if k%width != 0 {
			return 0, 0, fmt.Errorf("%s: %w: a partial id at the end", name, ErrBadShard)
		}
		for j := 0; j < k; j += width {
			var id uint32
			if width == 2 {
				id = uint32(binary.LittleEndian.Uint16(buf[j:]))
			} else {
				id = binary.LittleEndian.Uint32(buf[j:])
			}
			if id >= uint32(vocab) {
				return 0, 0, fmt.Errorf("%s: %w: id %d at %d is outside the vocabulary of %d", name, ErrBadShard, id, seen+int64(j/width), vocab)
			}
		}
		seen += int64(k / width)
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			break
		}
		if err != nil {
			return 0, 0, fmt.Errorf("%s: %w", name, err)
		}
	}
	if seen != n {
		return 0, 0, fmt.Errorf("%s: %w: %d ids, the header says %d", name, ErrBadShard, seen, n)
	}
	if sum := h.Sum(nil); want != "" && hex.EncodeToString(sum) != want {
		return 0, 0, fmt.Errorf("%s: %w: sha256 %x, want %s", name, ErrBadShard, sum, want)
	}
	return width, n, nil
}

// Len is the number of ids in the view.
func (v *ShardView) Len() int { return v.n }

// fill sets inputs to the len(inputs) ids from off and targets to the ids one on, as fill
// does on a slice. A file that can no longer be read (truncated under a running process)
// is a panic: the view cannot go on and has no error to return.
func (v *ShardView) fill(off int, inputs, targets []int32) {
	need := len(inputs) + 1
	v.buf = slices.Grow(v.buf[:0], need*v.width)[:need*v.width]
	k := sort.Search(len(v.starts), func(i int) bool { return v.starts[i] > off }) - 1
	at, got := off-v.starts[k], 0
	for got < need {
		if at >= v.lens[k] {
			k, at = k+1, 0
			continue
		}
		c := min(need-got, v.lens[k]-at)
		dst := v.buf[got*v.width : (got+c)*v.width]
		if _, err := v.files[k].ReadAt(dst, int64(shardHeader+at*v.width)); err != nil {
			panic(fmt.Sprintf("data: reading %s: %v", v.files[k].Name(), err))
		}
		got, at = got+c, at+c
	}
	id := func(j int) int32 {
		if v.width == 2 {
			return int32(binary.LittleEndian.Uint16(v.buf[2*j:]))
		}
		return int32(binary.LittleEndian.Uint32(v.buf[4*j:]))
	}
	for j := range inputs {
		inputs[j] = id(j)
		targets[j] = id(j + 1)
	}
}

// EncodeShard returns the shard file of ids, in the id width vocab needs.
func EncodeShard(ids []int32, vocab int) []byte {
	_, w := DtypeFor(vocab)
	b := make([]byte, shardHeader, shardHeader+len(ids)*w)
	copy(b, shardMagic)
	binary.LittleEndian.PutUint32(b[8:], uint32(w))
	binary.LittleEndian.PutUint64(b[16:], uint64(len(ids)))
	for _, id := range ids {
		if w == 2 {
			b = binary.LittleEndian.AppendUint16(b, uint16(id))
		} else {
			b = binary.LittleEndian.AppendUint32(b, uint32(id))
		}
	}
	return b
}
