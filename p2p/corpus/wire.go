package corpus

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/libp2p/go-libp2p/core/protocol"

	"github.com/pipeswarm/pipeswarm/p2p"
)

// Wire format on a Proto stream. The fetcher writes requests and reads one
// reply after each; it may send several requests, one after another, on a
// stream, and closes its write side when done. Integers are big-endian.
//
// Request, requestLen bytes:
//
//	offset size field
//	     0   32 sha256 of the blob (raw, not hex)
//	    32    8 size of the blob, as the fetcher knows it; at most MaxBlobBytes
//	    40    8 offset of the first byte wanted
//	    48    4 length wanted, 1..ChunkBytes, with offset+length <= size
//
// Reply header, replyHeaderLen bytes, then length bytes:
//
//	0    1 status: statusOK, statusUnknown or statusWrongSize
//	1    4 length: with statusOK exactly the length asked for, followed
//	     by the blob's bytes [offset, offset+length); otherwise at most
//	     maxReasonBytes, followed by a UTF-8 reason for the refusal
//
// A request that breaks the bounds above is malformed: the server resets the
// stream and counts it against the sender. An unknown blob, or a known one
// whose size is not the one asked for, is refused with a reply and the stream
// stays open.
const (
	requestLen     = 52
	replyHeaderLen = 5
	maxReasonBytes = 512

	statusOK        = 0
	statusUnknown   = 1 // the server has no blob with this sha256
	statusWrongSize = 2 // the server's blob with this sha256 has another size
)

// ChunkBytes is the most a request may ask for, and what the Fetcher asks
// for at a time.
const ChunkBytes = 1 << 20

// Deadlines: a transfer of n bytes may take baseTimeout plus n at the
// minimum rate.
const (
	// DefaultMinRate is the slowest transfer, in bytes per second, that a
	// server or Fetcher (MinRate 0) waits for before giving up on a stream.
	DefaultMinRate = 64 << 10
	// baseTimeout covers round trips, stream setup and a fetcher's pause
	// between requests, on top of the time the bytes take.
	baseTimeout = 10 * time.Second
)

// transferTimeout is how long moving n bytes may take at rate bytes per second.
func transferTimeout(n, rate int64) time.Duration {
	return baseTimeout + time.Duration(n)*time.Second/time.Duration(rate)
}

var (
	// ErrBadRequest is wrapped by errors that report a malformed request.
	// It wraps p2p.ErrViolation: the peer that sent it should be penalised.
	ErrBadRequest = p2p.NewViolation("corpus: bad request")
	// ErrNotServed is a well-formed request for a blob the server does not hold;
	// the server answers it, and counts it against the asker (a violation: a
	// fetcher asks for what its run's plan names, which its launcher serves).
	ErrNotServed = p2p.NewViolation("corpus: request for a blob not served")
	// ErrBadReply is wrapped by errors that report a malformed reply: an
	// unknown status, a length other than the one asked for, an oversized
	// reason. It wraps p2p.ErrViolation: the peer that sent it should be
	// penalised.
	ErrBadReply = p2p.NewViolation("corpus: bad reply")
	// errWrongBytes is wrapped, with ErrHashMismatch, by the error a peer is
	// penalised with when every byte of a blob came from it and they do not
	// hash to the blob.
	errWrongBytes = p2p.NewViolation("corpus: served bytes that do not match the blob")
	// ErrUnknownBlob is wrapped by the error a Fetch reports from a peer
	// that does not have the blob.
	ErrUnknownBlob = errors.New("corpus: unknown blob")
	// ErrWrongSize is wrapped by the error a Fetch reports from a peer whose
	// blob with the requested sha256 has another size than the one asked for.
	ErrWrongSize = errors.New("corpus: blob size differs")
)

// request asks for bytes [Offset, Offset+Length) of the blob with sha256 Sum
// and size Size.
type request struct {
	Sum    [sha256.Size]byte
	Size   uint64
	Offset uint64
	Length uint32
}

func (q request) append(b []byte) []byte {
	b = append(b, q.Sum[:]...)
	b = binary.BigEndian.AppendUint64(b, q.Size)
	b = binary.BigEndian.AppendUint64(b, q.Offset)
	return binary.BigEndian.AppendUint32(b, q.Length)
}

// validate reports the first bound q breaks, wrapping ErrBadRequest.
func (q request) validate() error {
	switch {
	case q.Size > MaxBlobBytes:
		return fmt.Errorf("%w: size %d exceeds MaxBlobBytes %d", ErrBadRequest, q.Size, MaxBlobBytes)
	case q.Length == 0 || q.Length > ChunkBytes:
		return fmt.Errorf("%w: length %d outside [1, %d]", ErrBadRequest, q.Length, ChunkBytes)
	case q.Offset > q.Size || uint64(q.Length) > q.Size-q.Offset:
		return fmt.Errorf("%w: bytes [%d, +%d) outside a blob of %d", ErrBadRequest, q.Offset, q.Length, q.Size)
	}
	return nil
}

// readRequest reads and validates one request. A clean end of stream before
// its first byte is io.EOF itself; an out-of-bounds request wraps
// ErrBadRequest; a request cut short wraps io.ErrUnexpectedEOF (a stream that
// broke: no violation), and other read errors are returned wrapped. It
// allocates nothing that depends on the input.
func readRequest(r io.Reader) (request, error) {
	var b [requestLen]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		if err == io.EOF {
			return request{}, io.EOF
		}
		return request{}, fmt.Errorf("corpus: read request: %w", err)
	}
	var q request
	copy(q.Sum[:], b[:32])
	q.Size = binary.BigEndian.Uint64(b[32:])
	q.Offset = binary.BigEndian.Uint64(b[40:])
	q.Length = binary.BigEndian.Uint32(b[48:])
	if err := q.validate(); err != nil {
		return request{}, err
	}
	return q, nil
}

func replyHeader(status byte, n int) []byte {
	return binary.BigEndian.AppendUint32([]byte{status}, uint32(n))
}

// readReply reads the reply to a request for len(dst) bytes. With statusOK
// the bytes are read into dst and status is statusOK; a refusal returns its
// status and reason with a nil error. A malformed reply wraps ErrBadReply; a
// stream that ends early or fails gives a read error.
func readReply(r io.Reader, dst []byte) (status byte, reason string, err error) {
	var h [replyHeaderLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, "", fmt.Errorf("read reply header: %w", err)
	}
	status, n := h[0], binary.BigEndian.Uint32(h[1:])
	switch status {
	case statusOK:
		if uint64(n) != uint64(len(dst)) {
			return 0, "", fmt.Errorf("%w: %d bytes, asked for %d", ErrBadReply, n, len(dst))
		}
		if _, err := io.ReadFull(r, dst); err != nil {
			return 0, "", fmt.Errorf("read reply body: %w", err)
		}
		return statusOK, "", nil
	case statusUnknown, statusWrongSize:
		if n > maxReasonBytes {
			return 0, "", fmt.Errorf("%w: reason of %d bytes exceeds %d", ErrBadReply, n, maxReasonBytes)
		}
		var buf [maxReasonBytes]byte
		if _, err := io.ReadFull(r, buf[:n]); err != nil {
			return 0, "", fmt.Errorf("read reply reason: %w", err)
		}
		return status, string(buf[:n]), nil
	}
	return 0, "", fmt.Errorf("%w: unknown status %d", ErrBadReply, status)
}

// Proto is the stream protocol blobs are fetched over.
const Proto protocol.ID = "/pipeswarm/data/1"
