package netns

import (
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// A delayLine holds every packet a node sends for the node's latency, drops a
// fraction of them, and sends the rest on the node's veth. Packets come from a
// TUN device that the node's route to the subnet points at and leave by a raw
// socket whose mark selects the route out of the veth.
type delayLine struct {
	log   *slog.Logger
	tun   *os.File
	raw   int
	delay time.Duration
	loss  float64
	rng   *rand.Rand // readLoop's only

	q        chan packet
	stopping atomic.Bool
	done     chan struct{} // closed when writeLoop has returned
	once     sync.Once

	lost, overflow, sent, sendErrs atomic.Uint64
}

type packet struct {
	buf *[bufSize]byte
	n   int
	due time.Time
}

const (
	bufSize = 2048 // > the TUN's MTU, so no read is truncated
	// queueLen bounds the packets in the line: 1 Gbit/s for 150 ms is 12500
	// full frames. A full line drops, as a full router queue would.
	queueLen = 1 << 15
	// early: a packet this close to due is sent rather than slept for; a
	// sleep costs a few microseconds of its own.
	early = 20 * time.Microsecond
)

var bufPool = sync.Pool{New: func() any { return new([bufSize]byte) }}

// openDelayLine makes TUN device tun and the raw socket in namespace ns and
// starts the line. The device goes when the line closes.
func openDelayLine(ns, tun string, delay time.Duration, loss float64, rng *rand.Rand, log *slog.Logger) (*delayLine, error) {
	tunFd, raw := -1, -1
	err := inNetns(ns, func() error {
		var err error
		// Non-blocking, so that the os.File below reads through the runtime's
		// poller and Close interrupts a pending read.
		tunFd, err = unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
		if err != nil {
			return fmt.Errorf("open /dev/net/tun: %w", err)
		}
		ifr, err := unix.NewIfreq(tun)
		if err != nil {
			return fmt.Errorf("tun name %q: %w", tun, err)
		}
		ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
		if err := unix.IoctlIfreq(tunFd, unix.TUNSETIFF, ifr); err != nil {
			return fmt.Errorf("TUNSETIFF %s: %w", tun, err)
		}
		// IPPROTO_RAW implies IP_HDRINCL: the packet goes out as read.
		raw, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		if err != nil {
			return fmt.Errorf("raw socket: %w", err)
		}
		if err := unix.SetsockoptInt(raw, unix.SOL_SOCKET, unix.SO_MARK, fwMark); err != nil {
			return fmt.Errorf("SO_MARK: %w", err)
		}
		return nil
	})
	if err != nil {
		if tunFd >= 0 {
			unix.Close(tunFd)
		}
		if raw >= 0 {
			unix.Close(raw)
		}
		return nil, fmt.Errorf("netns: delay line in %s: %w", ns, err)
	}
	d := &delayLine{
		log:   log,
		tun:   os.NewFile(uintptr(tunFd), "/dev/net/tun:"+tun),
		raw:   raw,
		delay: delay,
		loss:  loss,
		rng:   rng,
		q:     make(chan packet, queueLen),
		done:  make(chan struct{}),
	}
	go d.readLoop()
	go d.writeLoop()
	return d, nil
}

func (d *delayLine) readLoop() {
	defer close(d.q)
	for {
		b := bufPool.Get().(*[bufSize]byte)
		n, err := d.tun.Read(b[:])
		now := time.Now()
		if err != nil {
			bufPool.Put(b)
			if !errors.Is(err, os.ErrClosed) {
				d.log.Error("delay line: read tun", "err", err)
			}
			return
		}
		if n < 20 || b[0]>>4 != 4 { // IPv4 only; IPv6 is off in the namespace
			bufPool.Put(b)
			continue
		}
		if d.loss > 0 && d.rng.Float64() < d.loss {
			d.lost.Add(1)
			bufPool.Put(b)
			continue
		}
		select {
		case d.q <- packet{buf: b, n: n, due: now.Add(d.delay)}:
		default:
			d.overflow.Add(1)
			bufPool.Put(b)
		}
	}
}

// writeLoop sends each packet when it is due. It sleeps with nanosleep on a
// thread of its own with 1 ns timer slack: the runtime's timers wake on a
// millisecond grid when the process is idle, too coarse for a 0.5 ms link.
// The thread is never unlocked, so the runtime discards it (and its slack)
// when the loop ends.
func (d *delayLine) writeLoop() {
	runtime.LockOSThread()
	defer close(d.done)
	if err := unix.Prctl(unix.PR_SET_TIMERSLACK, 1, 0, 0, 0); err != nil {
		d.log.Warn("delay line: timer slack", "err", err)
	}
	var to unix.SockaddrInet4
	for p := range d.q {
		if d.stopping.Load() {
			bufPool.Put(p.buf)
			continue
		}
		if wait := time.Until(p.due); wait > early {
			ts := unix.NsecToTimespec(int64(wait))
			for {
				var left unix.Timespec
				if err := unix.Nanosleep(&ts, &left); err != unix.EINTR {
					break
				}
				ts = left
			}
		}
		copy(to.Addr[:], p.buf[16:20])
		if err := unix.Sendto(d.raw, p.buf[:p.n], 0, &to); err != nil {
			// ENOBUFS and the like: the packet is lost, as on a wire.
			d.sendErrs.Add(1)
		} else {
			d.sent.Add(1)
		}
		bufPool.Put(p.buf)
	}
}

// close stops the line: the TUN device goes with its file, queued packets are
// discarded.
func (d *delayLine) close() {
	d.once.Do(func() {
		d.stopping.Store(true)
		d.tun.Close() // ends readLoop, which closes q, which ends writeLoop
		<-d.done
		unix.Close(d.raw)
		d.log.Debug("delay line closed", "sent", d.sent.Load(), "lost", d.lost.Load(),
			"overflow", d.overflow.Load(), "send_errors", d.sendErrs.Load())
	})
}
