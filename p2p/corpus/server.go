package corpus

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/p2p/traffic"
)

// Server serves the blobs it was given, from memory, to Proto streams. It is
// safe for concurrent streams: handlers only read the blob table, which Add
// alone writes.
type Server struct {
	// Penalise, if set, is called with the sender and the error of every
	// malformed request (the error wraps ErrBadRequest and so
	// p2p.ErrViolation); a request cut short is no violation. Set it before
	// the server handles streams.
	Penalise func(peer.ID, error)
	// Meter, if set, counts requests received and replies sent. Set it before the
	// server handles streams.
	Meter *traffic.Meter

	log   *slog.Logger
	mu    sync.RWMutex
	blobs map[[sha256.Size]byte][]byte

	requests, bytes, refused, malformed atomic.Int64
}

// ServerStats counts what a Server has done since NewServer.
type ServerStats struct {
	Requests  int64 // well-formed requests, served or refused
	Bytes     int64 // blob bytes in replies, counted as each reply starts
	Refused   int64 // requests refused with a reply (unknown blob, wrong size)
	Malformed int64 // malformed requests (stream reset, sender penalised)
}

// NewServer returns a server with no blobs. A nil log means slog.Default().
func NewServer(log *slog.Logger) *Server {
	if log == nil {
		log = slog.Default()
	}
	return &Server{log: log.With("subsystem", "corpus"), blobs: make(map[[sha256.Size]byte][]byte)}
}

// Add makes data available to fetchers and returns its Blob. The server
// keeps data itself, not a copy: the caller must not modify it afterwards.
// Adding the same bytes twice is harmless. Add panics if data is larger
// than MaxBlobBytes.
func (s *Server) Add(data []byte) Blob {
	if len(data) > MaxBlobBytes {
		panic(fmt.Sprintf("corpus: Add: %d bytes exceeds MaxBlobBytes %d", len(data), MaxBlobBytes))
	}
	b := BlobOf(data)
	s.mu.Lock()
	s.blobs[b.sum()] = data
	s.mu.Unlock()
	return b
}

// Stats returns the server's counters.
func (s *Server) Stats() ServerStats {
	return ServerStats{
		Requests:  s.requests.Load(),
		Bytes:     s.bytes.Load(),
		Refused:   s.refused.Load(),
		Malformed: s.malformed.Load(),
	}
}

// HandleStream serves the requests on st until the fetcher closes its side,
// then closes st. Register it with h.SetStreamHandler(Proto, s.HandleStream)
// (or p2p.Host.Handle). A malformed request calls Penalise, then resets st.
// Each read and write has a deadline derived from its size and
// DefaultMinRate.
func (s *Server) HandleStream(st network.Stream) {
	from := st.Conn().RemotePeer()
	err := s.serve(st, func(err error) {
		if s.Penalise != nil {
			s.Penalise(from, err)
		}
	})
	switch {
	case err == nil:
		st.Close()
	case errors.Is(err, ErrBadRequest):
		// Count and penalise before the sender sees the reset.
		s.malformed.Add(1)
		s.log.Warn("malformed request", "peer", from, "err", err)
		if s.Penalise != nil {
			s.Penalise(from, err)
		}
		st.Reset()
	default:
		st.Reset()
		s.log.Debug("stream ended", "peer", from, "err", err)
	}
}

// deadlineRW is the part of a network.Stream that serve uses.
type deadlineRW interface {
	io.ReadWriter
	SetReadDeadline(time.Time) error
	SetWriteDeadline(time.Time) error
}

// serve answers requests on rw until a clean end of stream (nil) or an
// error; a malformed request's error wraps ErrBadRequest. A request for a blob
// the server does not hold is answered, and told to penalise (nil: not told):
// only a fetcher that probes for what is served asks for that.
func (s *Server) serve(rw deadlineRW, penalise func(error)) error {
	for {
		rw.SetReadDeadline(time.Now().Add(transferTimeout(requestLen, DefaultMinRate)))
		q, err := readRequest(rw)
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		s.requests.Add(1)
		s.Meter.In(requestLen)
		s.mu.RLock()
		data, ok := s.blobs[q.Sum]
		s.mu.RUnlock()

		var status byte = statusOK
		var reason string
		switch {
		case !ok:
			status, reason = statusUnknown, fmt.Sprintf("unknown blob %x", q.Sum)
		case uint64(len(data)) != q.Size:
			status, reason = statusWrongSize, fmt.Sprintf("blob %x has %d bytes, not %d", q.Sum, len(data), q.Size)
		}
		if status != statusOK {
			s.refused.Add(1)
			if status == statusUnknown && penalise != nil {
				penalise(fmt.Errorf("%w: %s", ErrNotServed, reason))
			}
			rw.SetWriteDeadline(time.Now().Add(transferTimeout(replyHeaderLen+int64(len(reason)), DefaultMinRate)))
			if _, err := rw.Write(append(replyHeader(status, len(reason)), reason...)); err != nil {
				return fmt.Errorf("corpus: write refusal: %w", err)
			}
			s.Meter.Out(replyHeaderLen + int64(len(reason)))
			continue
		}
		chunk := data[q.Offset : q.Offset+uint64(q.Length)] // validated: within Size == len(data)
		s.bytes.Add(int64(len(chunk)))                      // before writing, so a fetcher that has the bytes sees them counted
		rw.SetWriteDeadline(time.Now().Add(transferTimeout(replyHeaderLen+int64(len(chunk)), DefaultMinRate)))
		if _, err := rw.Write(replyHeader(statusOK, len(chunk))); err != nil {
			return fmt.Errorf("corpus: write reply: %w", err)
		}
		if _, err := rw.Write(chunk); err != nil {
			return fmt.Errorf("corpus: write reply: %w", err)
		}
		s.Meter.Out(replyHeaderLen + int64(len(chunk)))
	}
}
