// Package reduce is the fault-tolerant all-reduce the R replicas of one
// pipeline stage run at every DiLoCo outer step.
//
// # Use
//
//	svc := reduce.NewService(h, log, penalise)      // one per libp2p host
//	h.SetStreamHandler(reduce.Proto, svc.HandleStream)
//	g, err := svc.Join(reduce.GroupConfig{Run: run, Group: stage, Peers: replicas, Self: i,
//		Codec: c, MaxValues: len(params), State: outerState})
//	res, err := g.AllReduce(ctx, step, pseudoGrad, arrive) // res.Avg on every member alike
//	if errors.Is(err, reduce.ErrBehind) { round, vecs, err = g.FetchState(ctx) }
//	g.Leave(); g.Close()
//
// # Arithmetic
//
// A vector of n values is cut by Chunks(n, R, align) (align: the codec's
// block size, else 1) into R chunks; chunk c belongs to member c, or if c
// is gone to the next live member in ring order. Each member encodes each
// chunk of its vector with the group's codec and sends it, as pieces of up
// to PieceValues values, one frame each, to the chunk's owner. The owner
// decodes every contribution (its own too: Decode(Encode(y)), never y
// itself), sums them in float32 in ascending replica order starting from
// zero, divides by the number of contributions received, encodes the
// average with the same codec and sends it to every live member; every
// member, the owner too, takes the decoded average as the result. So all
// members that finish a round hold bit-identical averages, and Reference
// computes the same numbers (and each member's bytes on the wire) in one
// process. Result.Own is this member's decoded contribution, for error
// feedback (residual = y − Own).
//
// Pieces pipeline the work: the owner sums piece p as soon as every live
// member's piece p is in. If a contributor is given up after some of its
// pieces were summed, the owner sums those pieces again without it, so
// every chunk has one contributor set (ChunkResult.Contributors): the
// members whose whole contribution reached the owner before it published.
//
// # Faults and deadlines
//
// A member whose connection closes (disconnect notification, reset
// stream, failed write), that sends Leave, or that the caller drops (Drop:
// found gone by other means) is given up at once. Otherwise
// a member that has sent nothing in this round is waited for until the
// caller's arrive duration (from its inner-step time) plus slack. Once it
// has arrived, the deadline comes from measurement: with B the bytes still
// to come from all members this round, r the transfer rate measured this
// round (bytes received over the time since the first frame; else the
// previous round's; else GroupConfig.PriorRate) and slack the deadline
// rule's (clock.Deadline: GroupConfig.Slack + clock.RTTs × the largest
// peerstore RTT), a member owing us
// contribution pieces is given up Margin·B/r + slack after the last
// progress (a frame or a membership change). A member owing us its result
// gets twice that, and never less than arriveBy + Margin·B/r + slack,
// since it may be waiting for a member that reached it later than us. If
// the group's goroutine wakes much later than asked (the process was
// paused), it waits one more slack before judging anyone.
//
// A member we give up is told (a behind frame), and so are the others (a
// drop frame), so views converge quickly. The live members finish with the
// contributions they have. A chunk whose owner is given up passes to the
// next live member; every member keeps its encoded contributions until the
// next round starts and re-sends them to the new owner, and a new owner
// that already holds the old owner's complete result forwards it rather
// than computing another. A member given up in a round is left out of
// later rounds (chunk ownership recomputed without it) until it rejoins.
//
// # Falling behind and rejoining
//
// Frames from a member that is not in the round (it missed it, or a later
// one started) are answered with a behind frame, and its AllReduce
// returns an error wrapping ErrBehind. FetchState then downloads what the
// members' GroupConfig.State returns (a round and up to 64 vectors) from
// all of them at once: each first describes its state (round, live
// members, each vector's length and sha256); the round most hold is taken,
// and each vector's pieces are spread over the members whose copy hashes
// alike (vectors every replica holds alike come from all of them, a
// replica's own from one). A member that goes down, stalls or no longer
// holds the round has the pieces it still owes asked of the others; those
// that came are kept. Each assembled vector is checked against its hash;
// should one fail (a member lied, and which one cannot be told), the whole
// state is fetched from one member at a time against a sha256 of all of it,
// and a mismatch there is that member's violation. Every state frame
// carries its fetch's tag, so a fetch never takes an earlier one's late
// frames. The fetching member then sends a join frame for the next round
// to every member and waits for their acknowledgements, after which they
// count it in again from that round on.
//
// Frames of a round this member has not started are buffered: at most two
// future rounds, at most MaxValues values per sender.
//
// # Wire
//
// Proto streams carry frames one way; each host keeps one stream to each
// peer it sends to. The frame layout is documented at header in frame.go:
// a 64-byte header (magic "PSWR", version 1, type, the group's codec, run,
// group, round, vector length, chunk, piece offset and length, a member
// mask, payload length) and a payload. Every header is checked against the
// group (codec, chunk and piece bounds computed from MaxValues and the
// codec's MaxEncodedSize, masks) before its payload is allocated; data
// payloads are decoded and must be finite. A bad frame resets the stream
// and calls the penalise callback; nothing a peer sends can panic.
//
// # Limits
//
// Agreement is exact when members fail by crashing, closing their
// connection, leaving, or never starting a round. A member that is slow
// right at a deadline can be counted in by some members and out by
// others; a result an owner sent to only some members before dying can
// differ from its successor's. Either makes those members' averages for
// that chunk differ for that round (their Results' Chunks show it); the
// next round is consistent again. Join races a round that has already
// started at some member: that member answers with behind, and the joiner
// fetches again.
package reduce
