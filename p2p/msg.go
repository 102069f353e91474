package p2p

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
)

// MaxMsgBytes is the largest control message the protocol allows, and the
// limit ReadMsg applies when given none.
const MaxMsgBytes = 4 << 20

// ErrBadMsg is wrapped by every error that reports a malformed control
// message. It wraps ErrViolation: the peer that sent it should be penalised.
var ErrBadMsg = NewViolation("p2p: bad message")

// WriteMsg writes v as JSON behind a 4-byte big-endian length prefix, in one
// Write. It refuses a message over MaxMsgBytes.
func WriteMsg(w io.Writer, v any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("p2p: write message: %w", err)
	}
	if len(body) > MaxMsgBytes {
		return fmt.Errorf("p2p: write message: %d bytes exceeds MaxMsgBytes %d", len(body), MaxMsgBytes)
	}
	buf := make([]byte, 4, 4+len(body))
	binary.BigEndian.PutUint32(buf, uint32(len(body)))
	buf = append(buf, body...)
	if _, err := w.Write(buf); err != nil {
		return fmt.Errorf("p2p: write message: %w", err)
	}
	return nil
}

// ReadMsg reads one message written by WriteMsg into v, which must be a
// pointer. A clean end of stream before the first byte is returned as
// io.EOF itself. maxBytes <= 0 or over MaxMsgBytes means MaxMsgBytes; a longer
// message is refused before its body is read or allocated. The body is read in
// chunks, its buffer growing with the bytes that arrive: a declared length
// costs nothing until the sender has sent that much.
//
// A message that is too long or not valid JSON for v is refused with an
// error wrapping ErrBadMsg. A message cut short gives an error wrapping
// io.ErrUnexpectedEOF and not ErrBadMsg (the stream broke; no violation).
// Other read errors are returned wrapped, without ErrBadMsg either.
func ReadMsg(r io.Reader, v any, maxBytes int) error {
	if maxBytes <= 0 || maxBytes > MaxMsgBytes {
		maxBytes = MaxMsgBytes
	}
	var p [4]byte
	if _, err := io.ReadFull(r, p[:]); err != nil {
		if err == io.EOF {
			return io.EOF
		}
		return msgReadErr("length", err)
	}
	n := binary.BigEndian.Uint32(p[:])
	if uint64(n) > uint64(maxBytes) {
		return fmt.Errorf("%w: length %d exceeds limit %d", ErrBadMsg, n, maxBytes)
	}
	body, err := readChunked(r, int(n))
	if err != nil {
		return msgReadErr("body", err)
	}
	if err := json.Unmarshal(body, v); err != nil {
		var inv *json.InvalidUnmarshalError
		if errors.As(err, &inv) {
			return fmt.Errorf("p2p: read message: %w", err) // the caller's mistake, not the peer's
		}
		return fmt.Errorf("%w: %w", ErrBadMsg, err)
	}
	return nil
}

// msgChunk is the most ReadMsg allocates ahead of the bytes it has received.
const msgChunk = 64 << 10

// readChunked reads exactly n bytes from r, allocating as they arrive (at
// most msgChunk ahead, and no more than twice what has been received).
func readChunked(r io.Reader, n int) ([]byte, error) {
	buf := make([]byte, 0, min(n, msgChunk))
	for len(buf) < n {
		if len(buf) == cap(buf) {
			buf = slices.Grow(buf, min(n-len(buf), max(len(buf), msgChunk)))
		}
		k, err := r.Read(buf[len(buf):min(n, cap(buf))])
		buf = buf[:len(buf)+k]
		if err != nil && len(buf) < n {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
	return buf, nil
}

func msgReadErr(part string, err error) error {
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return fmt.Errorf("p2p: read message: truncated %s: %w", part, io.ErrUnexpectedEOF)
	}
	return fmt.Errorf("p2p: read message %s: %w", part, err)
}
