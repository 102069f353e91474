// Package simlink runs libp2p QUIC hosts over simulated internet links in
// one process: every node has an access link with a rate, a one-way
// latency and a loss rate, and a p2p.Host runs on it unchanged (Noise/TLS,
// QUIC, the resource manager, gossipsub) through the Transports option:
//
//	nw := simlink.New(seed)
//	defer nw.Close()
//	link, _ := simlink.Profile("home")
//	transports, listen, err := nw.Node(link)
//	h, err := p2p.NewHost(ctx, p2p.HostOptions{Key: key, Listen: listen, Transports: transports})
//
// See Network for how two access links combine into a path, and package
// p2p/probe to measure what a path delivers.
//
// # Why not simnet
//
// github.com/marcopolo/simnet v0.0.7, which go-libp2p's x/simlibp2p uses,
// delivers RTT faithfully but caps throughput near 21 Mbit/s whatever the
// configured rate: measured here, 21.1 Mbit/s of raw datagrams on a
// 100 Mbit/s link and 53 on 1 Gbit/s; libp2p over it 21.2/20.9 Mbit/s up/down
// at 100 Mbit/s, 25 ms and 64/59 at 1 Gbit/s, 1 ms (TestMeasureSimnet).
// The cause is its rate limiter, not QUIC: each link direction is a
// golang.org/x/time/rate token bucket whose burst is one MTU, driven by a
// time.Timer that waits for the next packet's tokens. A Go timer shorter
// than a millisecond fires after about 1.1 ms when the process is
// otherwise idle (the runtime's netpoller sleeps in whole milliseconds:
// a 120 µs timer fired after 1.09 ms at the median here), and a bucket
// that holds one packet cannot bank the time overslept. So each wake-up
// sends the reserved packet plus at most one more: 2 × 1400 B per 1.09 ms
// ≈ 21 Mbit/s, the same for one stream or four. QUIC flow control (10 MB
// stream, 15 MB connection windows in libp2p) and CPU were not limits.
//
// # The link model
//
// simlink computes time instead of sleeping it. A write reserves the
// sender's uplink until its packet is serialised (the reservation queue is
// the uplink's drop-tail queue), and hands the packet to the receiver
// stamped with its arrival time; the receiver's reads pass arrived packets
// through its downlink the same way and release each at its time. A timer
// that fires late delays packets but cannot lower the rate. One clock
// goroutine per Network wakes readers to within tens of microseconds
// (nanosleep for the last 2 ms on Linux), where Go timers would add a
// millisecond each way to a 1 ms LAN RTT (2.19 ms measured without it,
// 1.11 ms with).
//
// Each drop-tail queue holds one bandwidth-delay product of its own link
// (rate × 2×Latency), at least 6 ms. quic-go's Cubic needs that much: after
// a loss it cuts its window to 0.7×, and in congestion avoidance it grows
// about one packet per RTT (it counts itself application-limited, which
// resets Cubic's clock, whenever acks free more than three packets of
// window between pacer ticks). With a quarter-BDP queue a 100 ms, 200 Mbit/s
// path ran at 83% after the first loss; with one BDP the cut window still
// fills the link. The 6 ms floor absorbs quic-go's 2 ms pacing bursts on
// fast links: a 1 Gbit/s LAN ran at 384 Mbit/s with a 64-packet queue.
//
// Rates count the 28-byte IPv4 and UDP headers, as a real link does, so
// the best a QUIC stream can carry is about 96% of Link.Mbps (1452-byte
// datagrams of which ~1420 bytes are stream data). Measured with
// p2p/probe, one bulk stream on a fresh connection (TestMeasureProfiles;
// see the package's tests for the figures on this machine) reaches ~95%
// of the rate on every profile, and RTTs are within 2% of 2×Latency on the
// WAN profiles and ~11% over on lan, where the rest is libp2p's own
// processing.
//
// # What to expect from quic-go on these links
//
// These are properties of quic-go (v0.64, inside go-libp2p v0.51), which a
// real network with the same queues shows too:
//
//   - After a bulk transfer one way, a transfer the other way on the same
//     connection can crawl (20.7 of 200 Mbit/s at 100 ms RTT). While the
//     first ran, the idle direction's sender was still in slow start and
//     its RTT samples included the queue behind the transfer; quic-go's
//     HyStart exits slow start on that delay (its 32-packet initial window
//     is already above HyStart's 16-packet floor, where Linux TCP's 10 is
//     not), and the window then grows a packet per RTT. p2p/probe measures
//     each direction on a fresh connection for that reason; pipeline
//     traffic that alternates direction on one connection will meet it.
//   - Random loss caps Cubic far below the link rate on long paths: at
//     0.1% loss and 150 ms RTT, the standard response function allows a
//     few Mbit/s in steady state, whatever the 50 Mbit/s link. A short
//     transfer on a fresh connection still gets most of the rate, because
//     the queue absorbs the first few cuts.
//
// # Cost
//
// A Network runs one goroutine (its clock); nodes and endpoints run none.
// Packets are copied once into pooled buffers. Nearly all CPU goes to
// QUIC and libp2p in the hosts; see TestMeasureProfiles for CPU per
// Gbit/s on this machine.
package simlink
