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
	"syscall"
	"time"

	"golang.org/x/sys/unix"
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
// of 11 one-byte exchanges) and, unless bytes is 0, the throughput each way
// when sending bytes.
//
// Throughput is the rate at which the sender's TCP saw the bytes
// acknowledged over the second half of them, so that slow start is left out:
// bytes should be several bandwidth-delay products (a few seconds at the
// link's rate). It is TCP goodput: tbf counts Ethernet frames, so with a
// 1500-byte MTU it is at most 1448/1514 = 95.6% of the link's Mbps.
func (n *Net) Measure(ctx context.Context, i, j int, bytes int64) (Result, error) {
	n.checkIndex(i)
	n.checkIndex(j)
	if bytes < 0 {
		return Result{}, fmt.Errorf("netns: Measure: %d bytes", bytes)
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

// The measurement protocol, driven by the client: 'p' is echoed. 'u', a
// length and that many bytes from the client are answered by one byte once
// they are all in. 'd' and a length are answered by that many bytes, which
// the client acknowledges with one byte once they are all in, and then by the
// server's rate as a float64's bits.
const (
	opPing = 'p'
	opUp   = 'u'
	opDown = 'd'
	opDone = 'k'
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
	if bytes == 0 {
		return r, nil
	}

	hdr := make([]byte, 9)
	hdr[0] = opUp
	binary.BigEndian.PutUint64(hdr[1:], uint64(bytes))
	if _, err := c.Write(hdr); err != nil {
		return r, fmt.Errorf("up: %w", err)
	}
	var err error
	if r.UpMbps, err = sendMeasured(c, c, bytes); err != nil {
		return r, fmt.Errorf("up: %w", err)
	}

	hdr[0] = opDown
	if _, err := c.Write(hdr); err != nil {
		return r, fmt.Errorf("down: %w", err)
	}
	if err := drain(c, bytes); err != nil {
		return r, fmt.Errorf("down: %w", err)
	}
	if _, err := c.Write([]byte{opDone}); err != nil {
		return r, fmt.Errorf("down: %w", err)
	}
	var mbps [8]byte
	if _, err := io.ReadFull(c, mbps[:]); err != nil {
		return r, fmt.Errorf("down: %w", err)
	}
	r.DownMbps = math.Float64frombits(binary.BigEndian.Uint64(mbps[:]))
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
			if op == opUp {
				if err := drain(br, size); err != nil {
					return err
				}
				if _, err := c.Write([]byte{opDone}); err != nil {
					return err
				}
				continue
			}
			mbps, err := sendMeasured(c, br, size)
			if err != nil {
				return err
			}
			if _, err := c.Write(binary.BigEndian.AppendUint64(nil, math.Float64bits(mbps))); err != nil {
				return err
			}
		default:
			return fmt.Errorf("unknown op %q", op)
		}
	}
}

// sendMeasured sends size bytes on c, waits for the peer's opDone on r and
// returns the rate in Mbit/s at which the bytes reached the peer over the
// second half of them. The rate comes from the kernel's count of segments
// the peer has acknowledged, selectively or not (tcpi_delivered), sampled
// every millisecond: what arrives in order at the peer's application comes in
// bursts (a window held back behind a lost packet is released at once),
// which would throw a rate taken there off by up to a window.
func sendMeasured(c net.Conn, r io.Reader, size int64) (float64, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return 0, fmt.Errorf("%T has no socket", c)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return 0, err
	}
	sample := func() (delivered, mss int64, err error) {
		cerr := raw.Control(func(fd uintptr) {
			var info *unix.TCPInfo
			if info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
				delivered, mss = int64(info.Delivered), int64(info.Snd_mss)
			}
		})
		return delivered, mss, errors.Join(cerr, err)
	}
	d0, _, err := sample()
	if err != nil {
		return 0, fmt.Errorf("TCP_INFO: %w", err)
	}
	var samples []delivery
	stop, stopped := make(chan struct{}), make(chan error, 1)
	go func() {
		t := time.NewTicker(time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				stopped <- nil
				return
			case <-t.C:
			}
			d, mss, err := sample()
			if err != nil {
				stopped <- fmt.Errorf("TCP_INFO: %w", err)
				return
			}
			if b := (d - d0) * mss; b >= size/2 {
				samples = append(samples, delivery{time.Now(), b})
			}
		}
	}()
	err = sendZeros(c, size)
	if err == nil {
		var done [1]byte
		if _, err = io.ReadFull(r, done[:]); err == nil && done[0] != opDone {
			err = fmt.Errorf("peer sent %q, want %q", done[0], opDone)
		}
	}
	close(stop)
	if err := errors.Join(err, <-stopped); err != nil {
		return 0, err
	}
	return slope(samples, size)
}

type delivery struct {
	at    time.Time
	bytes int64
}

// slope is the rate in Mbit/s of the least-squares line through the samples.
func slope(s []delivery, size int64) (float64, error) {
	if len(s) < 3 || !s[len(s)-1].at.After(s[0].at) {
		return 0, fmt.Errorf("%d bytes took %d ms to send half of; send more to measure a rate", size, len(s))
	}
	var n, sx, sy, sxx, sxy float64
	for _, p := range s {
		x, y := p.at.Sub(s[0].at).Seconds(), float64(p.bytes)
		n, sx, sy, sxx, sxy = n+1, sx+x, sy+y, sxx+x*x, sxy+x*y
	}
	return (n*sxy - sx*sy) / (n*sxx - sx*sx) * 8 / 1e6, nil
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

func drain(r io.Reader, size int64) error {
	got, err := io.CopyN(io.Discard, r, size)
	if err != nil {
		return fmt.Errorf("after %d of %d bytes: %w", got, size, err)
	}
	return nil
}
