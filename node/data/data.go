// Package data turns text into training tokens: it loads corpora (a file, a directory of
// files, JSON lines, or a glob of those), splits off a validation tail, cuts it into
// evaluation windows, and samples training sequences from the rest. Prepare tokenises
// text once into the shard files of a prepared dataset (see Manifest), which runs read
// instead of text. When a run names no corpus, Builtin provides one generated in code,
// so a run needs no download.
package data

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/bits"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"unicode/utf8"
)

// ErrEmpty means a corpus held no text.
var ErrEmpty = errors.New("no text")

// ErrNotText means a file given as text is not UTF-8 or holds NUL bytes.
var ErrNotText = errors.New("not UTF-8 text")

// ErrBadRecord means a JSON-lines record is not an object with a "text" string.
var ErrBadRecord = errors.New("bad record")

// ErrTooShort means a text is shorter than one sequence plus its next-token target.
var ErrTooShort = errors.New("text too short")

// Load reads the corpus at path: a text file; a directory, whose regular text files are read
// recursively in sorted path order (hidden files and directories, and files that are not
// UTF-8 text, are skipped) and joined with "\n"; or a .jsonl file, whose records' "text"
// fields are joined with "\n".
func Load(path string) ([]byte, error) { return LoadField(path, "") }

// LoadField is Load reading field of JSON-lines records ("" = "text"). A path with glob
// metacharacters (* ? [) is a glob: its matches, in sorted order, are loaded and joined
// with "\n".
func LoadField(path, field string) ([]byte, error) {
	if field == "" {
		field = "text"
	}
	if IsGlob(path) {
		matches, err := Glob(path)
		if err != nil {
			return nil, fmt.Errorf("load corpus: %w", err)
		}
		var out []byte
		for _, m := range matches {
			b, err := LoadField(m, field)
			if err != nil {
				return nil, err
			}
			if len(out) > 0 {
				out = append(out, '\n')
			}
			out = append(out, b...)
		}
		return out, nil
	}
	info, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("load corpus: %w", err)
	}
	var text []byte
	switch {
	case info.IsDir():
		text, err = loadDir(path)
	case strings.EqualFold(filepath.Ext(path), ".jsonl"):
		text, err = loadJSONL(path, field)
	default:
		text, err = os.ReadFile(path)
		if err == nil && !isText(text) {
			err = fmt.Errorf("%s: %w", path, ErrNotText)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("load corpus: %w", err)
	}
	if len(text) == 0 {
		return nil, fmt.Errorf("load corpus: %s: %w", path, ErrEmpty)
	}
	return text, nil
}

func loadDir(root string) ([]byte, error) {
	paths, err := dirFiles(root)
	if err != nil {
		return nil, err
	}
	var out []byte
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		if len(b) == 0 || !isText(b) {
			continue
		}
		if len(out) > 0 {
			out = append(out, '\n')
		}
		out = append(out, b...)
	}
	return out, nil
}

// dirFiles lists the regular files under root (following symlinks to files), hidden ones
// left out, in sorted path order.
func dirFiles(root string) ([]string, error) {
	var paths []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != root && strings.HasPrefix(d.Name(), ".") {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		mode := d.Type()
		if mode&fs.ModeSymlink != 0 {
			// Corpora are often symlinks into a cache; take those that lead to a file.
			info, err := os.Stat(p)
			if err != nil {
				return err
			}
			mode = info.Mode().Type()
		}
		if mode.IsRegular() {
			paths = append(paths, p)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	// WalkDir's order is per directory ("a/b" before "a.txt"); sort the whole paths instead so
	// the order is the one a reader would expect from a sorted listing.
	slices.Sort(paths)
	return paths, nil
}

func loadJSONL(path, field string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r := bufio.NewReader(f)
	var out []byte
	first := true
	for n := 1; ; n++ {
		line, err := r.ReadBytes('\n')
		if len(bytes.TrimSpace(line)) > 0 {
			text, perr := recordField(line, field)
			if perr != nil {
				return nil, fmt.Errorf("%s:%d: %w", path, n, perr)
			}
			if !first {
				out = append(out, '\n')
			}
			out = append(out, text...)
			first = false
		}
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, err
		}
	}
}

// recordField returns the field (a string) of one JSON-lines record.
func recordField(line []byte, field string) (string, error) {
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(line, &obj); err != nil {
		return "", fmt.Errorf("%w: %w", ErrBadRecord, err)
	}
	raw, ok := obj[field]
	if !ok {
		return "", fmt.Errorf(`%w: no %q field (set data.text_field to the field that holds the text)`, ErrBadRecord, field)
	}
	var text string
	if err := json.Unmarshal(raw, &text); err != nil || string(bytes.TrimSpace(raw)) == "null" {
		return "", fmt.Errorf(`%w: %q is not a string: %.80s`, ErrBadRecord, field, raw)
	}
	return text, nil
}

func jsonIndent(v any) ([]byte, error) {
	b, err := json.MarshalIndent(v, "", "  ")
	return append(b, '\n'), err
}

func isText(b []byte) bool {
	return bytes.IndexByte(b, 0) < 0 && utf8.Valid(b)
}

// Token is what a text is a sequence of: bytes for a byte-level model, token ids (int32)
// for a tokenizer's.
type Token interface{ ~byte | ~int32 }

// Widen returns text's bytes as int32 tokens.
func Widen(text []byte) []int32 {
	out := make([]int32, len(text))
	for i, b := range text {
		out[i] = int32(b)
	}
	return out
}

// Split returns the first 1-valFraction of text for training and the rest, floor(len(text) *
// valFraction) bytes, for validation. The two share text's memory but appending to train
// cannot overwrite val. It panics if valFraction is outside [0, 1].
func Split[T Token](text []T, valFraction float64) (train, val []T) {
	if !(valFraction >= 0 && valFraction <= 1) {
		panic(fmt.Sprintf("data: Split: valFraction %v outside [0, 1]", valFraction))
	}
	cut := len(text) - int(float64(len(text))*valFraction)
	return text[:cut:cut], text[cut:]
}

// ValWindows returns how many windows of seqLen+1 bytes fit in val, one after another
// without overlap; the remainder is not evaluated.
func ValWindows[T Token](val []T, seqLen int) int {
	if seqLen <= 0 {
		panic(fmt.Sprintf("data: ValWindows: seqLen %d is not positive", seqLen))
	}
	return len(val) / (seqLen + 1)
}

// ValWindow fills inputs and targets, each seqLen long, with window i of val: the bytes
// starting at i*(seqLen+1), and for each the byte after it.
func ValWindow[T Token](val []T, seqLen, i int, inputs, targets []int32) {
	if len(inputs) != seqLen || len(targets) != seqLen {
		panic(fmt.Sprintf("data: ValWindow: inputs %d and targets %d, want seqLen %d", len(inputs), len(targets), seqLen))
	}
	if i < 0 || i >= ValWindows(val, seqLen) {
		panic(fmt.Sprintf("data: ValWindow: window %d of %d", i, ValWindows(val, seqLen)))
	}
	fill(val[i*(seqLen+1):], inputs, targets)
}

// fill sets inputs to the first len(inputs) bytes of src and targets to the bytes one on.
func fill[T Token](src []T, inputs, targets []int32) {
	for j := range inputs {
		inputs[j] = int32(src[j])
		targets[j] = int32(src[j+1])
	}
}

// Sampler draws training sequences from random offsets of a text. Each replica of a stage
// gets its own stream, so replicas train on different data, and a restart with the same
// (seed, replica) draws the same sequences again.
type Sampler[T Token] struct {
	train  []T
	view   *ShardView // read instead of train when set
	seqLen int
	rng    *rand.PCG
}

// NewSampler returns a sampler of sequences of seqLen tokens from train, which it keeps and
// which must not change while it is in use.
func NewSampler[T Token](train []T, seqLen int, seed uint64, replica int) (*Sampler[T], error) {
	if seqLen <= 0 {
		return nil, fmt.Errorf("data: sampler: seq_len %d is not positive", seqLen)
	}
	if len(train) < seqLen+1 {
		return nil, fmt.Errorf("data: sampler: %d bytes of training text, need at least seq_len+1 = %d: %w",
			len(train), seqLen+1, ErrTooShort)
	}
	// Mixing the replica keeps streams of neighbouring replicas from starting at
	// neighbouring states.
	return &Sampler[T]{train: train, seqLen: seqLen, rng: rand.NewPCG(seed, mix(uint64(replica)))}, nil
}

// NewViewSampler is NewSampler reading the tokens of shard files in place: it draws
// exactly the sequences NewSampler does from the same tokens decoded into a slice.
func NewViewSampler(v *ShardView, seqLen int, seed uint64, replica int) (*Sampler[int32], error) {
	if seqLen <= 0 {
		return nil, fmt.Errorf("data: sampler: seq_len %d is not positive", seqLen)
	}
	if v.Len() < seqLen+1 {
		return nil, fmt.Errorf("data: sampler: %d tokens of training text, need at least seq_len+1 = %d: %w",
			v.Len(), seqLen+1, ErrTooShort)
	}
	return &Sampler[int32]{view: v, seqLen: seqLen, rng: rand.NewPCG(seed, mix(uint64(replica)))}, nil
}

// Next fills inputs and targets with len(inputs)/seqLen sequences, one after another, each
// from a uniformly random offset; targets are the inputs shifted by one byte. It panics
// unless len(inputs) is a multiple of seqLen and len(targets) == len(inputs).
func (s *Sampler[T]) Next(inputs, targets []int32) {
	if len(inputs)%s.seqLen != 0 || len(targets) != len(inputs) {
		panic(fmt.Sprintf("data: Sampler.Next: inputs %d and targets %d, want equal multiples of seqLen %d",
			len(inputs), len(targets), s.seqLen))
	}
	n := len(s.train)
	if s.view != nil {
		n = s.view.Len()
	}
	starts := uint64(n - s.seqLen) // offsets 0 .. len-seqLen-1 leave room for the last target
	for b := 0; b < len(inputs); b += s.seqLen {
		off := below(s.rng, starts)
		if s.view != nil {
			s.view.fill(int(off), inputs[b:b+s.seqLen], targets[b:b+s.seqLen])
		} else {
			fill(s.train[off:], inputs[b:b+s.seqLen], targets[b:b+s.seqLen])
		}
	}
}

// below returns a number in [0, n) from the top bits of a 128-bit product. It is written
// out, rather than rand.Rand.IntN, so that the draws depend only on the PCG stream and can
// never change with the Go release. The bias, under n/2^64, does not matter here.
func below(rng *rand.PCG, n uint64) uint64 {
	hi, _ := bits.Mul64(rng.Uint64(), n)
	return hi
}

// mix is the splitmix64 finaliser: it spreads nearby inputs over the whole 64-bit range.
func mix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ x>>30) * 0xbf58476d1ce4e5b9
	x = (x ^ x>>27) * 0x94d049bb133111eb
	return x ^ x>>31
}

// Shard returns replica r's part of the training text when n replica pipelines share
// it: the r-th of n contiguous, disjoint, nearly equal slices, so replicas train on
// different text. With n = 1 it is the whole text. It panics unless 0 <= r < n.
func Shard[T Token](train []T, r, n int) []T {
	if n < 1 || r < 0 || r >= n {
		panic(fmt.Sprintf("data: Shard %d of %d", r, n))
	}
	lo, hi := len(train)*r/n, len(train)*(r+1)/n
	return train[lo:hi:hi]
}

// State returns the sampler's position in its stream, for a checkpoint.
func (s *Sampler[T]) State() ([]byte, error) { return s.rng.MarshalBinary() }

// AppendState appends State to dst: a caller that records it every step reuses one
// buffer.
func (s *Sampler[T]) AppendState(dst []byte) ([]byte, error) { return s.rng.AppendBinary(dst) }

// SetState moves the sampler to a position State returned, so a resumed run draws
// the sequences the uninterrupted one would have.
func (s *Sampler[T]) SetState(b []byte) error {
	if err := s.rng.UnmarshalBinary(b); err != nil {
		return fmt.Errorf("data: sampler state: %w", err)
	}
	return nil
}
