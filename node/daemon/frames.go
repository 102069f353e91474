package daemon

import (
	"errors"
	"fmt"
	"io"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"

	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/traffic"
)

// handleFrames reads tensor frames from one stream until it ends; a frame that fails
// any check resets the stream and counts against its sender.
func (d *Daemon) handleFrames(proto protocol.ID) func(network.Stream) {
	meter := d.meters.For(proto)
	return func(s network.Stream) {
		from := s.Conn().RemotePeer()
		if !d.trackTensorIn(from, s) {
			s.Reset() // its run ended between the gate and here
			return
		}
		defer d.untrackTensorIn(from, s)
		d.host.NoteStream(s)
		r := &traffic.CountingReader{R: s}
		for {
			before := r.N
			f, err := p2p.ReadFrame(r, d.frameLimit())
			if errors.Is(err, io.EOF) {
				s.Close()
				return
			}
			if err != nil {
				d.penalise(s, from, err)
				return
			}
			meter.In(r.N - before)
			if err := d.route(proto, from, f, r.N-before); err != nil {
				d.penalise(s, from, err)
				return
			}
		}
	}
}

// trackTensorIn records s, a tensor stream from p being read, if p is still a peer of
// a run here. It asks the loop (once a stream), so that a run's end, which resets
// the streams of its peers, sees every stream tracked.
func (d *Daemon) trackTensorIn(p peer.ID, s network.Stream) bool {
	r := &tensorOpened{p: p, s: s}
	return d.ask(r) && r.ok
}

func (d *Daemon) untrackTensorIn(p peer.ID, s network.Stream) {
	d.ask(&tensorClosed{p: p, s: s})
}

// frameLimit is the largest frame any run here expects, so a compressed frame cannot
// make the node allocate more than a real one would; with no run, frames are refused
// after their header anyway. Read on every frame: from the loop's view.
func (d *Daemon) frameLimit() int {
	limit := 1 << 20
	for _, w := range d.view.Load().runs {
		limit = max(limit, w.MaxFrameBytes())
	}
	return limit
}

// route hands a frame of size bytes on the wire to the run it is for.
func (d *Daemon) route(proto protocol.ID, from peer.ID, f *p2p.Frame, size int64) error {
	if (proto == p2p.ProtoGradient) != (f.Kind == p2p.KindGradient) {
		return fmt.Errorf("%w: kind %d on %s", p2p.ErrBadFrame, f.Kind, proto)
	}
	w := d.run(f.Run)
	if w == nil {
		if d.hasEnded(f.Run) {
			// A neighbour still sending when the run stopped here: late, not malicious.
			return fmt.Errorf("frame for run %016x, which has ended on this node", f.Run)
		}
		return fmt.Errorf("%w: frame for unknown run %016x", p2p.ErrBadFrame, f.Run)
	}
	return w.Deliver(from, f, size)
}

// penalise resets the stream and, if err is a protocol violation (p2p.ErrViolation),
// counts it against the sender. A stream cut short (reset, timeout, truncated by a
// peer that died mid-write) is not one: honest peers on lossy links and peers that
// crash do that.
func (d *Daemon) penalise(s network.Stream, from peer.ID, err error) {
	if !errors.Is(err, p2p.ErrViolation) {
		s.Reset()
		d.log.Debug("stream ended early; reset", "peer", from, "err", err)
		return
	}
	// Recorded before the reset, so a sender that sees its stream reset finds the
	// penalty already counted.
	d.offence(from, err)
	s.Reset()
}

// offence counts a protocol violation against from.
func (d *Daemon) offence(from peer.ID, err error) {
	score, banned := d.host.Penalties().Add(from, err.Error())
	d.log.Warn("protocol violation", "peer", from, "err", err, "score", fmt.Sprintf("%.1f", score), "banned", banned)
}
