package netns

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"slices"
	"time"
)

// Result is what Measure saw between two nodes.
type Result struct {
	RTT      time.Duration // median of small TCP round trips
	UpMbps   float64       // from the first node to the second
	DownMbps float64       // from the second node to the first
}

func (r Result) String() string {
	return fmt.Sprintf("rtt %v, up %.1f Mbit/s, down %.1f Mbit/s", r.RTT.Round(10*time.Microsecond), r.UpMbps, r.DownMbps)
}

const pings = 11

// Measure connects node i to node j (-1: the hub) over TCP with sockets this
// process makes inside their namespaces, and measures the round trip (median
// of 11 one-byte exchanges) and the throughput each way when sending bytes.
// Throughput is taken by the receiver over the second half of the bytes, so
// that slow start is left out: bytes should be several bandwidth-delay
// products, and more on a lossy link, where TCP delivers in bursts. It is
// TCP goodput: tbf counts Ethernet frames, so with a 1500-byte MTU it is at
// most 1448/1514 = 95.6% of the link's Mbps.
func (n *Net) Measure(ctx context.Context, i, j int, bytes int64) (Result, error) {
	n.checkIndex(i)
	n.checkIndex(j)
	if bytes < 2 {
		return Result{}, fmt.Errorf("netns: Measure: %d bytes, want at least 2", bytes)
	}
	n.mu.Lock()
	closed := n.closed
	n.mu.Unlock()
	if closed {
		return Result{}, errClosed
	}
	var ln net.Listener
	err := inNetns(n.nsName(j), func() error {
		var err error
		ln, err = (&net.ListenConfig{}).Listen(ctx, "tcp4", net.JoinHostPort(n.Addr(j), "0"))
		return err
	})
	if err != nil {
		return Result{}, fmt.Errorf("netns: Measure: listen in %s: %w", n.nsName(j), err)
	}
	defer ln.Close()
	serveErr := make(chan error, 1)
	go func() { serveErr <- serveMeasure(ctx, ln) }()

	var c net.Conn
	err = inNetns(n.nsName(i), func() error {
		var err error
		c, err = (&net.Dialer{}).DialContext(ctx, "tcp4", ln.Addr().String())
		return err
	})
	if err != nil {
		return Result{}, fmt.Errorf("netns: Measure: dial %s from %s: %w", ln.Addr(), n.nsName(i), err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	r, err := clientMeasure(c, bytes)
	if err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return Result{}, fmt.Errorf("netns: Measure %d->%d: %w", i, j, err)
	}
	c.Close()
	if err := <-serveErr; err != nil && ctx.Err() == nil {
		return Result{}, fmt.Errorf("netns: Measure %d->%d: server: %w", i, j, err)
	}
	return r, nil
}

// The measurement protocol, driven by the client: 'p' is echoed; 'u' then a
// length then that many bytes is answered by the receiver's Mbit/s as the
// float's bits; 'd' then a length is answered by that many bytes.
const (
	opPing = 'p'
	opUp   = 'u'
	opDown = 'd'
)

func clientMeasure(c net.Conn, bytes int64) (Result, error) {
	var r Result
	rtts := make([]time.Duration, 0, pings)
	b := []byte{opPing}
	for range pings {
		t := time.Now()
		if _, err := c.Write(b); err != nil {
			return r, fmt.Errorf("ping: %w", err)
		}
		if _, err := io.ReadFull(c, b); err != nil {
			return r, fmt.Errorf("ping: %w", err)
		}
		rtts = append(rtts, time.Since(t))
	}
	slices.Sort(rtts)
	r.RTT = rtts[len(rtts)/2]

	hdr := make([]byte, 9)
	hdr[0] = opUp
	binary.BigEndian.PutUint64(hdr[1:], uint64(bytes))
	if _, err := c.Write(hdr); err != nil {
		return r, fmt.Errorf("up: %w", err)
	}
	if err := sendZeros(c, bytes); err != nil {
		return r, fmt.Errorf("up: %w", err)
	}
	var mbps [8]byte
	if _, err := io.ReadFull(c, mbps[:]); err != nil {
		return r, fmt.Errorf("up: %w", err)
	}
	r.UpMbps = float64frombits(mbps[:])

	hdr[0] = opDown
	if _, err := c.Write(hdr); err != nil {
		return r, fmt.Errorf("down: %w", err)
	}
	var err error
	if r.DownMbps, err = receive(c, bytes); err != nil {
		return r, fmt.Errorf("down: %w", err)
	}
	return r, nil
}

// serveMeasure answers one client on ln until it hangs up.
func serveMeasure(ctx context.Context, ln net.Listener) error {
	c, err := ln.Accept()
	if err != nil {
		return err
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	br := bufio.NewReader(c)
	for {
		op, err := br.ReadByte()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		switch op {
		case opPing:
			if _, err := c.Write([]byte{opPing}); err != nil {
				return err
			}
		case opUp, opDown:
			var l [8]byte
			if _, err := io.ReadFull(br, l[:]); err != nil {
				return err
			}
			size := int64(binary.BigEndian.Uint64(l[:]))
			if op == opDown {
				if err := sendZeros(c, size); err != nil {
					return err
				}
				continue
			}
			mbps, err := receive(br, size)
			if err != nil {
				return err
			}
			if _, err := c.Write(float64bits(mbps)); err != nil {
				return err
			}
		default:
			return fmt.Errorf("unknown op %q", op)
		}
	}
}

func sendZeros(w io.Writer, size int64) error {
	buf := make([]byte, 256<<10)
	for size > 0 {
		k := min(size, int64(len(buf)))
		if _, err := w.Write(buf[:k]); err != nil {
			return err
		}
		size -= k
	}
	return nil
}

// receive reads size bytes and returns the rate in Mbit/s over the second
// half of them: the slope of the least-squares line through (time, bytes so
// far) at every read. Unlike bytes over elapsed time, the slope does not
// count a window's worth of bytes that arrived early and were held back
// behind a lost packet as if they had come at the start or end.
func receive(r io.Reader, size int64) (float64, error) {
	buf := make([]byte, 256<<10)
	var got int64
	var half time.Time
	var n, sx, sy, sxx, sxy float64 // x: seconds since half, y: bytes
	for got < size {
		k, err := r.Read(buf[:min(size-got, int64(len(buf)))])
		got += int64(k)
		if k > 0 && got >= size/2 {
			now := time.Now()
			if half.IsZero() {
				half = now
			}
			x, y := now.Sub(half).Seconds(), float64(got)
			n, sx, sy, sxx, sxy = n+1, sx+x, sy+y, sxx+x*x, sxy+x*y
		}
		if err != nil {
			return 0, fmt.Errorf("after %d of %d bytes: %w", got, size, err)
		}
	}
	den := n*sxx - sx*sx
	if n < 3 || den <= 0 {
		return 0, fmt.Errorf("%d bytes arrived in %v reads; send more to measure a rate", size, n)
	}
	return (n*sxy - sx*sy) / den * 8 / 1e6, nil
}

func float64bits(f float64) []byte {
	return binary.BigEndian.AppendUint64(nil, math.Float64bits(f))
}

func float64frombits(b []byte) float64 { return math.Float64frombits(binary.BigEndian.Uint64(b)) }
