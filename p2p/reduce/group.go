package reduce

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/pipeswarm/pipeswarm/p2p/clock"
)

var (
	// ErrBehind is returned by AllReduce when the other members finished
	// the round without this one, or no longer count it as a member:
	// the caller should FetchState, after which it is a member again.
	ErrBehind = errors.New("reduce: behind the group")
	// ErrRoundOrder is returned by AllReduce for a round not above the
	// last one started.
	ErrRoundOrder = errors.New("reduce: rounds must increase")
	// ErrLeft is returned by AllReduce after Leave.
	ErrLeft = errors.New("reduce: left the group")
	// ErrNoState is returned by FetchState when no member served state.
	ErrNoState = errors.New("reduce: no state fetched")
)

// Result is one member's outcome of a round.
type Result struct {
	Round    uint64
	Avg      []float32     // the decoded averages: identical on every member that finished
	Own      []float32     // Decode(Encode(y)), chunk by chunk: the caller's residual is y − Own
	Chunks   []ChunkResult // per chunk, in order
	Missing  []int         // members not in the round: excluded before it, or given up during it
	Sent     int64         // bytes of data frames written for this round, headers included
	Received int64         // bytes of data frames received for this round, headers included
	Duration time.Duration // from AllReduce's start to the result
}

// ChunkResult says who made chunk Range of the average.
type ChunkResult struct {
	Range
	Owner        int    // the member whose result was taken
	Contributors uint64 // bit r set if member r's contribution is in the average
}

// Group is this member's side of one all-reduce group. AllReduce,
// FetchState, Leave and Close may be called from any goroutine, but one
// AllReduce at a time. All of the group's state is owned by one goroutine
// (loop); stream handlers and callers send it events.
type Group struct {
	cfg GroupConfig
	svc *Service
	log *slog.Logger
	// members is who holds each replica's place: replaced whole when a place passes
	// to another peer (Replace); stream handlers read it without the loop.
	members atomic.Pointer[roster]
	lim     limits // immutable
	R       int
	self    int

	events    chan event
	quit      chan struct{}
	done      chan struct{}
	closeOnce sync.Once

	// fetch is the FetchState in progress; state frames from its peer go
	// straight from the stream handler to it.
	fetch     atomic.Pointer[fetchReg]
	fetchTag  atomic.Uint32 // the last fetch's tag
	fetchMu   sync.Mutex
	lastFetch FetchReport

	// Everything below is owned by loop.
	live        uint64   // members of the next round
	joinAt      []uint64 // joinAt[p] != 0: p is a member again from round joinAt[p] on
	left        bool     // Leave was called
	needFetch   bool     // told we are behind; only FetchState helps
	started     bool     // a round has started (or state was fetched)
	lastRound   uint64   // the last round started or fetched
	cur         *round   // the current or last round; nil after a failed round
	pending     map[uint64][]evFrame
	pendVals    []int                              // values buffered in pending, per sender
	behindSent  []uint64                           // behindSent[p] = round+1 of the last behind reply to p
	prevRate    float64                            // bytes/s measured by the last round that measured one
	joinWait    uint64                             // members yet to acknowledge our join
	joinReply   chan struct{}                      // closed when joinWait empties
	hookPublish func(round uint64, chunk int) bool // tests: false stops this member before it publishes chunk
	wakeAt      time.Time
}

// Join creates the group cfg describes on s. Frames for it are accepted
// from now on. Close it when done.
func (s *Service) Join(cfg GroupConfig) (*Group, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if s.ctx.Err() != nil {
		return nil, ErrClosed
	}
	cfg = cfg.withDefaults()
	cfg.Peers = append([]peer.ID(nil), cfg.Peers...)
	R := len(cfg.Peers)
	g := &Group{
		cfg: cfg, svc: s, R: R, self: cfg.Self,
		log:        s.log.With("run", cfg.Run, "group", cfg.Group, "self", cfg.Self),
		lim:        newLimits(R, cfg.Codec, cfg.MaxValues),
		events:     make(chan event, 64),
		quit:       make(chan struct{}),
		done:       make(chan struct{}),
		joinAt:     make([]uint64, R),
		pending:    make(map[uint64][]evFrame),
		pendVals:   make([]int, R),
		behindSent: make([]uint64, R),
	}
	// Tags tell one fetch's frames from another's; a random start keeps a
	// restarted member's from meeting its last life's.
	g.fetchTag.Store(rand.Uint32())
	g.members.Store(newRoster(cfg.Peers))
	if R == MaxMembers {
		g.live = ^uint64(0)
	} else {
		g.live = bit(R) - 1
	}
	key := groupKey{cfg.Run, cfg.Group}
	s.mu.Lock()
	if _, dup := s.groups[key]; dup {
		s.mu.Unlock()
		return nil, fmt.Errorf("%w: group %d of run %016x already joined", ErrBadConfig, cfg.Group, cfg.Run)
	}
	s.groups[key] = g
	s.mu.Unlock()
	if stall := cfg.FaultStallRound; stall > 0 {
		var once sync.Once
		g.hookPublish = func(round uint64, chunk int) bool {
			if round != stall {
				return true
			}
			once.Do(func() { g.log.Warn("stalling mid all-reduce (fault injection)", "round", round, "chunk", chunk) })
			return false
		}
	}
	go g.loop()
	return g, nil
}

// Close stops the group without telling the others (see Leave). A
// pending AllReduce returns ErrClosed.
func (g *Group) Close() error {
	g.closeOnce.Do(func() {
		close(g.quit)
		<-g.done
		key := groupKey{g.cfg.Run, g.cfg.Group}
		g.svc.mu.Lock()
		if g.svc.groups[key] == g {
			delete(g.svc.groups, key)
		}
		g.svc.mu.Unlock()
	})
	return nil
}

// Leave tells the other members this one is gone for good, so nobody
// waits for it, and fails a pending AllReduce with ErrLeft.
func (g *Group) Leave() { g.post(evLeave{}) }

// post hands ev to the loop; it is dropped if the group is closed. Never
// call it from the loop.
func (g *Group) post(ev event) { g.deliver(ev) }

func (g *Group) deliver(ev event) bool {
	select {
	case g.events <- ev:
		return true
	case <-g.done:
		return false
	}
}

// call posts ev and waits for its reply.
func call[T any](ctx context.Context, g *Group, ev event, reply chan T) (T, error) {
	var zero T
	select {
	case g.events <- ev:
	case <-ctx.Done():
		return zero, ctx.Err()
	case <-g.done:
		return zero, ErrClosed
	}
	select {
	case v := <-reply:
		return v, nil
	case <-ctx.Done():
		return zero, ctx.Err()
	case <-g.done:
		return zero, ErrClosed
	}
}

// AllReduce averages y with the other members' vectors for round (see
// the package documentation for the exact arithmetic). arrive is how long
// a member that has not started the round yet is waited for, counted from
// this call; a member whose connection closes is given up at once. y is
// not modified and may be reused when AllReduce returns.
//
// It returns ErrBehind (wrapped) when the others finished this round
// without us or no longer count us in; FetchState then makes us a member
// again. Rounds must increase from call to call.
func (g *Group) AllReduce(ctx context.Context, round uint64, y []float32, arrive time.Duration) (*Result, error) {
	start := g.cfg.Clock.Now()
	if len(y) > g.cfg.MaxValues {
		return nil, fmt.Errorf("reduce: round %d: %d values exceed MaxValues %d", round, len(y), g.cfg.MaxValues)
	}
	if i := firstNonFinite(y); i >= 0 {
		return nil, fmt.Errorf("reduce: round %d: y[%d] is %v, want finite", round, i, y[i])
	}
	// Encode every piece here, on the caller's goroutine: Own is what the
	// owners will decode, and the loop only moves bytes and sums.
	c := g.cfg.Codec
	n := len(y)
	chunks := Chunks(n, g.R, g.lim.align)
	own := make([]float32, n)
	mine := make([][][]byte, g.R)
	for ci, ch := range chunks {
		np := numPieces(ch.Len(), g.lim.plen)
		mine[ci] = make([][]byte, np)
		for k := range np {
			pr := pieceRange(ch.Len(), g.lim.plen, k)
			lo, hi := ch.Lo+pr.Lo, ch.Lo+pr.Hi
			enc, err := roundTrip(c, own[lo:hi], y[lo:hi])
			if err != nil {
				return nil, fmt.Errorf("reduce: round %d: encode [%d:%d]: %w", round, lo, hi, err)
			}
			if i := firstNonFinite(own[lo:hi]); i >= 0 {
				return nil, fmt.Errorf("reduce: round %d: y[%d] = %v is %v in %v", round, lo+i, y[lo+i], own[lo+i], c)
			}
			mine[ci][k] = enc
		}
	}
	req := &startReq{round: round, n: n, own: own, mine: mine, arrive: arrive, start: start, reply: make(chan roundReply, 1)}
	rep, err := call(ctx, g, evStart{req}, req.reply)
	if err != nil {
		if ctx.Err() != nil {
			g.post(evAbort{round})
		}
		return nil, fmt.Errorf("reduce: round %d: %w", round, err)
	}
	if rep.err != nil {
		return nil, fmt.Errorf("reduce: round %d: %w", round, rep.err)
	}
	return rep.res, nil
}

// Events handled by loop.
type event interface{ isEvent() }

type evFrame struct {
	from int
	f    *frame
}
type evDown struct {
	from int
	err  error
}
type evStart struct{ req *startReq }
type evAbort struct{ round uint64 }
type evLeave struct{}

// evSend sends a frame from the loop.
type evSend struct {
	to      int
	hdr     header
	payload []byte
}
type evFetched struct {
	round uint64
	live  uint64
	reply chan struct{}
}
type evCandidates struct{ reply chan []int }

func (evFrame) isEvent()      {}
func (evDown) isEvent()       {}
func (evStart) isEvent()      {}
func (evAbort) isEvent()      {}
func (evLeave) isEvent()      {}
func (evSend) isEvent()       {}
func (evFetched) isEvent()    {}
func (evCandidates) isEvent() {}

type startReq struct {
	round  uint64
	n      int
	own    []float32  // decoded own contribution
	mine   [][][]byte // encoded pieces, per chunk
	arrive time.Duration
	start  time.Time
	reply  chan roundReply
}

type roundReply struct {
	res *Result
	err error
}

// loop owns the group's state until Close.
func (g *Group) loop() {
	defer close(g.done)
	timer := g.cfg.Clock.NewTimer(time.Hour)
	timer.Stop()
	for {
		select {
		case ev := <-g.events:
			g.handle(ev)
		case <-timer.C():
			g.onTimer()
		case <-g.quit:
			if rs := g.cur; rs != nil && rs.reply != nil {
				rs.reply <- roundReply{err: ErrClosed}
			}
			return
		}
		if next := g.checkDeadlines(); next.IsZero() {
			timer.Stop()
			g.wakeAt = time.Time{}
		} else {
			g.wakeAt = next
			timer.Reset(max(0, next.Sub(g.cfg.Clock.Now())))
		}
	}
}

func (g *Group) handle(ev event) {
	switch ev := ev.(type) {
	case evFrame:
		g.onFrame(ev)
	case evDown:
		g.onDown(ev.from, ev.err)
	case evStart:
		g.startRound(ev.req)
	case evAbort:
		if rs := g.cur; rs != nil && rs.id == ev.round {
			rs.reply = nil
		}
	case evLeave:
		g.onLeave()
	case evSend:
		g.sendFrame(ev.to, ev.hdr, ev.payload)
	case evFetched:
		g.onFetched(ev.round, ev.live, ev.reply)
	case evCandidates:
		ev.reply <- g.candidates()
	}
}

// sendCtl queues a frame without payload for member to.
func (g *Group) sendCtl(to int, h header) { g.sendFrame(to, h, nil) }

// sendFrame queues a frame for member to.
func (g *Group) sendFrame(to int, h header, payload []byte) {
	h.codec, h.run, h.group = g.cfg.Codec, g.cfg.Run, g.cfg.Group
	h.plen = uint32(len(payload))
	g.svc.send(g.peerAt(to), outFrame{hdr: h, payload: payload})
}

func (g *Group) peerName(p int) string { return g.peerAt(p).String() }

// roster is the group's members in replica order, and the way back.
type roster struct {
	peers []peer.ID
	index map[peer.ID]int
}

func newRoster(peers []peer.ID) *roster {
	r := &roster{peers: slices.Clone(peers), index: make(map[peer.ID]int, len(peers))}
	for i, p := range peers {
		r.index[p] = i
	}
	return r
}

// peerAt is the peer that holds member i's place.
func (g *Group) peerAt(i int) peer.ID { return g.members.Load().peers[i] }

// indexOf is p's place in the group, if it has one.
func (g *Group) indexOf(p peer.ID) (int, bool) {
	i, ok := g.members.Load().index[p]
	return i, ok
}

// Replace gives member's place to the peer id, which takes it as a restarted member
// would (FetchState, then counted in from the round after): a node that took over
// the place of one that is gone. The old peer is no longer in that place; frames
// from it are a stranger's. If id held another place (a survivor of a broken
// replica pipeline moved to another's), the two swap: the old peer takes id's
// place, and both places rejoin as restarted members do.
func (g *Group) Replace(member int, id peer.ID) error {
	switch {
	case member < 0 || member >= g.R:
		return fmt.Errorf("%w: member %d outside [0, %d)", ErrBadConfig, member, g.R)
	case member == g.self:
		return fmt.Errorf("%w: member %d is this one", ErrBadConfig, member)
	case id == "":
		return fmt.Errorf("%w: empty peer ID", ErrBadConfig)
	}
	old := g.members.Load()
	other, swap := old.index[id]
	if swap && other == member {
		return nil
	}
	if swap && other == g.self {
		return fmt.Errorf("%w: %s is this member", ErrBadConfig, id)
	}
	peers := slices.Clone(old.peers)
	gone := peers[member]
	peers[member] = id
	if swap {
		peers[other] = gone
	}
	g.members.Store(newRoster(peers))
	g.log.Info("member replaced", "member", member, "was", gone, "now", id, "swapped", swap)
	g.post(evDown{from: member, err: fmt.Errorf("its place passed to %s", id)})
	if swap {
		g.post(evDown{from: other, err: fmt.Errorf("its place passed to %s", gone)})
	}
	return nil
}

// Drop gives up member, if peer id still holds its place, as if its connection
// had closed: at once, in the round in progress too, and in later rounds until it
// rejoins. It is for a member found gone by someone else (a hung node keeps its
// connections up, so only its deadline would give it up here). It reports whether
// id held the place.
func (g *Group) Drop(member int, id peer.ID, why error) bool {
	if member < 0 || member >= g.R || member == g.self || g.peerAt(member) != id {
		return false
	}
	g.post(evDown{from: member, err: why})
	return true
}

// onFrame dispatches a frame from a member.
func (g *Group) onFrame(ev evFrame) {
	h := &ev.f.hdr
	switch h.typ {
	case typeContrib, typeResult:
		g.onData(ev)
	case typeBehind:
		g.onBehind(ev.from, h.round)
	case typeDrop:
		g.onDrop(ev.from, h.round, h.mask)
	case typeJoin:
		g.onJoin(ev.from, h.round)
	case typeJoinAck:
		g.onJoinAck(ev.from, h.round)
	case typeLeave:
		g.onDown(ev.from, errors.New("left"))
	case typeStateReq:
		g.serveState(ev.from, h.round, h.tag)
	case typeStateInfoReq:
		g.serveInfo(ev.from, h.round, h.tag)
	case typeStatePiecesReq:
		g.servePieces(ev.from, h.round, h.tag, ev.f.payload)
	}
}

// memberFor reports whether p takes part in future round r as far as we
// know.
func (g *Group) memberFor(p int, r uint64) bool {
	return g.live&bit(p) != 0 || (g.joinAt[p] != 0 && r >= g.joinAt[p])
}

// replyBehind tells p, once per round, that round r is over for it.
func (g *Group) replyBehind(p int, r uint64) {
	if g.behindSent[p] == r+1 {
		return
	}
	g.behindSent[p] = r + 1
	g.sendCtl(p, header{typ: typeBehind, round: r})
}

func (g *Group) onData(ev evFrame) {
	h, from := &ev.f.hdr, ev.from
	rs := g.cur
	switch {
	case rs != nil && h.round == rs.id:
		if rs.alive()&bit(from) == 0 {
			g.replyBehind(from, h.round)
			return
		}
		g.receive(rs, ev)
	case g.started && h.round <= g.lastRound:
		// A round we finished or gave up: late frames of a member are
		// harmless; a non-member is told it is behind.
		if g.live&bit(from) == 0 {
			g.replyBehind(from, h.round)
		}
	case !g.memberFor(from, h.round):
		g.replyBehind(from, h.round)
	default:
		// A round we have not started: buffer it, boundedly.
		if _, ok := g.pending[h.round]; !ok && len(g.pending) >= 2 {
			g.log.Debug("dropped frame of a third future round", "peer", g.peerName(from), "round", h.round)
			return
		}
		if g.pendVals[from]+len(ev.f.vals) > g.cfg.MaxValues {
			g.log.Debug("dropped early frame over the buffer limit", "peer", g.peerName(from), "round", h.round)
			return
		}
		g.pendVals[from] += len(ev.f.vals)
		g.pending[h.round] = append(g.pending[h.round], ev)
	}
}

func (g *Group) onBehind(from int, r uint64) {
	rs := g.cur
	// Only a member we count in may say we are out: a stale member's
	// opinion must not stop a healthy one.
	if rs != nil && r == rs.id {
		if rs.alive()&bit(from) == 0 {
			return
		}
		g.log.Info("behind", "round", r, "told_by", g.peerName(from))
		g.needFetch = true
		g.failRound(ErrBehind)
		return
	}
	if g.live&bit(from) != 0 && (!g.started || r >= g.lastRound) {
		g.needFetch = true
	}
}

func (g *Group) onDrop(from int, r uint64, mask uint64) {
	rs := g.cur
	if rs == nil || r != rs.id || rs.alive()&bit(from) == 0 {
		return
	}
	if mask&bit(g.self) != 0 {
		g.log.Info("dropped by a member", "round", r, "by", g.peerName(from))
		g.needFetch = true
		g.failRound(ErrBehind)
		return
	}
	for _, m := range members(mask & rs.alive()) {
		g.markMissing(rs, m, fmt.Errorf("dropped by member %d", from), false)
	}
	g.advance(rs)
}

func (g *Group) onJoin(from int, r uint64) {
	switch rs := g.cur; {
	case rs != nil && !rs.done && rs.id >= r && rs.alive()&bit(from) != 0:
		// Counted in the round in progress already (an earlier join's ack).
		r = rs.id
	case g.started:
		r = max(r, g.lastRound+1)
	}
	g.joinAt[from] = max(r, 1)
	g.behindSent[from] = 0
	g.sendCtl(from, header{typ: typeJoinAck, round: g.joinAt[from]})
	g.log.Info("member rejoins", "peer", g.peerName(from), "from_round", g.joinAt[from])
}

func (g *Group) onDown(from int, err error) {
	if from == g.self {
		return
	}
	if reg := g.fetch.Load(); reg != nil && reg.peers&bit(from) != 0 {
		reg.fail(from)
	}
	g.joinAt[from] = 0
	g.joinAcked(from)
	if g.live&bit(from) != 0 {
		g.log.Info("member down", "peer", g.peerName(from), "err", err)
	}
	g.live &^= bit(from)
	if rs := g.cur; rs != nil && rs.alive()&bit(from) != 0 {
		g.markMissing(rs, from, err, false)
		g.advance(rs)
	}
}

func (g *Group) onLeave() {
	g.left = true
	for p := range g.R {
		if p != g.self {
			g.sendCtl(p, header{typ: typeLeave})
		}
	}
	g.failRound(ErrLeft)
}

// failRound ends the current round with err for its caller and forgets it.
func (g *Group) failRound(err error) {
	if rs := g.cur; rs != nil {
		if rs.reply != nil && !rs.done {
			rs.reply <- roundReply{err: err}
		}
		rs.reply = nil
		g.cur = nil
	}
}

// candidates lists the members to fetch state from: live ones first, in
// ring order after us, then the rest.
func (g *Group) candidates() []int {
	var live, rest []int
	for i := 1; i < g.R; i++ {
		p := (g.self + i) % g.R
		if g.live&bit(p) != 0 {
			live = append(live, p)
		} else {
			rest = append(rest, p)
		}
	}
	return append(live, rest...)
}

// onJoinAck: member from counts us in again from round r. Past the round after
// the state we fetched, it has started a round without us since it served that
// state: taking part in that round now would leave us with other weights than
// it, so only fetching again helps (at our next round, as for any member behind).
func (g *Group) onJoinAck(from int, r uint64) {
	if g.started && r > g.lastRound+1 && g.live&bit(from) != 0 && !g.needFetch {
		g.log.Info("behind: a member finished a round since serving the state fetched", "member", g.peerName(from), "fetched", g.lastRound, "counted_from", r)
		g.needFetch = true
	}
	g.joinAcked(from)
}

// joinAcked notes that member p counts us in again.
func (g *Group) joinAcked(p int) {
	g.joinWait &^= bit(p)
	if g.joinWait == 0 && g.joinReply != nil {
		close(g.joinReply)
		g.joinReply = nil
	}
}

func (g *Group) onFetched(r uint64, live uint64, reply chan struct{}) {
	g.needFetch = false
	g.left = false
	g.live = live | bit(g.self)
	g.started, g.lastRound = true, r
	g.cur = nil
	for k, evs := range g.pending {
		if k <= r {
			for _, ev := range evs {
				g.pendVals[ev.from] -= len(ev.f.vals)
			}
			delete(g.pending, k)
		}
	}
	for p := range g.R {
		if p != g.self {
			g.sendCtl(p, header{typ: typeJoin, round: r + 1})
		}
	}
	if g.joinReply != nil {
		close(g.joinReply)
	}
	g.joinReply, g.joinWait = reply, g.live&^bit(g.self)
	g.joinAcked(g.self)
	g.log.Info("state fetched; rejoining", "round", r, "live", fmt.Sprintf("%#x", g.live))
}

// slack is what every transfer deadline adds to the expected time:
// clock.Deadline's round trips (to the farthest member) and the configured
// Slack.
func (g *Group) slack() time.Duration {
	var rtt time.Duration
	ps := g.svc.h.Peerstore()
	for p, id := range g.members.Load().peers {
		if p != g.self {
			rtt = max(rtt, ps.LatencyEWMA(id))
		}
	}
	return clock.Deadline(0, rtt, g.cfg.Slack)
}

func (g *Group) onTimer() {
	now := g.cfg.Clock.Now()
	// Woken much later than asked: this process was paused or starved, so
	// nothing can be concluded about the peers yet. Give them a slack
	// period to be heard before giving up on anyone.
	rs := g.cur
	if rs == nil {
		return
	}
	if !g.wakeAt.IsZero() && now.Sub(g.wakeAt) > g.slack() {
		rs.graceUntil = now.Add(g.slack())
	}
	if g.log.Enabled(context.Background(), slog.LevelDebug) {
		var have []string
		for c := range rs.chunks {
			var m uint64
			for p, ps := range rs.contrib[c] {
				if ps.complete() {
					m |= bit(p)
				}
			}
			var r uint64
			for p, ps := range rs.res[c] {
				if ps.complete() {
					r |= bit(p)
				}
			}
			have = append(have, fmt.Sprintf("c%d:owner=%d,contrib=%#x,res=%#x", c, rs.owner(c, g.R), m, r))
		}
		g.log.Debug("timer", "round", rs.id, "alive", fmt.Sprintf("%#x", rs.alive()), "arrived", fmt.Sprintf("%#x", rs.arrived), "chunks", have, "late", now.Sub(g.wakeAt))
	}
}
