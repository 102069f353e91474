package data

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"unicode/utf8"
)

// PrepareOptions says how Prepare tokenises.
type PrepareOptions struct {
	Out             string               // directory written: shards and manifest.json; created if missing
	ShardTokens     int64                // ids per shard; 0 = DefaultShardTokens
	Vocab           int                  // ids Encode returns are below this
	Encode          func(string) []int32 // tokenises one piece of text; safe for concurrent use
	Tokenizer       string               // manifest's name for it: "bytes" or a file name
	TokenizerSHA256 string               // of the tokenizer file; empty for bytes
	Field           string               // JSON-lines field read; "" = "text"
	Workers         int                  // tokenising goroutines; 0 = GOMAXPROCS
	// Progress, if set, is called from time to time (and once at the end) with the bytes
	// of text read and the ids written so far.
	Progress func(bytesRead, tokens int64)
}

// DefaultShardTokens is the ids in a shard unless told: 64 Mi ids, 128 MiB of uint16.
const DefaultShardTokens = 64 << 20

// pieceBytes is about how much text one tokenising job holds: a text file is cut into
// pieces of this size at line ends, so no file is held whole.
const pieceBytes = 1 << 20

type piece struct {
	text   []byte
	newDoc bool // it starts a document: a separator goes before it (Prepare drops the first)
}

type job struct {
	seq    int
	pieces []piece
	ids    chan []int32
}

// Prepare tokenises the inputs once into the shards of a prepared dataset and writes its
// manifest. Inputs are files, directories (their text files, recursively, in sorted
// path order; hidden ones skipped), .jsonl files (each record's Field) or globs of
// those. Each record and each file is a document; documents are joined with the ids of
// "\n", so with bytes the ids are exactly the bytes Load joins. A text file is tokenised
// in pieces of about 1 MiB cut after a line end. Text is read incrementally and at most a
// few pieces per worker are held at once.
func Prepare(ctx context.Context, inputs []string, o PrepareOptions) (*Manifest, error) {
	if o.ShardTokens == 0 {
		o.ShardTokens = DefaultShardTokens
	}
	if o.Field == "" {
		o.Field = "text"
	}
	if o.Workers <= 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	if o.ShardTokens < 1 || o.Encode == nil || o.Vocab < 1 || o.Out == "" {
		return nil, fmt.Errorf("data: prepare: bad options (shard tokens %d, vocab %d, out %q)", o.ShardTokens, o.Vocab, o.Out)
	}
	files, err := expand(inputs)
	if err != nil {
		return nil, fmt.Errorf("data: prepare: %w", err)
	}
	if err := os.MkdirAll(o.Out, 0o755); err != nil {
		return nil, fmt.Errorf("data: prepare: %w", err)
	}
	dtype, width := DtypeFor(o.Vocab)
	m := &Manifest{Format: ManifestFormat, Tokenizer: o.Tokenizer, TokenizerSHA256: o.TokenizerSHA256,
		Vocab: o.Vocab, Dtype: dtype, ShardTokens: o.ShardTokens, Separator: o.Encode("\n")}
	w := &shardWriter{dir: o.Out, prefix: "shard", per: o.ShardTokens, width: width, m: m}

	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	jobs := make(chan *job, o.Workers)
	ordered := make(chan *job, 2*o.Workers)
	// read: files → jobs of pieces, in order; ordered gets each job as it is queued.
	go func() {
		defer close(jobs)
		defer close(ordered)
		err := readPieces(ctx, files, o.Field, func(ps []piece) bool {
			j := &job{pieces: ps, ids: make(chan []int32, 1)}
			for _, p := range ps {
				m.Bytes += int64(len(p.text))
				if p.newDoc {
					m.Documents++
				}
			}
			select {
			case jobs <- j:
			case <-ctx.Done():
				return false
			}
			select {
			case ordered <- j:
			case <-ctx.Done():
				return false
			}
			return true
		})
		if err != nil {
			cancel(err)
		}
	}()
	for range o.Workers {
		go func() {
			for j := range jobs {
				var ids []int32
				for _, p := range j.pieces {
					if p.newDoc {
						ids = append(ids, m.Separator...)
					}
					ids = append(ids, o.Encode(string(p.text))...)
				}
				j.ids <- ids
			}
		}()
	}
	var tokens int64
	var bytesDone int64
	first := true
	for j := range ordered {
		var ids []int32
		select {
		case ids = <-j.ids:
		case <-ctx.Done():
			return nil, fmt.Errorf("data: prepare: %w", context.Cause(ctx))
		}
		if first && len(j.pieces) > 0 && j.pieces[0].newDoc {
			ids = ids[len(m.Separator):] // no separator before the first document
		}
		first = false
		for i, id := range ids {
			if id < 0 || int(id) >= o.Vocab {
				cancel(nil)
				return nil, fmt.Errorf("data: prepare: id %d at token %d is outside the vocabulary of %d", id, tokens+int64(i), o.Vocab)
			}
		}
		if err := w.add(ids); err != nil {
			cancel(err)
			return nil, fmt.Errorf("data: prepare: %w", err)
		}
		tokens += int64(len(ids))
		for _, p := range j.pieces {
			bytesDone += int64(len(p.text))
		}
		if o.Progress != nil {
			o.Progress(bytesDone, tokens)
		}
	}
	if err := context.Cause(ctx); err != nil {
		return nil, fmt.Errorf("data: prepare: %w", err)
	}
	if err := w.close(); err != nil {
		return nil, fmt.Errorf("data: prepare: %w", err)
	}
	if m.Tokens == 0 {
		return nil, fmt.Errorf("data: prepare: %w in %s", ErrEmpty, strings.Join(inputs, " "))
	}
	if err := writeManifest(o.Out, m); err != nil {
		return nil, fmt.Errorf("data: prepare: %w", err)
	}
	return m, nil
}

func writeManifest(dir string, m *Manifest) error {
	b, err := jsonIndent(m)
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, ManifestName+".tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, ManifestName))
}

// input is one file to read, and whether it was found by walking a directory (then a
// file that is not text is skipped rather than refused).
type input struct {
	path   string
	walked bool
}

// expand turns inputs (files, directories, globs) into the files to read, in order.
func expand(inputs []string) ([]input, error) {
	var out []input
	for _, in := range inputs {
		paths := []string{in}
		if IsGlob(in) {
			m, err := Glob(in)
			if err != nil {
				return nil, err
			}
			paths = m
		}
		for _, p := range paths {
			info, err := os.Stat(p)
			if err != nil {
				return nil, err
			}
			if !info.IsDir() {
				out = append(out, input{path: p})
				continue
			}
			files, err := dirFiles(p)
			if err != nil {
				return nil, err
			}
			for _, f := range files {
				out = append(out, input{path: f, walked: true})
			}
		}
	}
	return out, nil
}

// readPieces reads files in order and hands emit batches of pieces of about 4 MiB. emit
// returns false to stop.
func readPieces(ctx context.Context, files []input, field string, emit func([]piece) bool) error {
	var batch []piece
	size := 0
	push := func(p piece) bool {
		batch = append(batch, p)
		size += len(p.text)
		if size >= 4*pieceBytes {
			ok := emit(batch)
			batch, size = nil, 0
			return ok
		}
		return true
	}
	for _, in := range files {
		if err := ctx.Err(); err != nil {
			return err
		}
		var err error
		if strings.EqualFold(filepath.Ext(in.path), ".jsonl") {
			err = readJSONLPieces(in.path, field, push)
		} else {
			err = readTextPieces(in, push)
		}
		if errors.Is(err, errStop) {
			return ctx.Err()
		}
		if err != nil {
			return err
		}
	}
	if len(batch) > 0 {
		emit(batch)
	}
	return nil
}

var errStop = errors.New("stopped")

func readJSONLPieces(path, field string, push func(piece) bool) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, 1<<20)
	for n := 1; ; n++ {
		line, err := r.ReadBytes('\n')
		if len(bytes.TrimSpace(line)) > 0 {
			text, perr := recordField(line, field)
			if perr != nil {
				return fmt.Errorf("%s:%d: %w", path, n, perr)
			}
			if !push(piece{text: []byte(text), newDoc: true}) {
				return errStop
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func readTextPieces(in input, push func(piece) bool) error {
	f, err := os.Open(in.path)
	if err != nil {
		return err
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, pieceBytes)
	first := true
	for {
		buf := make([]byte, pieceBytes)
		n, err := io.ReadFull(r, buf)
		buf = buf[:n]
		if err == nil { // cut after the next line end, so no line is split
			rest, rerr := r.ReadBytes('\n')
			buf = append(buf, rest...)
			if errors.Is(rerr, io.EOF) {
				err = io.EOF
			} else if rerr != nil {
				return rerr
			}
		}
		if len(buf) > 0 && (bytes.IndexByte(buf, 0) >= 0 || !utf8.Valid(buf)) {
			if in.walked && first {
				return nil // a directory's non-text file is skipped, as Load does
			}
			return fmt.Errorf("%s: %w", in.path, ErrNotText)
		}
		if len(buf) > 0 {
			if !push(piece{text: buf, newDoc: first}) {
				return errStop
			}
			first = false
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// IsGlob reports whether a path holds glob metacharacters.
func IsGlob(path string) bool { return strings.ContainsAny(path, "*?[") }

// Glob returns the sorted matches of pattern, or an error saying none matched.
func Glob(pattern string) ([]string, error) {
	m, err := filepath.Glob(pattern)
	if err != nil {
		return nil, fmt.Errorf("glob %q: %w", pattern, err)
	}
	if len(m) == 0 {
		return nil, fmt.Errorf("glob %q matches no file: %w", pattern, fs.ErrNotExist)
	}
	slices.Sort(m)
	return m, nil
}
