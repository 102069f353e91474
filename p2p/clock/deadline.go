package clock

import "time"

// The deadline rule. Every wait on a peer (a stage waiting for a neighbour, a control
// call, an all-reduce transfer, a dial, the launcher waiting for reports) gives up
// after
//
//	Deadline(expected, rtt, slack) = expected + RTTs × rtt + slack
//
// expected is how long the work waited for should take: Expect of the durations
// measured so far (steps, calls), the bytes still to come at the measured rate times a
// margin (p2p/reduce), a configured timeout before anything is measured, or 0 for a
// message that carries no work. rtt is the longest round trip to the peers waited on
// as libp2p measures it (Peerstore().LatencyEWMA; 0 until it has measured one). slack
// covers what neither measures: Busy where the peer may be computing, Stall for a
// stage waiting on its neighbours, Brief where a hung peer must not hold the caller up. A slow but steady peer only lengthens what is
// measured, and the deadline with it; one that stops is found within a few of its
// usual times.
const (
	// RTTs is how many round trips a deadline allows on top of the work: opening a
	// stream on a fresh connection takes three or four (transport and security
	// handshakes, muxer, protocol negotiation), the message and its reply one more,
	// and as many again for a lost packet's retransmission.
	RTTs = 8

	// MeanTimes and SlowestTimes stretch what was measured into what is expected
	// (Expect): MeanTimes its mean or SlowestTimes the slowest seen, whichever is
	// longer, so that ordinary variation (a GC, an evaluation, a busier link) does not
	// look like a peer that stopped.
	MeanTimes    = 4
	SlowestTimes = 2

	// OutwaitMeans and OutwaitSlowest are a wider stretch (Outwait) for a watcher that
	// oversees waits judged by Expect (the launcher over the stages), so that those find
	// a stall and report it before the watcher gives up on them all.
	OutwaitMeans   = 10
	OutwaitSlowest = 3

	// Busy is the slack where the peer may be busy computing: a node whose compute
	// saturates its cores can hold a reply back for seconds.
	Busy = 5 * time.Second
	// Stall is the slack of a stage waiting for its neighbours' frames: a loaded
	// machine pauses too, but this must stay below Busy, so that a neighbour that hangs
	// is found stalled (and named) before a control call to it runs out.
	Stall = 3 * time.Second
	// Brief is the slack where a hung peer (often why the call is made) must not hold
	// the caller up: an abort, an offer, a dial.
	Brief = 2 * time.Second
)

// Deadline is how long to wait on peers rtt away for work expected to take expected,
// with slack for what neither measures (see the rule above).
func Deadline(expected, rtt, slack time.Duration) time.Duration {
	return expected + RTTs*rtt + slack
}

// Expect is what durations measured with the given mean and slowest lead one to
// expect of the next: max(MeanTimes × mean, SlowestTimes × slowest).
func Expect(mean, slowest time.Duration) time.Duration {
	return max(MeanTimes*mean, SlowestTimes*slowest)
}

// Outwait is Expect's wider counterpart for a watcher of peers that judge each other
// by Expect: max(OutwaitMeans × mean, OutwaitSlowest × slowest).
func Outwait(mean, slowest time.Duration) time.Duration {
	return max(OutwaitMeans*mean, OutwaitSlowest*slowest)
}
