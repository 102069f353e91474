package reduce

import (
	"errors"
	"fmt"
	"math"
	"time"
)

// round is one member's state of one all-reduce round. It stays after the
// round completes, until the next starts, so that a chunk owner dying
// after we finished can still be replaced: we re-send our contribution to
// the new owner, or forward the result we hold if we are the new owner.
type round struct {
	id       uint64
	n        int
	chunks   []Range
	np       []int // pieces per chunk
	start    time.Time
	arriveBy time.Time

	active  uint64 // members at the start
	missing uint64 // members given up during the round
	arrived uint64 // members a frame of this round came from (and us)

	own     []float32   // our decoded contribution
	contrib [][]*pieces // [chunk][member]: contributions received (ours too)
	res     [][]*pieces // [chunk][member]: results received, or published by us
	sums    [][][]float32
	sumMask [][]uint64 // [chunk][piece]: the contributors sums holds, 0 if none yet
	sentTo  []int      // the owner our contribution to each chunk went to, -1 if none

	done       bool
	reply      chan roundReply // nil once answered or abandoned
	sent, recv int64
	frames     int
	firstRecv  time.Time
	lastRecv   time.Time
	firstBytes int64
	progress   time.Time // the last frame received or change of membership
	graceUntil time.Time
}

// pieces is one member's contribution to, or result of, one chunk.
type pieces struct {
	vals [][]float32
	enc  [][]byte
	have int
	mask uint64 // results only: the contributors
}

func newPieces(np int) *pieces {
	return &pieces{vals: make([][]float32, np), enc: make([][]byte, np)}
}

func (p *pieces) complete() bool { return p != nil && p.have == len(p.vals) }

func (p *pieces) put(k int, vals []float32, enc []byte) {
	if p.vals[k] == nil {
		p.have++
	}
	p.vals[k], p.enc[k] = vals, enc
}

func (rs *round) alive() uint64 { return rs.active &^ rs.missing }

// owner is the member that sums chunk c: c itself if alive, else the
// next alive member in ring order.
func (rs *round) owner(c, R int) int {
	alive := rs.alive()
	for i := range R {
		if m := (c + i) % R; alive&bit(m) != 0 {
			return m
		}
	}
	return -1
}

func (g *Group) startRound(req *startReq) {
	fail := func(err error) { req.reply <- roundReply{err: err} }
	switch {
	case g.left:
		fail(ErrLeft)
		return
	case g.needFetch:
		fail(ErrBehind)
		return
	case g.started && req.round <= g.lastRound:
		fail(fmt.Errorf("%w: round %d after %d", ErrRoundOrder, req.round, g.lastRound))
		return
	case g.cur != nil && g.cur.reply != nil:
		fail(fmt.Errorf("reduce: round %d started while round %d runs", req.round, g.cur.id))
		return
	}
	for p, at := range g.joinAt {
		if at != 0 && req.round >= at {
			g.live |= bit(p)
			g.joinAt[p] = 0
		}
	}
	g.live |= bit(g.self)
	R := g.R
	now := g.cfg.Clock.Now()
	rs := &round{
		id: req.round, n: req.n, chunks: Chunks(req.n, R, g.lim.align), np: make([]int, R),
		start: req.start, arriveBy: now.Add(req.arrive + g.slack()),
		active: g.live, arrived: bit(g.self), own: req.own, reply: req.reply,
		contrib: make([][]*pieces, R), res: make([][]*pieces, R),
		sums: make([][][]float32, R), sumMask: make([][]uint64, R), sentTo: make([]int, R),
		progress: now,
	}
	for c, ch := range rs.chunks {
		np := len(req.mine[c])
		rs.np[c] = np
		rs.contrib[c] = make([]*pieces, R)
		rs.res[c] = make([]*pieces, R)
		rs.sums[c] = make([][]float32, np)
		rs.sumMask[c] = make([]uint64, np)
		rs.sentTo[c] = -1
		mine := newPieces(np)
		for k := range np {
			pr := pieceRange(ch.Len(), g.lim.plen, k)
			mine.put(k, req.own[ch.Lo+pr.Lo:ch.Lo+pr.Hi], req.mine[c][k])
		}
		rs.contrib[c][g.self] = mine
	}
	g.cur, g.started, g.lastRound = rs, true, req.round
	g.log.Debug("round start", "round", rs.id, "n", rs.n, "live", fmt.Sprintf("%#x", rs.active), "pending", len(g.pending[rs.id]))

	for c := range rs.chunks {
		if o := rs.owner(c, R); o != g.self {
			g.sendContrib(rs, c, o)
		}
	}
	for k, evs := range g.pending {
		if k > req.round {
			continue
		}
		delete(g.pending, k)
		for _, ev := range evs {
			g.pendVals[ev.from] -= len(ev.f.vals)
			if k == req.round {
				g.onData(ev)
			}
		}
	}
	g.advance(rs)
}

// sendContrib sends our contribution to chunk c to member o.
func (g *Group) sendContrib(rs *round, c, o int) {
	rs.sentTo[c] = o
	mine := rs.contrib[c][g.self]
	for k, enc := range mine.enc {
		g.sendData(rs, o, header{typ: typeContrib, index: uint32(c), offset: uint32(k * g.lim.plen), count: uint32(len(mine.vals[k]))}, enc)
	}
}

// sendData queues a data frame of round rs for member to, counting it.
func (g *Group) sendData(rs *round, to int, h header, payload []byte) {
	h.round, h.n = rs.id, uint32(rs.n)
	rs.sent += frameSize(len(payload))
	g.sendFrame(to, h, payload)
}

// receive stores a data frame of the current round from an alive member.
func (g *Group) receive(rs *round, ev evFrame) {
	h, from := &ev.f.hdr, ev.from
	if int(h.n) != rs.n {
		err := fmt.Errorf("%w: round %d: %v has %d values, ours %d", ErrBadFrame, rs.id, h.typ, h.n, rs.n)
		g.svc.penalise(g.peerAt(from), err)
		g.markMissing(rs, from, err, true)
		g.advance(rs)
		return
	}
	now := g.cfg.Clock.Now()
	size := ev.f.wireSize()
	if rs.frames == 0 {
		rs.firstRecv, rs.firstBytes = now, size
	}
	rs.frames++
	rs.recv += size
	rs.lastRecv, rs.progress = now, now
	if rs.arrived&bit(from) == 0 {
		g.log.Debug("arrived", "round", rs.id, "member", from)
	}
	rs.arrived |= bit(from)
	c, k := int(h.index), int(h.offset)/g.lim.plen
	switch h.typ {
	case typeContrib:
		ps := rs.contrib[c][from]
		if ps == nil {
			ps = newPieces(rs.np[c])
			rs.contrib[c][from] = ps
		}
		ps.put(k, ev.f.vals, ev.f.payload)
		if rs.owner(c, g.R) == g.self && rs.res[c][g.self] == nil {
			g.trySum(rs, c, k)
		}
	case typeResult:
		ps := rs.res[c][from]
		if ps == nil || ps.mask != h.mask {
			ps = newPieces(rs.np[c])
			ps.mask = h.mask
			rs.res[c][from] = ps
		}
		ps.put(k, ev.f.vals, ev.f.payload)
	}
	g.advance(rs)
}

// trySum adds up piece k of chunk c once every alive member's piece k is
// in, so summing overlaps with receiving the other pieces.
func (g *Group) trySum(rs *round, c, k int) {
	if rs.sumMask[c][k] != 0 {
		return
	}
	var mask uint64
	for m, ps := range rs.contrib[c] {
		if ps != nil && ps.vals[k] != nil {
			mask |= bit(m)
		}
	}
	if alive := rs.alive(); mask&alive != alive {
		return
	}
	g.sumPiece(rs, c, k, mask)
}

// sumPiece sets the sum of piece k of chunk c to the contributions of the
// members in mask, in ascending member order.
func (g *Group) sumPiece(rs *round, c, k int, mask uint64) {
	ch := rs.chunks[c]
	s := rs.sums[c][k]
	if s == nil {
		s = make([]float32, pieceRange(ch.Len(), g.lim.plen, k).Len())
		rs.sums[c][k] = s
	}
	clear(s)
	for _, m := range members(mask) {
		accumulate(s, rs.contrib[c][m].vals[k])
	}
	rs.sumMask[c][k] = mask
}

// advance does whatever the round's state now allows: re-send
// contributions to changed owners, publish chunks we own that are
// complete, and finish the round.
func (g *Group) advance(rs *round) {
	if g.cur != rs {
		return
	}
	for c := range rs.chunks {
		o := rs.owner(c, g.R)
		switch {
		case o != g.self:
			if rs.sentTo[c] != o {
				g.sendContrib(rs, c, o)
			}
		case rs.res[c][g.self] == nil:
			g.tryPublish(rs, c)
		}
	}
	g.checkDone(rs)
}

// tryPublish publishes chunk c, which we own, if we can: forward a
// complete result a previous owner sent us (so members that already took
// it agree with those that take ours), or else, once every alive member's
// contribution is complete, average the complete contributions.
func (g *Group) tryPublish(rs *round, c int) {
	for m, ps := range rs.res[c] {
		if m != g.self && ps.complete() {
			g.publish(rs, c, ps)
			return
		}
	}
	alive := rs.alive()
	var mask uint64
	for m, ps := range rs.contrib[c] {
		if ps.complete() {
			mask |= bit(m)
		}
	}
	if mask&alive != alive {
		return
	}
	if g.hookPublish != nil && !g.hookPublish(rs.id, c) {
		return
	}
	count := len(members(mask))
	out := newPieces(rs.np[c])
	out.mask = mask
	for k := range rs.np[c] {
		if rs.sumMask[c][k] != mask {
			g.sumPiece(rs, c, k, mask)
		}
		s := rs.sums[c][k]
		average(s, count)
		dec := make([]float32, len(s))
		enc, err := roundTrip(g.cfg.Codec, dec, s)
		if err == nil && firstNonFinite(dec) >= 0 {
			err = errors.New("average not finite in the codec")
		}
		if err != nil {
			// An average of finite values overflowing the codec (bf16
			// near float32's limit) is the only way here.
			g.log.Error("cannot encode average", "round", rs.id, "chunk", c, "err", err)
			g.failRound(fmt.Errorf("reduce: chunk %d: %w", c, err))
			return
		}
		out.put(k, dec, enc)
	}
	rs.sums[c] = nil
	g.publish(rs, c, out)
}

// publish makes ps our result for chunk c and sends it to every alive
// member.
func (g *Group) publish(rs *round, c int, ps *pieces) {
	rs.res[c][g.self] = ps
	for _, m := range members(rs.alive() &^ bit(g.self)) {
		for k, enc := range ps.enc {
			g.sendData(rs, m, header{typ: typeResult, index: uint32(c), offset: uint32(k * g.lim.plen), count: uint32(len(ps.vals[k])), mask: ps.mask}, enc)
		}
	}
}

// checkDone finishes the round once every chunk's owner's result is in.
func (g *Group) checkDone(rs *round) {
	if rs.done {
		return
	}
	owners := make([]int, len(rs.chunks))
	for c := range rs.chunks {
		owners[c] = rs.owner(c, g.R)
		if !rs.res[c][owners[c]].complete() {
			return
		}
	}
	rs.done = true
	res := &Result{
		Round: rs.id, Own: rs.own, Avg: make([]float32, rs.n), Chunks: make([]ChunkResult, len(rs.chunks)),
		Missing: members(^rs.alive() & (bit(g.R-1)<<1 - 1)),
		Sent:    rs.sent, Received: rs.recv, Duration: g.cfg.Clock.Now().Sub(rs.start),
	}
	for c, ch := range rs.chunks {
		ps := rs.res[c][owners[c]]
		at := ch.Lo
		for _, v := range ps.vals {
			at += copy(res.Avg[at:], v)
		}
		res.Chunks[c] = ChunkResult{Range: ch, Owner: owners[c], Contributors: ps.mask}
	}
	if r := rs.rate(); r > 0 {
		g.prevRate = r
	}
	if rs.reply != nil {
		rs.reply <- roundReply{res: res}
		rs.reply = nil
	}
	if len(res.Missing) > 0 {
		g.log.Info("round done without some members", "round", rs.id, "missing", res.Missing)
	}
}

// markMissing gives up member m for the rest of round rs and excludes it
// from later rounds until it rejoins. If we decided it (a deadline, a bad
// frame) rather than learnt it, the others are told, and so is m.
func (g *Group) markMissing(rs *round, m int, why error, ours bool) {
	rs.missing |= bit(m)
	g.live &^= bit(m)
	rs.progress = g.cfg.Clock.Now()
	g.log.Info("member missing", "round", rs.id, "member", m, "why", why)
	if !ours {
		return
	}
	for _, p := range members(rs.alive() &^ bit(g.self)) {
		g.sendCtl(p, header{typ: typeDrop, round: rs.id, mask: bit(m)})
	}
	g.replyBehind(m, rs.id)
}

// rate is the bytes/s this round measured, or 0 if too little arrived.
func (rs *round) rate() float64 {
	if rs.frames < 2 {
		return 0
	}
	dt := rs.lastRecv.Sub(rs.firstRecv).Seconds()
	if dt <= 0 {
		return 0
	}
	return float64(rs.recv-rs.firstBytes) / dt
}

// checkDeadlines gives up the members the current round waited for too
// long and returns when to look again (zero: no need).
//
// A member that has sent nothing this round is waited for until arriveBy
// (the caller's arrive plus slack). Once a member has arrived, what we
// still expect from it is bounded by the transfer rate: with B the bytes
// still to come from all members and r the rate measured this round (or
// the last round's, or PriorRate), a member owing us contributions is given
// up at progress + Margin·B/r + slack, where progress is the last frame or
// membership change; one owing us a result, which it can only send after
// everyone's contributions reached it, gets twice that, and only once
// every alive member has arrived, and not before arriveBy + Margin·B/r +
// slack, since the owner may be waiting for a member that has not reached
// it as long as we waited for those that had not reached us.
func (g *Group) checkDeadlines() time.Time {
	for {
		rs := g.cur
		if rs == nil || rs.done {
			return time.Time{}
		}
		now := g.cfg.Clock.Now()
		if now.Before(rs.graceUntil) {
			return rs.graceUntil
		}
		next, dropped := g.deadlinePass(rs, now)
		if !dropped {
			return next
		}
		g.advance(rs)
	}
}

// deadlinePass is one pass of checkDeadlines: it gives up the members
// that are late at now and says whether it did.
func (g *Group) deadlinePass(rs *round, now time.Time) (next time.Time, dropped bool) {
	earliest := func(t time.Time) {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	alive := rs.alive() &^ bit(g.self)
	if late := alive &^ rs.arrived; late != 0 {
		if !now.Before(rs.arriveBy) {
			for _, m := range members(late) {
				g.markMissing(rs, m, errors.New("did not start the round in time"), true)
			}
			return time.Time{}, true
		}
		earliest(rs.arriveBy)
	}
	var owesContrib, owesResult uint64
	var remaining int64
	pieceBytes := func(c, k int) int64 {
		return frameSize(g.cfg.Codec.MaxEncodedSize(pieceRange(rs.chunks[c].Len(), g.lim.plen, k).Len()))
	}
	for c := range rs.chunks {
		o := rs.owner(c, g.R)
		if o == g.self {
			if rs.res[c][g.self] != nil {
				continue
			}
			for _, m := range members(alive) {
				ps := rs.contrib[c][m]
				for k := range rs.np[c] {
					if ps == nil || ps.vals[k] == nil {
						remaining += pieceBytes(c, k)
						owesContrib |= bit(m)
					}
				}
			}
			continue
		}
		ps := rs.res[c][o]
		for k := range rs.np[c] {
			if ps == nil || ps.vals[k] == nil {
				remaining += pieceBytes(c, k)
				owesResult |= bit(o)
			}
		}
	}
	if owesContrib|owesResult == 0 {
		return next, false
	}
	r := rs.rate()
	if r == 0 {
		r = g.prevRate
	}
	if r == 0 {
		r = g.cfg.PriorRate
	}
	budget := time.Duration(math.Min(g.cfg.Margin*float64(remaining)/r*float64(time.Second), float64(math.MaxInt64/4)))
	slack := g.slack()
	contribBy := rs.progress.Add(budget + slack)
	// An owner may itself be waiting, until about our arriveBy, for a
	// member that has not reached it yet.
	resultBy := rs.progress.Add(2*budget + slack)
	if t := rs.arriveBy.Add(budget + slack); t.After(resultBy) {
		resultBy = t
	}
	if late := owesContrib & rs.arrived; late != 0 {
		if !now.Before(contribBy) {
			for _, m := range members(late) {
				g.markMissing(rs, m, fmt.Errorf("contribution stalled (%d bytes outstanding at %.0f B/s)", remaining, r), true)
			}
			return time.Time{}, true
		}
		earliest(contribBy)
	}
	if late := owesResult & rs.arrived; late != 0 && alive&^rs.arrived == 0 {
		if !now.Before(resultBy) {
			for _, m := range members(late) {
				g.markMissing(rs, m, fmt.Errorf("result stalled (%d bytes outstanding at %.0f B/s)", remaining, r), true)
			}
			return time.Time{}, true
		}
		earliest(resultBy)
	}
	return next, false
}
