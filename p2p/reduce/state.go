package reduce

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"
)

// serveState answers a state request from member to with the vectors
// State returns, in pieces, then their sha256.
func (g *Group) serveState(to int, want uint64) {
	if g.cfg.State == nil || g.needFetch || g.left {
		g.sendCtl(to, header{typ: typeStateNone})
		return
	}
	r, vecs := g.cfg.State(want)
	if len(vecs) > maxStateVecs {
		g.log.Error("State returned too many vectors", "count", len(vecs), "max", maxStateVecs)
		g.sendCtl(to, header{typ: typeStateNone})
		return
	}
	for i, v := range vecs {
		if len(v) > g.cfg.MaxValues || firstNonFinite(v) >= 0 {
			g.log.Error("State returned an unservable vector", "index", i, "len", len(v), "max", g.cfg.MaxValues)
			g.sendCtl(to, header{typ: typeStateNone})
			return
		}
	}
	for i, v := range vecs {
		for k := range numPieces(len(v), g.lim.plen) {
			pr := pieceRange(len(v), g.lim.plen, k)
			payload := make([]byte, 4*pr.Len())
			for j, x := range v[pr.Lo:pr.Hi] {
				binary.LittleEndian.PutUint32(payload[4*j:], math.Float32bits(x))
			}
			g.sendFrame(to, header{typ: typeState, round: r, n: uint32(len(v)), index: uint32(i), offset: uint32(pr.Lo), count: uint32(pr.Len())}, payload)
		}
	}
	sum := stateHash(r, vecs)
	g.sendFrame(to, header{typ: typeStateEnd, round: r, index: uint32(len(vecs)), mask: g.live | bit(g.self)}, sum[:])
	g.log.Info("served state", "to", g.peerName(to), "round", r, "vectors", len(vecs))
}

// stateHash is the sha256 of round, the vector count, and each vector's
// length and values, all little-endian.
func stateHash(r uint64, vecs [][]float32) [hashLen]byte {
	h := sha256.New()
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], r)
	h.Write(b[:])
	binary.LittleEndian.PutUint32(b[:4], uint32(len(vecs)))
	h.Write(b[:4])
	buf := make([]byte, 0, 4096)
	for _, v := range vecs {
		binary.LittleEndian.PutUint32(b[:4], uint32(len(v)))
		h.Write(b[:4])
		for _, x := range v {
			buf = binary.LittleEndian.AppendUint32(buf, math.Float32bits(x))
			if len(buf) == cap(buf) {
				h.Write(buf)
				buf = buf[:0]
			}
		}
		h.Write(buf)
		buf = buf[:0]
	}
	var out [hashLen]byte
	h.Sum(out[:0])
	return out
}

// fetchReg is a FetchState in progress from one member: the stream
// handler hands it that member's state frames.
type fetchReg struct {
	peer   int
	frames chan *frame
	gone   chan struct{} // closed when the peer goes down
	stop   chan struct{} // closed when the fetch ends
	once   sync.Once
}

func (r *fetchReg) fail() { r.once.Do(func() { close(r.gone) }) }

// toFetch hands a state frame to the fetch in progress, if it is from the
// member being fetched from; otherwise the frame is dropped.
func (g *Group) toFetch(from int, f *frame) {
	reg := g.fetch.Load()
	if reg == nil || reg.peer != from {
		return
	}
	select {
	case reg.frames <- f:
	case <-reg.stop:
	case <-g.done:
	}
}

// FetchState downloads the state of a live member (what its
// GroupConfig.State returns), verified against the sha256 the member
// sends, and makes this member a member again from the round after it:
// the others are told to count it in. Members are tried in turn, live ones
// first; the error wraps ErrNoState if none served.
func (g *Group) FetchState(ctx context.Context) (round uint64, vecs [][]float32, err error) {
	return g.FetchStateAt(ctx, 0)
}

// FetchStateAt is FetchState asking for the state as of round want (0: the
// latest); a member that no longer holds it serves its latest, so the caller
// checks the round it gets.
func (g *Group) FetchStateAt(ctx context.Context, want uint64) (round uint64, vecs [][]float32, err error) {
	reply := make(chan []int, 1)
	order, err := call(ctx, g, evCandidates{reply: reply}, reply)
	if err != nil {
		return 0, nil, fmt.Errorf("reduce: fetch state: %w", err)
	}
	var errs []error
	for _, p := range order {
		r, live, vecs, err := g.fetchFrom(ctx, p, want)
		if err == nil {
			// Wait until the members count us in again, so that a round
			// they start after this returns includes us; a member that
			// does not answer within the fetch's stall time is left to
			// find out from our frames.
			acked := make(chan struct{})
			if !g.deliver(evFetched{round: r, live: live, reply: acked}) {
				return 0, nil, ErrClosed
			}
			timer := time.NewTimer(g.fetchStall())
			defer timer.Stop()
			select {
			case <-acked:
			case <-timer.C:
				g.log.Info("rejoined without every member's acknowledgement", "round", r)
			case <-ctx.Done():
				return 0, nil, fmt.Errorf("reduce: fetch state: %w", ctx.Err())
			case <-g.done:
				return 0, nil, ErrClosed
			}
			return r, vecs, nil
		}
		if ctx.Err() != nil {
			return 0, nil, fmt.Errorf("reduce: fetch state: %w", ctx.Err())
		}
		g.log.Info("fetch state failed", "from", g.peerName(p), "err", err)
		errs = append(errs, fmt.Errorf("member %d: %w", p, err))
	}
	return 0, nil, fmt.Errorf("%w: %w", ErrNoState, errors.Join(errs...))
}

// fetchStall is how long a fetch waits for the next frame: Margin times
// the time one full state frame takes at PriorRate, plus slack.
func (g *Group) fetchStall() time.Duration {
	return g.slack() + time.Duration(g.cfg.Margin*float64(frameSize(4*g.lim.plen))/g.cfg.PriorRate*float64(time.Second))
}

// fetchFrom downloads state from member p. It gives up when p goes down
// or sends nothing for Margin times the time one frame takes at the last
// measured rate, plus slack.
func (g *Group) fetchFrom(ctx context.Context, p int, want uint64) (r uint64, live uint64, vecs [][]float32, err error) {
	reg := &fetchReg{peer: p, frames: make(chan *frame), gone: make(chan struct{}), stop: make(chan struct{})}
	g.fetch.Store(reg)
	defer func() {
		g.fetch.CompareAndSwap(reg, nil)
		close(reg.stop)
	}()
	if !g.deliver(evStateReq{to: p, want: want}) {
		return 0, 0, nil, ErrClosed
	}
	stall := g.fetchStall()
	timer := time.NewTimer(stall)
	defer timer.Stop()
	var lens []int
	first := true
	for {
		var f *frame
		select {
		case f = <-reg.frames:
		case <-timer.C:
			return 0, 0, nil, fmt.Errorf("nothing for %v", stall)
		case <-reg.gone:
			return 0, 0, nil, errors.New("member went down")
		case <-ctx.Done():
			return 0, 0, nil, ctx.Err()
		case <-g.done:
			return 0, 0, nil, ErrClosed
		}
		timer.Reset(stall)
		h := &f.hdr
		if first {
			r, first = h.round, false
		}
		bad := func(format string, args ...any) error {
			err := badFrame("state: "+format, args...)
			g.svc.penalise(g.peerAt(p), err)
			return err
		}
		if h.round != r {
			return 0, 0, nil, bad("round %d after %d", h.round, r)
		}
		switch h.typ {
		case typeStateNone:
			return 0, 0, nil, errors.New("member has no state to serve")
		case typeState:
			i := int(h.index)
			if i == len(vecs) && h.offset == 0 {
				vecs = append(vecs, make([]float32, 0, min(int(h.n), g.lim.plen)))
				lens = append(lens, int(h.n))
			}
			if i != len(vecs)-1 || int(h.n) != lens[i] || int(h.offset) != len(vecs[i]) {
				return 0, 0, nil, bad("vector %d of %d values at %d out of order", i, h.n, h.offset)
			}
			vecs[i] = append(vecs[i], f.vals...)
		case typeStateEnd:
			if int(h.index) != len(vecs) {
				return 0, 0, nil, bad("%d vectors announced, %d sent", h.index, len(vecs))
			}
			for i, v := range vecs {
				if len(v) != lens[i] {
					return 0, 0, nil, bad("vector %d has %d of %d values", i, len(v), lens[i])
				}
			}
			if sum := stateHash(r, vecs); string(sum[:]) != string(f.payload) {
				return 0, 0, nil, bad("sha256 mismatch")
			}
			return r, h.mask, vecs, nil
		}
	}
}
