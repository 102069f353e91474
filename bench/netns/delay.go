package netns

import (
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// A delayLine holds every packet a node sends for the node's latency, drops a
// fraction of its frames, and writes the rest back into the node's TUN device
// for the node to forward out of its veth (see the package documentation).
type delayLine struct {
	log   *slog.Logger
	fd    int // the TUN device
	stop  int // an eventfd that close writes to
	delay time.Duration
	loss  float64
	rng   *rand.Rand

	base  time.Time // packet times are durations since base (monotonic)
	q     ring
	held  int      // bytes of buffer in q
	big   [][]byte // free read buffers
	small [][]byte // free buffers for short packets
	kept  []int    // scratch: the frames of a segment that loss spares

	done chan struct{}
	once sync.Once

	sent, lost, overflow, writeErrs atomic.Uint64
}

const (
	vnetHdrLen = 10      // struct virtio_net_hdr, the TUN default
	bigSize    = 1 << 17 // > vnetHdrLen + 64 KB, the largest segment TCP hands over
	smallSize  = 2048    // > vnetHdrLen + MTU
	// maxHeld bounds the buffer memory a line holds: 1 Gbit/s for 150 ms is
	// 19 MB of frames, in buffers up to twice their size. A full line drops,
	// as a full router queue would.
	maxHeld = 64 << 20
	// early: a packet this close to due is sent rather than slept for, as a
	// sleep costs a few microseconds of its own.
	early = 20 * time.Microsecond
	// readBatch bounds the reads between two looks at the head of the line.
	readBatch = 64

	tunFCSUM = 0x01 // TUN_F_CSUM: the device takes partial checksums
	tunFTSO4 = 0x02 // TUN_F_TSO4: and TCP/IPv4 segments larger than the MTU
)

// openDelayLine makes TUN device tun in namespace ns and starts the line. The
// device goes when the line closes.
func openDelayLine(ns, tun string, delay time.Duration, loss float64, rng *rand.Rand, log *slog.Logger) (*delayLine, error) {
	fd := -1
	err := inNetns(ns, func() error {
		var err error
		fd, err = unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
		if err != nil {
			return fmt.Errorf("open /dev/net/tun: %w", err)
		}
		ifr, err := unix.NewIfreq(tun)
		if err != nil {
			return fmt.Errorf("tun name %q: %w", tun, err)
		}
		ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			return fmt.Errorf("TUNSETIFF %s: %w", tun, err)
		}
		return nil
	})
	if err == nil {
		if err = unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, tunFCSUM|tunFTSO4); err != nil {
			err = fmt.Errorf("TUNSETOFFLOAD: %w", err)
		}
	}
	stop := -1
	if err == nil {
		if stop, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
			err = fmt.Errorf("eventfd: %w", err)
		}
	}
	if err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("netns: delay line in %s: %w", ns, err)
	}
	d := &delayLine{
		log:   log,
		fd:    fd,
		stop:  stop,
		delay: delay,
		loss:  loss,
		rng:   rng,
		base:  time.Now(),
		done:  make(chan struct{}),
	}
	go d.run()
	return d, nil
}

func (d *delayLine) now() time.Duration { return time.Since(d.base) }

// run is the line's loop. Its thread is never unlocked, so the runtime
// discards it (and its timer slack) when the loop ends.
func (d *delayLine) run() {
	runtime.LockOSThread()
	defer close(d.done)
	if err := unix.Prctl(unix.PR_SET_TIMERSLACK, 1, 0, 0, 0); err != nil {
		d.log.Warn("delay line: timer slack", "err", err)
	}
	fds := []unix.PollFd{{Fd: int32(d.fd), Events: unix.POLLIN}, {Fd: int32(d.stop), Events: unix.POLLIN}}
	rd := d.bigBuf()
	var ts unix.Timespec
	for {
		timeout := (*unix.Timespec)(nil) // nothing queued: wait for a packet
		if d.q.len() > 0 {
			wait := d.q.front().due - d.now()
			if wait <= early {
				d.writeDue()
				continue
			}
			ts = unix.NsecToTimespec(int64(wait))
			timeout = &ts
		}
		if _, err := unix.Ppoll(fds, timeout, nil); err != nil && !errors.Is(err, unix.EINTR) {
			d.log.Error("delay line: ppoll", "err", err)
			return
		}
		if fds[1].Revents != 0 {
			return
		}
		if fds[0].Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0 {
			d.log.Error("delay line: device failed", "revents", fds[0].Revents)
			return
		}
		for range readBatch {
			n, err := unix.Read(d.fd, rd)
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				break
			}
			if err != nil {
				d.log.Error("delay line: read", "err", err)
				return
			}
			rd = d.accept(rd, n)
		}
		d.writeDue()
	}
}

// accept queues the packet in buf[:n] and returns the buffer for the next
// read.
func (d *delayLine) accept(buf []byte, n int) []byte {
	if n <= vnetHdrLen || buf[vnetHdrLen]>>4 != 4 { // IPv4 only; IPv6 is off in the namespace
		return buf
	}
	due := d.now() + d.delay
	if d.loss > 0 {
		frames := gsoFrames(buf[:n])
		kept := d.kept[:0]
		for i := range frames {
			if d.rng.Float64() >= d.loss {
				kept = append(kept, i)
			}
		}
		d.kept = kept
		d.lost.Add(uint64(frames - len(kept)))
		if len(kept) < frames {
			for _, i := range kept {
				d.push(packet{buf: segment(d.smallBuf(), buf[:n], i), due: due})
			}
			return buf
		}
	}
	p := packet{buf: buf[:n], due: due}
	if n <= smallSize {
		// Keep the big buffer for reading: a line holding a window of
		// acknowledgements would otherwise hold 128 KB for each.
		p.buf = append(d.smallBuf(), buf[:n]...)
	} else {
		buf = d.bigBuf()
	}
	d.push(p)
	return buf
}

// push queues p, or drops it when the line is full.
func (d *delayLine) push(p packet) {
	if d.held+cap(p.buf) > maxHeld {
		d.overflow.Add(1)
		d.free(p.buf)
		return
	}
	d.held += cap(p.buf)
	d.q.push(p)
}

// writeDue hands every due packet back to the kernel.
func (d *delayLine) writeDue() {
	now := d.now()
	for d.q.len() > 0 && d.q.front().due-now <= early {
		p := d.q.pop()
		d.held -= cap(p.buf)
		if _, err := unix.Write(d.fd, p.buf); err != nil {
			d.writeErrs.Add(1) // lost, as on a wire
		} else {
			d.sent.Add(1)
		}
		d.free(p.buf)
	}
}

func (d *delayLine) free(b []byte) {
	switch cap(b) {
	case smallSize:
		d.small = append(d.small, b[:0])
	case bigSize:
		d.big = append(d.big, b[:cap(b)])
	}
}

func (d *delayLine) bigBuf() []byte {
	if k := len(d.big); k > 0 {
		b := d.big[k-1]
		d.big = d.big[:k-1]
		return b
	}
	return make([]byte, bigSize)
}

func (d *delayLine) smallBuf() []byte {
	if k := len(d.small); k > 0 {
		b := d.small[k-1]
		d.small = d.small[:k-1]
		return b
	}
	return make([]byte, 0, smallSize)
}

// close stops the line and removes its device; queued packets are dropped.
func (d *delayLine) close() {
	d.once.Do(func() {
		var one [8]byte
		one[0] = 1 // eventfd counters are native-endian; any non-zero value wakes
		if _, err := unix.Write(d.stop, one[:]); err != nil {
			d.log.Error("delay line: stop", "err", err)
		}
		<-d.done
		unix.Close(d.fd)
		unix.Close(d.stop)
		d.log.Debug("delay line closed", "sent", d.sent.Load(), "lost", d.lost.Load(),
			"overflow", d.overflow.Load(), "write_errors", d.writeErrs.Load())
	})
}

type packet struct {
	buf []byte        // virtio-net header and IPv4 packet
	due time.Duration // since the line's base
}

// ring is a growable FIFO of packets.
type ring struct {
	buf         []packet
	first, size int
}

func (r *ring) len() int       { return r.size }
func (r *ring) front() *packet { return &r.buf[r.first] }

func (r *ring) push(p packet) {
	if r.size == len(r.buf) {
		grown := make([]packet, max(64, 2*len(r.buf)))
		k := copy(grown, r.buf[r.first:])
		copy(grown[k:], r.buf[:r.first])
		r.buf, r.first = grown, 0
	}
	r.buf[(r.first+r.size)%len(r.buf)] = p
	r.size++
}

func (r *ring) pop() packet {
	p := r.buf[r.first]
	r.buf[r.first] = packet{}
	r.first = (r.first + 1) % len(r.buf)
	r.size--
	return p
}
