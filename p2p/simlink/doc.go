// Package simlink runs libp2p QUIC hosts over simulated internet links in
// one process: every node has an access link with a rate, a one-way
// latency and a loss rate, and a p2p.Host runs on it unchanged (Noise/TLS,
// QUIC, the resource manager, gossipsub) through the Transports option:
//
//	nw := simlink.New(seed)
//	defer nw.Close()
//	home := simlink.Link{Mbps: 100, Latency: 25 * time.Millisecond}
//	transports, listen, err := nw.Node(home)
//	h, err := p2p.NewHost(ctx, p2p.HostOptions{Key: key, Listen: listen, Transports: transports})
//
// See Network for how two access links combine into a path, and package
// p2p/probe to measure what a path delivers.
//
// # Why not simnet
//
// github.com/marcopolo/simnet v0.0.7, which go-libp2p's x/simlibp2p uses,
// keeps RTT but caps throughput near 21 Mbit/s whatever the configured
// rate. Measured here (TestMeasureSimnet): raw datagrams arrive at 21.1
// Mbit/s on a 100 Mbit/s link and 53 on 1 Gbit/s; libp2p over it moves
// 21.2/20.9 Mbit/s up/down at 100 Mbit/s, 25 ms, and 64/59 at 1 Gbit/s, 1 ms.
// The limit is its rate limiter, not QUIC. Each link direction is a
// golang.org/x/time/rate token bucket whose burst is one MTU, driven by a
// time.Timer that waits for the next packet's tokens. A Go timer shorter
// than a millisecond fires after about 1.1 ms when the process is
// otherwise idle (the runtime's poller sleeps in whole milliseconds; a
// 120 µs timer fired after 1.09 ms at the median here), and a one-packet
// bucket cannot bank the time overslept, so each wake-up sends the
// reserved packet and at most one more: 2 × 1400 B per 1.09 ms ≈ 21 Mbit/s,
// for one stream or four. QUIC flow control (libp2p allows 10 MB per
// stream, 15 MB per connection) and CPU were not limits.
//
// # The link model
//
// simlink computes time instead of sleeping it. A write reserves the
// sender's uplink until its packet is serialised (that reservation is the
// uplink's queue) and hands the packet to the receiver stamped with its
// arrival time; the receiver's reads pass arrived packets through its
// downlink the same way and release each at its time. A late wake-up
// delays packets but cannot lower the rate. Reads wake on Go timers, or,
// on paths under 20 ms one way, on the Network's clock: a goroutine that
// sleeps with nanosleep and wakes readers to within ~50 µs, where a Go
// timer would add about a millisecond each way to a 1 ms LAN RTT (2.19 ms
// measured on Go timers, 0.97–1.05 ms on the clock). The clock is kept to
// short paths because its wake-ups cost CPU: a host pair at 100 Mbit/s,
// 25 ms used 0.43 cores with it and 0.10 without.
//
// Each drop-tail queue holds one bandwidth-delay product of its own link
// (rate × 2×Latency), at least 6 ms. quic-go's Cubic needs that much: a
// loss cuts its window to 0.7×, and in congestion avoidance it then grows
// by about a packet per RTT (it counts itself application-limited, which
// restarts Cubic's clock, whenever acks free more than three packets of
// window between pacer ticks). With an eighth of a BDP a 200 Mbit/s, 100 ms
// path ran at 83%; with one BDP the cut window still fills the link. The
// 6 ms floor absorbs quic-go's pacing bursts (up to 2 ms of data at once,
// more when its timer is late): a 1 Gbit/s LAN ran at 384 Mbit/s with a
// 64-packet queue, 786 with 256 and 953 with 512.
//
// Rates count the 28-byte IPv4 and UDP headers, as a real link does, so a
// QUIC stream carries at most ~96% of Link.Mbps (1452-byte datagrams with
// ~1420 bytes of stream data). One bulk stream on a fresh connection
// reaches 92–96% of the rate on lan, protocol-nanogpt and home, and on
// intercontinental without its loss; RTTs are within 3% of 2×Latency on
// all four profiles (TestMeasureProfiles logs the figures). libp2p itself
// adds ~10 µs to an RTT.
//
// # What quic-go does on these links
//
// These are properties of quic-go (v0.64, in go-libp2p v0.51), and a real
// network with the same queues shows them too:
//
//   - After a bulk transfer one way, a transfer the other way on the same
//     connection crawls: 20.8 of 200 Mbit/s at 100 ms RTT, 29.9 of 100 at
//     50 ms. While the first ran, the idle direction's sender was still in
//     slow start and its few RTT samples included the queue behind the
//     transfer; quic-go's HyStart takes that delay as congestion and leaves
//     slow start at its initial 32-packet window (HyStart acts from 16
//     packets; Linux TCP starts at 10, so an idle TCP sender never does
//     this), and from there the window grows a packet per RTT. A queue
//     short enough not to trip it (under RTT/8) is too short for Cubic to
//     fill the link, above. p2p/probe measures each direction on a fresh connection; pipeline
//     traffic that alternates direction on one connection will meet it.
//   - Random loss holds Cubic far below the link on long paths. At 0.1%
//     and 150 ms RTT (intercontinental) a 20 MB transfer ran at 5.6 and
//     3.7 Mbit/s of 50; Cubic's Reno-friendly window, √(3·1.7/(0.6·p)) ≈ 92
//     packets per RTT, allows ~6.9. A 1.5 s transfer on a fresh connection
//     got 93% one way and 8% the other in one run, 67% and 98% in another:
//     a loss early in slow start leaves the window small, and it then
//     grows a packet per RTT.
//
// # Cost
//
// A Network runs one goroutine (its clock) and nodes run none; a p2p.Host
// runs ~40 of its own. Packets are copied once, into pooled buffers. A
// pair of hosts moving 1 Gbit/s on lan used 1.1 of this machine's 2 cores
// (1.2 CPU-seconds per Gbit, 0.5 of it without the clock), so lan falls
// short of its rate when other work shares the machine: 74–85% at a load
// average of 3. At 100–200 Mbit/s on the WAN profiles a pair used 0.2
// cores.
package simlink
