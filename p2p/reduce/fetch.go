package reduce

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// fetchReg is a FetchState in progress: the stream handlers hand it the
// state frames of the members in peers.
type fetchReg struct {
	peers  uint64
	tag    uint32 // in every frame of this fetch, both ways
	frames chan fetchedFrame
	stop   chan struct{} // closed when the fetch ends

	mu     sync.Mutex
	down   uint64        // members gone since the fetch began
	downCh chan struct{} // a value when down grew
}

type fetchedFrame struct {
	from int
	f    *frame
}

func newFetchReg(peers uint64, tag uint32) *fetchReg {
	return &fetchReg{peers: peers, tag: tag, frames: make(chan fetchedFrame), stop: make(chan struct{}), downCh: make(chan struct{}, 1)}
}

// fail notes that member p went down.
func (r *fetchReg) fail(p int) {
	r.mu.Lock()
	r.down |= bit(p)
	r.mu.Unlock()
	select {
	case r.downCh <- struct{}{}:
	default:
	}
}

func (r *fetchReg) gone() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.down
}

// toFetch hands a state frame to the fetch in progress, if it is from a
// member being fetched from and answers this fetch; otherwise the frame is
// dropped (an earlier fetch's comes late).
func (g *Group) toFetch(from int, f *frame) {
	reg := g.fetch.Load()
	if reg == nil || reg.peers&bit(from) == 0 || f.hdr.tag != reg.tag {
		return
	}
	select {
	case reg.frames <- fetchedFrame{from, f}:
	case <-reg.stop:
	case <-g.done:
	}
}

// FetchReport says where the last FetchState's state came from.
type FetchReport struct {
	Round uint64
	// Pieces is how many state pieces each member served, by peer; a fetch
	// from several members at once names them all.
	Pieces map[peer.ID]int
	// Resent is how many pieces were asked of another member after the one
	// first asked went down, stalled or no longer held the round.
	Resent int
	// Whole is true when the state came whole from one member (the fallback
	// when the members' descriptions disagree or a vector failed its hash).
	Whole bool
}

// LastFetch reports the last FetchState that succeeded.
func (g *Group) LastFetch() FetchReport {
	g.fetchMu.Lock()
	defer g.fetchMu.Unlock()
	return g.lastFetch
}

// FetchState downloads the state of the live members (what their
// GroupConfig.State returns), verified against the sha256 they send, and
// makes this member a member again from the round after it: the others are
// told to count it in.
//
// Every candidate is first asked to describe its state (round, and each
// vector's length and sha256). The round most of them hold is fetched;
// each vector's pieces are spread over the members whose copy of that
// vector has the same hash (vectors every replica holds alike, such as
// global weights, come from all of them at once; a replica's own come from
// one), and a member that goes down, stalls or has moved on has its
// outstanding pieces asked of the others, keeping what arrived. Each
// vector is checked against its hash. Should that fail, or the members not
// answer, members are tried in turn for their whole state, live ones
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
	r, live, vecs, rep, err := g.fetchMany(ctx, order, want)
	if err != nil {
		if ctx.Err() != nil {
			return 0, nil, fmt.Errorf("reduce: fetch state: %w", ctx.Err())
		}
		g.log.Info("fetching state from several members failed; asking them in turn", "err", err)
		var errs []error
		for _, p := range order {
			r, live, vecs, err = g.fetchFrom(ctx, p, want)
			if err == nil {
				rep = FetchReport{Round: r, Pieces: map[peer.ID]int{g.peerAt(p): piecesOf(vecs, g.lim.plen)}, Whole: true}
				break
			}
			if ctx.Err() != nil {
				return 0, nil, fmt.Errorf("reduce: fetch state: %w", ctx.Err())
			}
			g.log.Info("fetch state failed", "from", g.peerName(p), "err", err)
			errs = append(errs, fmt.Errorf("member %d: %w", p, err))
		}
		if err != nil {
			return 0, nil, fmt.Errorf("%w: %w", ErrNoState, errors.Join(errs...))
		}
	}
	g.fetchMu.Lock()
	g.lastFetch = rep
	g.fetchMu.Unlock()
	g.log.Info("state fetched", "round", r, "from", len(rep.Pieces), "resent", rep.Resent, "whole", rep.Whole)
	// Wait until the members count us in again, so that a round they start
	// after this returns includes us; a member that does not answer within
	// the fetch's stall time is left to find out from our frames.
	acked := make(chan struct{})
	if !g.deliver(evFetched{round: r, live: live, reply: acked}) {
		return 0, nil, ErrClosed
	}
	timer := g.cfg.Clock.NewTimer(g.fetchStall())
	defer timer.Stop()
	select {
	case <-acked:
	case <-timer.C():
		g.log.Info("rejoined without every member's acknowledgement", "round", r)
	case <-ctx.Done():
		return 0, nil, fmt.Errorf("reduce: fetch state: %w", ctx.Err())
	case <-g.done:
		return 0, nil, ErrClosed
	}
	return r, vecs, nil
}

func piecesOf(vecs [][]float32, plen int) int {
	n := 0
	for _, v := range vecs {
		n += numPieces(len(v), plen)
	}
	return n
}

// fetchStall is how long a fetch waits for the next frame: Margin times
// the time one full state frame takes at PriorRate, plus slack.
func (g *Group) fetchStall() time.Duration {
	return g.slack() + time.Duration(g.cfg.Margin*float64(frameSize(4*g.lim.plen))/g.cfg.PriorRate*float64(time.Second))
}

// register makes the stream handlers hand the state frames of peers to the
// returned fetch; end unregisters it.
func (g *Group) register(peers uint64) (reg *fetchReg, end func()) {
	reg = newFetchReg(peers, g.fetchTag.Add(1))
	g.fetch.Store(reg)
	return reg, func() {
		g.fetch.CompareAndSwap(reg, nil)
		close(reg.stop)
	}
}

// stateInfo is a member's description of its state.
type stateInfo struct {
	from   int
	round  uint64
	live   uint64
	lens   []int
	hashes [][hashLen]byte
}

// key is what members must agree on to serve pieces of one state.
func (s *stateInfo) key() string { return fmt.Sprint(s.round, s.lens) }

// piece is piece j of state vector i.
type piece struct{ i, j int }

// fetchMany fetches state from the candidates at once (see FetchState).
func (g *Group) fetchMany(ctx context.Context, cands []int, want uint64) (r, live uint64, vecs [][]float32, rep FetchReport, err error) {
	var mask uint64
	for _, p := range cands {
		mask |= bit(p)
	}
	reg, end := g.register(mask)
	defer end()
	for _, p := range cands {
		if !g.deliver(evSend{to: p, hdr: header{typ: typeStateInfoReq, round: want, tag: reg.tag}}) {
			return 0, 0, nil, rep, ErrClosed
		}
	}
	// The descriptions: every candidate's, or those that came within a slack
	// of the first (a hung member must not hold the fetch up).
	stall := g.fetchStall()
	infos := map[int]*stateInfo{}
	answered := uint64(0)
	timer := g.cfg.Clock.NewTimer(stall)
	defer timer.Stop()
	for answered|reg.gone() != mask {
		select {
		case ff := <-reg.frames:
			switch h := &ff.f.hdr; h.typ {
			case typeStateInfo:
				if answered&bit(ff.from) != 0 {
					g.svc.penalise(g.peerAt(ff.from), badFrame("state-info: a second one"))
					continue
				}
				in := &stateInfo{from: ff.from, round: h.round, live: h.mask}
				for k := range int(h.index) {
					b := ff.f.payload[k*infoEntry:]
					in.lens = append(in.lens, int(binary.LittleEndian.Uint32(b)))
					in.hashes = append(in.hashes, [hashLen]byte(b[4:4+hashLen]))
				}
				infos[ff.from] = in
				if len(infos) == 1 {
					// The others are given a few round trips more.
					timer.Reset(g.slack())
				}
			case typeStateNone:
			default:
				continue // a frame of an earlier fetch
			}
			answered |= bit(ff.from)
		case <-reg.downCh:
		case <-timer.C():
			if len(infos) == 0 {
				return 0, 0, nil, rep, fmt.Errorf("no member described its state within %v", stall)
			}
			answered = mask
		case <-ctx.Done():
			return 0, 0, nil, rep, ctx.Err()
		case <-g.done:
			return 0, 0, nil, rep, ErrClosed
		}
	}
	if len(infos) == 0 {
		return 0, 0, nil, rep, errors.New("no member has state to serve")
	}
	// The state most members hold (a later round on a tie, then the first
	// candidate's); its servers in candidate order. Asked for a round, those
	// that still hold it are taken first.
	if want != 0 && slices.ContainsFunc(slices.Collect(maps.Values(infos)), func(in *stateInfo) bool { return in.round == want }) {
		maps.DeleteFunc(infos, func(_ int, in *stateInfo) bool { return in.round != want })
	}
	count := map[string]int{}
	for _, in := range infos {
		count[in.key()]++
	}
	var best *stateInfo
	for _, p := range cands {
		in := infos[p]
		if in == nil {
			continue
		}
		if best == nil || count[in.key()] > count[best.key()] ||
			count[in.key()] == count[best.key()] && in.round > best.round {
			best = in
		}
	}
	var servers []*stateInfo
	for _, p := range cands {
		if in := infos[p]; in != nil && in.key() == best.key() {
			servers = append(servers, in)
		}
	}
	r, live = best.round, best.live
	// Each vector's hash is the one most servers hold; they serve its pieces.
	n := len(best.lens)
	holders := make([][]int, n) // per vector, the servers holding its hash, candidate order
	sums := make([][hashLen]byte, n)
	for i := range n {
		votes := map[[hashLen]byte]int{}
		for _, s := range servers {
			votes[s.hashes[i]]++
		}
		top := servers[0].hashes[i]
		for _, s := range servers {
			if votes[s.hashes[i]] > votes[top] {
				top = s.hashes[i]
			}
		}
		sums[i] = top
		for _, s := range servers {
			if s.hashes[i] == top {
				holders[i] = append(holders[i], s.from)
			}
		}
	}
	vecs = make([][]float32, n)
	for i, l := range best.lens {
		vecs[i] = make([]float32, l)
	}
	// Spread the pieces: each to the holder of its vector asked the fewest so far.
	load := map[int]int{}
	owed := map[int]map[piece]bool{} // per server, pieces asked and not yet come
	last := map[int]time.Time{}      // per server, when it last made progress or was asked
	reqs := map[int][][]piece{}      // per server, its requests not yet ended, in order
	var down uint64                  // servers given up
	assign := func(ps []piece) error {
		ask := map[int][]piece{}
		for _, pc := range ps {
			var to = -1
			for _, s := range holders[pc.i] {
				if down&bit(s) == 0 && (to < 0 || load[s] < load[to]) {
					to = s
				}
			}
			if to < 0 {
				return fmt.Errorf("no member left holding vector %d of round %d", pc.i, r)
			}
			load[to]++
			ask[to] = append(ask[to], pc)
			if len(owed[to]) == 0 {
				owed[to], last[to] = map[piece]bool{}, g.cfg.Clock.Now()
			}
			owed[to][pc] = true
		}
		for _, to := range slices.Sorted(maps.Keys(ask)) {
			ps := ask[to]
			reqs[to] = append(reqs[to], ps)
			payload := make([]byte, 0, 8*len(ps))
			for _, pc := range ps {
				payload = binary.LittleEndian.AppendUint32(payload, uint32(pc.i))
				payload = binary.LittleEndian.AppendUint32(payload, uint32(pc.j))
			}
			if !g.deliver(evSend{to: to, hdr: header{typ: typeStatePiecesReq, round: r, index: uint32(len(ps)), tag: reg.tag}, payload: payload}) {
				return ErrClosed
			}
		}
		return nil
	}
	var all []piece
	for i, l := range best.lens {
		for j := range numPieces(l, g.lim.plen) {
			all = append(all, piece{i, j})
		}
	}
	if err := assign(all); err != nil {
		return 0, 0, nil, rep, err
	}
	rep = FetchReport{Round: r, Pieces: map[peer.ID]int{}}
	// giveUp reassigns what s still owes.
	giveUp := func(s int, why string) error {
		if down&bit(s) != 0 {
			return nil
		}
		down |= bit(s)
		ps := slices.SortedFunc(maps.Keys(owed[s]), func(a, b piece) int { return cmp.Or(cmp.Compare(a.i, b.i), cmp.Compare(a.j, b.j)) })
		delete(owed, s)
		if len(ps) == 0 {
			return nil
		}
		g.log.Info("state pieces asked of another member", "from", g.peerName(s), "why", why, "pieces", len(ps))
		rep.Resent += len(ps)
		return assign(ps)
	}
	check := g.cfg.Clock.NewTicker(max(stall/4, 10*time.Millisecond))
	defer check.Stop()
	for {
		outstanding := 0
		for _, ps := range owed {
			outstanding += len(ps)
		}
		if outstanding == 0 {
			break
		}
		select {
		case ff := <-reg.frames:
			s, h := ff.from, &ff.f.hdr
			if down&bit(s) != 0 {
				continue
			}
			bad := func(format string, args ...any) error {
				err := badFrame("state: "+format, args...)
				g.svc.penalise(g.peerAt(s), err)
				return err
			}
			switch h.typ {
			case typeState:
				pc := piece{int(h.index), int(h.offset) / g.lim.plen}
				if h.round != r || !owed[s][pc] || int(h.n) != best.lens[pc.i] {
					_ = bad("round %d vector %d of %d values at %d, not asked", h.round, h.index, h.n, h.offset)
					if err := giveUp(s, "sent what was not asked"); err != nil {
						return 0, 0, nil, rep, err
					}
					continue
				}
				copy(vecs[pc.i][h.offset:], ff.f.vals)
				delete(owed[s], pc)
				rep.Pieces[g.peerAt(s)]++
				last[s] = g.cfg.Clock.Now()
			case typeStatePiecesEnd:
				// Frames come in order: every piece of the request it ends is in.
				short := -1
				if len(reqs[s]) > 0 {
					short = 0
					for _, pc := range reqs[s][0] {
						if owed[s][pc] {
							short++
						}
					}
					reqs[s] = reqs[s][1:]
				}
				if short != 0 {
					_ = bad("a request ended with %d of its pieces not sent (-1: none asked)", short)
					if err := giveUp(s, "ended short"); err != nil {
						return 0, 0, nil, rep, err
					}
				}
			case typeStateNone:
				if err := giveUp(s, "no longer holds the round"); err != nil {
					return 0, 0, nil, rep, err
				}
			}
		case <-reg.downCh:
			for s := range owed {
				if reg.gone()&bit(s) != 0 {
					if err := giveUp(s, "went down"); err != nil {
						return 0, 0, nil, rep, err
					}
				}
			}
		case <-check.C():
			for s := range owed {
				if len(owed[s]) > 0 && g.cfg.Clock.Since(last[s]) > stall {
					if err := giveUp(s, fmt.Sprintf("nothing for %v", stall)); err != nil {
						return 0, 0, nil, rep, err
					}
				}
			}
		case <-ctx.Done():
			return 0, 0, nil, rep, ctx.Err()
		case <-g.done:
			return 0, 0, nil, rep, ErrClosed
		}
	}
	for i, v := range vecs {
		if vectorHash(v) != sums[i] {
			return 0, 0, nil, rep, fmt.Errorf("vector %d of round %d assembled from %d members fails its sha256", i, r, len(holders[i]))
		}
	}
	return r, live, vecs, rep, nil
}

// fetchFrom downloads member p's whole state. It gives up when p goes down
// or sends nothing for Margin times the time one frame takes at the last
// measured rate, plus slack.
func (g *Group) fetchFrom(ctx context.Context, p int, want uint64) (r uint64, live uint64, vecs [][]float32, err error) {
	reg, end := g.register(bit(p))
	defer end()
	if !g.deliver(evSend{to: p, hdr: header{typ: typeStateReq, round: want, tag: reg.tag}}) {
		return 0, 0, nil, ErrClosed
	}
	stall := g.fetchStall()
	timer := g.cfg.Clock.NewTimer(stall)
	defer timer.Stop()
	var lens []int
	first := true
	for {
		var f *frame
		select {
		case ff := <-reg.frames:
			f = ff.f
		case <-timer.C():
			return 0, 0, nil, fmt.Errorf("nothing for %v", stall)
		case <-reg.downCh:
			return 0, 0, nil, errors.New("member went down")
		case <-ctx.Done():
			return 0, 0, nil, ctx.Err()
		case <-g.done:
			return 0, 0, nil, ErrClosed
		}
		timer.Reset(stall)
		h := &f.hdr
		switch h.typ {
		case typeStateInfo, typeStatePiecesEnd:
			continue // an earlier fetch's
		}
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
