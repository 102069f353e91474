package reduce

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"

	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/traffic"
)

// Proto is the stream protocol all-reduce frames travel on. Each host
// opens one long-lived stream to each peer it sends to and writes every
// frame for that peer on it, in order; streams carry frames one way only.
const Proto protocol.ID = "/pipeswarm/reduce/1"

// ErrClosed is returned by calls on a closed Group or Service.
var ErrClosed = errors.New("reduce: closed")

type groupKey struct {
	run   uint64
	group uint32
}

// Service routes reduce streams of one libp2p host to the groups joined
// on it, and owns the outbound stream to each peer.
type Service struct {
	h        host.Host
	log      *slog.Logger
	penalise func(peer.ID, error)
	meter    *traffic.Meter        // nil: not counted
	held     func(run uint64) bool // nil: every run may be joined later (WithRuns)
	ctx      context.Context
	cancel   context.CancelFunc
	notifiee network.Notifiee

	// mu guards only these two lookup tables; group state is owned by each
	// group's loop and peer queues by their writers.
	mu     sync.Mutex
	groups map[groupKey]*Group
	outs   map[peer.ID]*peerOut
}

// Option adjusts a Service.
type Option func(*Service)

// WithMeter counts every frame the service reads and writes, headers
// included, on m.
func WithMeter(m *traffic.Meter) Option { return func(s *Service) { s.meter = m } }

// WithRuns tells the service which runs its host holds (or held a moment ago):
// a frame for any other run is refused at its header, as a violation, instead
// of its payload being read and dropped as a group not joined yet would be.
func WithRuns(held func(run uint64) bool) Option { return func(s *Service) { s.held = held } }

// NewService returns the service for h. penalise (may be nil) is called
// with the sender of every bad frame, and an error wrapping p2p.ErrViolation;
// never for a stream that breaks. The caller registers HandleStream:
// h.SetStreamHandler(Proto, svc.HandleStream).
func NewService(h host.Host, log *slog.Logger, penalise func(peer.ID, error), opts ...Option) *Service {
	if log == nil {
		log = slog.Default()
	}
	if penalise == nil {
		penalise = func(peer.ID, error) {}
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Service{
		h: h, log: log.With("subsystem", "reduce"), penalise: penalise, ctx: ctx, cancel: cancel,
		groups: make(map[groupKey]*Group), outs: make(map[peer.ID]*peerOut),
	}
	for _, o := range opts {
		o(s)
	}
	// A closed connection is a member gone: groups give it up at once
	// rather than waiting for a deadline.
	s.notifiee = &network.NotifyBundle{DisconnectedF: func(n network.Network, c network.Conn) {
		if p := c.RemotePeer(); !linked(n, p) {
			s.staleStream(p)
			go s.peerDown(p, errors.New("disconnected"))
		}
	}}
	h.Network().Notify(s.notifiee)
	return s
}

// Close stops the service's writers and closes every group joined on it.
func (s *Service) Close() error {
	s.h.Network().StopNotify(s.notifiee)
	s.mu.Lock()
	gs := make([]*Group, 0, len(s.groups))
	for _, g := range s.groups {
		gs = append(gs, g)
	}
	s.mu.Unlock()
	for _, g := range gs {
		g.Close()
	}
	s.cancel()
	return nil
}

func (s *Service) find(run uint64, group uint32) (*Group, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	g, ok := s.groups[groupKey{run, group}]
	return g, ok
}

// groupsOf lists the groups p is a member of.
func (s *Service) groupsOf(p peer.ID) []*Group {
	s.mu.Lock()
	defer s.mu.Unlock()
	var gs []*Group
	for _, g := range s.groups {
		if _, ok := g.indexOf(p); ok {
			gs = append(gs, g)
		}
	}
	return gs
}

func (s *Service) peerDown(p peer.ID, err error) {
	for _, g := range s.groupsOf(p) {
		if i, ok := g.indexOf(p); ok {
			g.post(evDown{from: i, err: err})
		}
	}
}

// HandleStream reads frames from a peer until the stream ends and hands
// each to its group. A bad frame resets the stream and penalises the
// peer; a stream that breaks or ends means the peer is gone.
func (s *Service) HandleStream(st network.Stream) {
	from := st.Conn().RemotePeer()
	s.log.Debug("stream in", "peer", from)
	// Counted above the buffer: the frame's own bytes, not what was read ahead.
	r := &traffic.CountingReader{R: bufio.NewReaderSize(st, 64<<10)}
	var g *Group
	find := func(run uint64, group uint32) (*limits, bool) {
		var ok bool
		if g, ok = s.find(run, group); !ok {
			if s.held != nil && !s.held(run) {
				return &limits{noRun: true}, true
			}
			return nil, false
		}
		if _, member := g.indexOf(from); !member {
			return &limits{stranger: true}, true
		}
		return &g.lim, true
	}
	for {
		before := r.N
		f, err := readFrame(r, find)
		if err == nil || errors.Is(err, errUnknownGroup) {
			s.meter.In(r.N - before)
		}
		switch {
		case errors.Is(err, errUnknownGroup):
			continue
		case errors.Is(err, p2p.ErrViolation):
			s.log.Warn("bad frame", "peer", from, "err", err)
			s.penalise(from, err)
			st.Reset()
			return
		case err != nil:
			st.Reset()
			if s.ctx.Err() == nil {
				s.log.Debug("stream ended", "peer", from, "err", err)
				s.peerDown(from, fmt.Errorf("stream: %w", err))
			}
			return
		}
		idx, member := g.indexOf(from)
		if !member {
			continue // its place passed to another peer after the frame's header was read
		}
		switch f.hdr.typ {
		case typeState, typeStateEnd, typeStateNone, typeStateInfo, typeStatePiecesEnd:
			g.toFetch(idx, f)
			continue
		}
		if !g.deliver(evFrame{from: idx, f: f}) {
			// The group closed after the frame's header was read (a node ending a
			// worker, maybe to start another in the same group): drop the frame and
			// keep the stream, which carries the peer's frames for the group that
			// takes its place. A reset would fail the peer's writes and make it
			// count this member down.
			s.log.Debug("frame for a closed group dropped", "peer", from, "type", f.hdr.typ)
			continue
		}
	}
}

// outFrame is a frame waiting to be written.
type outFrame struct {
	hdr     header
	payload []byte
}

// peerOut is the queue of frames to one peer and the goroutine writing
// them on one long-lived stream. Enqueueing never blocks, so a peer that
// stops reading delays only its own frames.
type peerOut struct {
	s    *Service
	id   peer.ID
	wake chan struct{} // capacity 1: there is something in q

	mu    sync.Mutex
	q     []outFrame
	stale bool // the stream's connection closed: open a new one before writing
}

// staleStream marks p's outbound stream as one on a closed connection, so that the
// next frame (to the same peer come back, say) goes on a new stream rather than
// being lost on the old one, with the frames queued behind it.
func (s *Service) staleStream(p peer.ID) {
	s.mu.Lock()
	o := s.outs[p]
	s.mu.Unlock()
	if o != nil {
		o.mu.Lock()
		o.stale = true
		o.mu.Unlock()
	}
}

// send queues frames for p, starting its writer if it has none.
func (s *Service) send(p peer.ID, frames ...outFrame) {
	s.mu.Lock()
	o := s.outs[p]
	if o == nil {
		o = &peerOut{s: s, id: p, wake: make(chan struct{}, 1)}
		s.outs[p] = o
		go o.run()
	}
	s.mu.Unlock()
	o.mu.Lock()
	o.q = append(o.q, frames...)
	o.mu.Unlock()
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// run writes queued frames until the service closes, opening the stream
// when it needs one. A failed stream drops the queue: the groups are told
// the peer is down and decide what to send again.
func (o *peerOut) run() {
	var st network.Stream
	defer func() {
		if st != nil {
			st.Close()
		}
	}()
	for {
		select {
		case <-o.wake:
		case <-o.s.ctx.Done():
			return
		}
		for {
			o.mu.Lock()
			if len(o.q) == 0 {
				o.mu.Unlock()
				break
			}
			f := o.q[0]
			o.q[0] = outFrame{}
			o.q = o.q[1:]
			stale := o.stale
			o.stale = false
			o.mu.Unlock()
			if stale && st != nil {
				st.Reset()
				st = nil
			}

			var err error
			if st == nil {
				// Never dial: a member's connection is the node's to
				// keep, and redialling a member that just died would hide
				// its death from the disconnect notification.
				if !linked(o.s.h.Network(), o.id) {
					err = errors.New("not connected")
				} else {
					// A relayed connection will do where hole punching failed.
					ctx := network.WithAllowLimitedConn(network.WithNoDial(o.s.ctx, "reduce"), "reduce")
					st, err = o.s.h.NewStream(ctx, o.id, Proto)
				}
				o.s.log.Debug("stream out", "peer", o.id, "err", err)
			}
			if err == nil {
				if err = writeFrame(st, &f.hdr, f.payload); err == nil {
					o.s.meter.Out(frameSize(len(f.payload)))
				}
			}
			if err != nil {
				if st != nil {
					st.Reset()
					st = nil
				}
				o.mu.Lock()
				o.q = nil
				o.mu.Unlock()
				if o.s.ctx.Err() != nil {
					return
				}
				o.s.log.Debug("send failed", "peer", o.id, "err", err)
				o.s.peerDown(o.id, fmt.Errorf("send: %w", err))
			}
		}
	}
}

// linked reports whether n has a connection to p, direct or through a relay.
func linked(n network.Network, p peer.ID) bool {
	c := n.Connectedness(p)
	return c == network.Connected || c == network.Limited
}
