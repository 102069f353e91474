package corpus

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
)

// MaxBlobBytes is the largest blob the protocol carries. Blobs are training
// shards and validation splits of at most about 1 GiB; the limit leaves room.
const MaxBlobBytes = 2 << 30

var (
	// ErrBadBlob is wrapped by Blob.Validate errors.
	ErrBadBlob = errors.New("corpus: bad blob")
	// ErrHashMismatch is wrapped by every error that reports bytes whose
	// sha256 or size is not the blob's.
	ErrHashMismatch = errors.New("corpus: hash mismatch")
)

// Blob names a piece of the corpus by content: the lowercase hex sha256 of
// its bytes, and its size in bytes.
type Blob struct {
	Hash string `json:"sha256"`
	Size int64  `json:"size"`
}

// BlobOf is the Blob whose bytes are b.
func BlobOf(b []byte) Blob {
	sum := sha256.Sum256(b)
	return Blob{Hash: hex.EncodeToString(sum[:]), Size: int64(len(b))}
}

func (b Blob) String() string { return fmt.Sprintf("%s (%d bytes)", b.Hash, b.Size) }

// Validate refuses a hash that is not 64 lowercase hex digits and a size
// outside [0, MaxBlobBytes]. Errors wrap ErrBadBlob.
func (b Blob) Validate() error {
	if len(b.Hash) != 2*sha256.Size {
		return fmt.Errorf("%w: sha256 %q: want %d lowercase hex digits", ErrBadBlob, clip(b.Hash), 2*sha256.Size)
	}
	for i := 0; i < len(b.Hash); i++ {
		if c := b.Hash[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return fmt.Errorf("%w: sha256 %q: byte %d is %q, want lowercase hex", ErrBadBlob, b.Hash, i, c)
		}
	}
	if b.Size < 0 || b.Size > MaxBlobBytes {
		return fmt.Errorf("%w: size %d outside [0, %d]", ErrBadBlob, b.Size, MaxBlobBytes)
	}
	return nil
}

// sum is the raw sha256 of a validated blob.
func (b Blob) sum() (s [sha256.Size]byte) {
	hex.Decode(s[:], []byte(b.Hash))
	return s
}

// clip shortens s for an error message.
func clip(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// UseLocal reads the file at path as the blob b: a node pointed at its own
// copy of the corpus uses it instead of fetching. It refuses (ErrHashMismatch)
// a file whose size or sha256 is not b's, naming both hashes.
func UseLocal(path string, b Blob) ([]byte, error) {
	if err := b.Validate(); err != nil {
		return nil, fmt.Errorf("corpus: use %s: %w", path, err)
	}
	data, err := readVerified(context.Background(), path, b, true)
	if err != nil {
		return nil, fmt.Errorf("corpus: use %s: %w", path, err)
	}
	return data, nil
}

// readPiece is how much readVerified reads between checks of ctx.
const readPiece = 4 << 20

// readVerified reads the file at name if it holds exactly b's bytes. A file
// of another size or hash gives an error wrapping ErrHashMismatch; with
// hashOther it names the file's own sha256 too (hashing it whole, without
// keeping it, if its size is wrong). A missing file gives an error
// wrapping fs.ErrNotExist.
func readVerified(ctx context.Context, name string, b Blob, hashOther bool) ([]byte, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", name)
	}
	h := sha256.New()
	if st.Size() != b.Size {
		if !hashOther {
			return nil, fmt.Errorf("%w: %s has %d bytes, blob %s has %d", ErrHashMismatch, name, st.Size(), b.Hash, b.Size)
		}
		n, err := copyCtx(ctx, h, f)
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", name, err)
		}
		return nil, fmt.Errorf("%w: %s has sha256 %x and %d bytes, want %s and %d", ErrHashMismatch, name, h.Sum(nil), n, b.Hash, b.Size)
	}
	data := make([]byte, b.Size)
	if err := readFullCtx(ctx, f, data, h); err != nil {
		return nil, fmt.Errorf("read %s: %w", name, err)
	}
	if got := h.Sum(nil); [sha256.Size]byte(got) != b.sum() {
		return nil, fmt.Errorf("%w: %s has sha256 %x, want %s", ErrHashMismatch, name, got, b.Hash)
	}
	return data, nil
}

// readFullCtx fills dst from r, hashing it into h, and checks ctx between pieces.
func readFullCtx(ctx context.Context, r io.Reader, dst []byte, h hash.Hash) error {
	for off := 0; off < len(dst); {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, err := io.ReadFull(r, dst[off:min(off+readPiece, len(dst))])
		h.Write(dst[off : off+n])
		off += n
		if err != nil {
			return err // the file shrank under us, or a read failed
		}
	}
	return nil
}

// copyCtx copies r into w in pieces, checking ctx between them.
func copyCtx(ctx context.Context, w io.Writer, r io.Reader) (int64, error) {
	var total int64
	for {
		if err := ctx.Err(); err != nil {
			return total, err
		}
		n, err := io.CopyN(w, r, readPiece)
		total += n
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}
