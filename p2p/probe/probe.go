// Package probe measures the round-trip time and the throughput each way
// between two libp2p hosts, over a real or a simulated network, to set
// beside the link profile they are meant to have.
//
// Register installs the responder; Measure runs RTTSamples 8-byte
// ping-pongs on one stream (the median is the RTT), then a bulk transfer
// up (to the peer) and one down, each on a new connection. Throughput is
// the rate of the second half of a transfer as its receiver sees it: the
// handshake and slow start are not counted, so it is the rate a long
// transfer settles at, in Mbit/s of stream payload.
//
// Each transfer gets a new connection because quic-go's congestion
// controller does not recover from a bulk transfer in the other direction
// on the same connection: while that ran, this direction's sender was
// idle in slow start, and the queueing delay it saw in its ACKs made it
// leave slow start at its initial window (see package p2p/simlink). Measure
// closes h's connections to p to do so; run it before real traffic, not
// beside it.
package probe

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
)

// ID is the probe protocol.
const ID protocol.ID = "/pipeswarm/probe/1"

const (
	// RTTSamples is the number of timed round trips, after one untimed.
	RTTSamples = 9
	// MaxBytes bounds a transfer a peer may ask for.
	MaxBytes = 1 << 30
	// MinBytes is the smallest transfer Measure runs: its second half
	// must span many packets to be a rate.
	MinBytes = 64 << 10
	// serveTimeout bounds how long the responder serves one stream.
	serveTimeout = 5 * time.Minute

	opPing     = 'p'
	opUpload   = 'u' // the client sends n bytes; the responder times them
	opDownload = 'd' // the responder sends n bytes; the client times them
)

// ErrProtocol is wrapped by errors about a peer that breaks the protocol.
var ErrProtocol = errors.New("probe: protocol error")

// Result is one measurement between two hosts.
type Result struct {
	RTT      time.Duration // median round trip of a small message on an open stream
	UpMbps   float64       // to the peer, Mbit/s of payload
	DownMbps float64       // from the peer
}

func (r Result) String() string {
	return fmt.Sprintf("rtt %.2f ms, up %.1f Mbit/s, down %.1f Mbit/s", float64(r.RTT)/1e6, r.UpMbps, r.DownMbps)
}

// Register installs the probe responder on h.
func Register(h host.Host) { h.SetStreamHandler(ID, serve) }

// serve answers one probe stream. A peer that breaks the protocol gets a
// reset.
func serve(s network.Stream) {
	s.SetDeadline(time.Now().Add(serveTimeout))
	if err := respond(s); err != nil {
		s.Reset()
		return
	}
	s.Close()
}

func respond(s network.Stream) error {
	var hdr [9]byte
	if _, err := io.ReadFull(s, hdr[:]); err != nil {
		return err
	}
	n := int64(binary.BigEndian.Uint64(hdr[1:]))
	switch hdr[0] {
	case opPing:
		var b [8]byte
		for {
			if _, err := io.ReadFull(s, b[:]); err != nil {
				if errors.Is(err, io.EOF) {
					return nil
				}
				return err
			}
			if _, err := s.Write(b[:]); err != nil {
				return err
			}
		}
	case opUpload:
		if n < MinBytes || n > MaxBytes {
			return fmt.Errorf("%w: upload of %d bytes", ErrProtocol, n)
		}
		rate, err := receive(s, n)
		if err != nil {
			return err
		}
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], math.Float64bits(rate))
		_, err = s.Write(b[:])
		return err
	case opDownload:
		if n < MinBytes || n > MaxBytes {
			return fmt.Errorf("%w: download of %d bytes", ErrProtocol, n)
		}
		return send(s, n)
	}
	return fmt.Errorf("%w: op %q", ErrProtocol, hdr[0])
}

// Measure measures the path from h to p, which must run Register: RTT,
// then a transfer of bytes (at least MinBytes) each way, each on a new
// connection (Measure closes h's connections to p first, so h must be
// able to dial p: p's addresses in h's peerstore). Pick bytes to
// last a second or two at the rate you expect, so that slow start is over
// by half way. ctx bounds the whole measurement.
func Measure(ctx context.Context, h host.Host, p peer.ID, bytes int64) (Result, error) {
	if bytes < MinBytes || bytes > MaxBytes {
		return Result{}, fmt.Errorf("probe: measure %d bytes: want %d..%d", bytes, MinBytes, MaxBytes)
	}
	var r Result
	var err error
	if r.RTT, err = rtt(ctx, h, p); err != nil {
		return r, fmt.Errorf("probe: rtt to %s: %w", p, err)
	}
	up, err := transfer(ctx, h, p, opUpload, bytes)
	if err != nil {
		return r, fmt.Errorf("probe: upload to %s: %w", p, err)
	}
	down, err := transfer(ctx, h, p, opDownload, bytes)
	if err != nil {
		return r, fmt.Errorf("probe: download from %s: %w", p, err)
	}
	r.UpMbps = up * 8 / 1e6
	r.DownMbps = down * 8 / 1e6
	return r, nil
}

// open starts a probe stream with the given header. The stream is reset
// if ctx ends before done is called; done closes it.
func open(ctx context.Context, h host.Host, p peer.ID, op byte, n int64) (s network.Stream, done func(), err error) {
	s, err = h.NewStream(ctx, p, ID)
	if err != nil {
		return nil, nil, err
	}
	stop := context.AfterFunc(ctx, func() { s.Reset() })
	done = func() {
		stop()
		s.Close()
	}
	var hdr [9]byte
	hdr[0] = op
	binary.BigEndian.PutUint64(hdr[1:], uint64(n))
	if _, err := s.Write(hdr[:]); err != nil {
		done()
		return nil, nil, err
	}
	return s, done, nil
}

func rtt(ctx context.Context, h host.Host, p peer.ID) (time.Duration, error) {
	s, done, err := open(ctx, h, p, opPing, 0)
	if err != nil {
		return 0, err
	}
	defer done()
	var b [8]byte
	samples := make([]time.Duration, 0, RTTSamples)
	for i := range RTTSamples + 1 {
		binary.BigEndian.PutUint64(b[:], uint64(i))
		start := time.Now()
		if _, err := s.Write(b[:]); err != nil {
			return 0, err
		}
		if _, err := io.ReadFull(s, b[:]); err != nil {
			return 0, err
		}
		if got := binary.BigEndian.Uint64(b[:]); got != uint64(i) {
			return 0, fmt.Errorf("%w: ping %d echoed as %d", ErrProtocol, i, got)
		}
		if i > 0 { // the first carries the stream's opening
			samples = append(samples, time.Since(start))
		}
	}
	if err := s.CloseWrite(); err != nil {
		return 0, err
	}
	slices.Sort(samples)
	return samples[len(samples)/2], nil
}

// transfer runs one bulk transfer on a new connection and returns the rate
// of its second half in bytes/s, as its receiver saw it.
func transfer(ctx context.Context, h host.Host, p peer.ID, op byte, n int64) (float64, error) {
	if err := h.Network().ClosePeer(p); err != nil {
		return 0, fmt.Errorf("closing the connection to start afresh: %w", err)
	}
	s, done, err := open(ctx, h, p, op, n)
	if err != nil {
		return 0, err
	}
	defer done()
	if op == opDownload {
		return receive(s, n)
	}
	if err := send(s, n); err != nil {
		return 0, err
	}
	var b [8]byte
	if _, err := io.ReadFull(s, b[:]); err != nil {
		return 0, err
	}
	rate := math.Float64frombits(binary.BigEndian.Uint64(b[:]))
	if !(rate > 0) || math.IsInf(rate, 1) {
		return 0, fmt.Errorf("%w: peer measured the upload at %v bytes/s", ErrProtocol, rate)
	}
	return rate, nil
}

const chunk = 64 << 10

func send(s network.Stream, n int64) error {
	buf := make([]byte, chunk)
	for n > 0 {
		k := min(n, chunk)
		if _, err := s.Write(buf[:k]); err != nil {
			return err
		}
		n -= k
	}
	return s.CloseWrite()
}

// receive reads n bytes and returns the rate of the second half in
// bytes/s: the least-squares slope of the bytes received against time,
// fitted to that curve over the whole time (each step between two reads
// weighted by its length), not to the reads, which bunch up after a
// stall. A lost packet holds back what follows it until its
// retransmission arrives, about an RTT, then releases it at once; such a
// step moves the slope less than it would move the rate between the
// half-way mark and the end, as long as the half lasts many RTTs.
func receive(s network.Stream, n int64) (float64, error) {
	buf := make([]byte, chunk)
	var got int64
	var start, last time.Time
	var fit line
	for got < n {
		want := n - got
		if got < n/2 {
			want = n/2 - got // stop at the half-way mark to start the fit there
		}
		k, err := s.Read(buf[:min(want, chunk)])
		if got >= n/2 { // the curve stood at got since last
			now := time.Now()
			mid := (last.Sub(start) + now.Sub(start)).Seconds() / 2
			fit.add(mid, float64(got-n/2), now.Sub(last).Seconds())
			last = now
		}
		got += int64(k)
		if start.IsZero() && got >= n/2 {
			start = time.Now()
			last = start
		}
		if err != nil && got < n {
			return 0, err
		}
	}
	rate := fit.slope()
	if !(rate > 0) || math.IsInf(rate, 1) {
		return 0, fmt.Errorf("probe: %d bytes arrived too fast to time", n)
	}
	return rate, nil
}

// line fits y = a + slope·x by weighted least squares.
type line struct{ w, sx, sy, sxx, sxy float64 }

func (l *line) add(x, y, w float64) {
	l.w += w
	l.sx += w * x
	l.sy += w * y
	l.sxx += w * x * x
	l.sxy += w * x * y
}

func (l *line) slope() float64 {
	return (l.w*l.sxy - l.sx*l.sy) / (l.w*l.sxx - l.sx*l.sx)
}
