// Package netns emulates WAN links between processes on one Linux machine with
// network namespaces, so that real pipeswarm nodes (separate processes, real
// libp2p over the kernel's TCP) can be benchmarked behind chosen bandwidth,
// latency and loss. It needs root and iproute2 (ip, tc).
//
// # Topology
//
// Build makes one hub namespace holding a bridge (address HubAddr) and, per
// node, a namespace joined to the bridge by a veth pair; node i has address
// Addr(i) in 10.201.0.0/24. Nothing is created in the caller's namespace, so
// a crashed harness can only leave namespaces behind, and Cleanup removes
// those by name.
//
// BuildNAT makes another topology, for NAT traversal: a public segment (a
// bridge) with public hosts, and private hosts each on its own LAN behind its
// own router namespace that masquerades (iptables) and drops unsolicited
// inbound packets; optionally with a random port per connection, as a
// symmetric NAT. It needs iptables as well.
//
// # Bandwidth
//
// A tbf qdisc on each end of a node's veth: the node end limits what the node
// sends (upload), the hub end limits what it receives (download). Mbps is the
// rate of Ethernet frames, so TCP's goodput with the 1500-byte MTU is at most
// 1448/1514 = 95.6% of it. The bucket holds rate/250 s of bytes (a kernel tick
// at HZ=250; tbf's watchdog is a high-resolution timer, so this only bounds
// burstiness), and the queue holds one bandwidth-delay product for the
// longest round trip this node can have (its latency plus the largest latency
// of any node), so one TCP flow keeps the link busy through a
// congestion-window cut.
//
// # Latency and loss
//
// A packet sent by node i is held for Nodes[i].Latency and dropped with
// probability Nodes[i].Loss, whatever its destination (another node or the
// hub); the hub adds nothing. So the round trip between nodes i and j is
// Latency(i)+Latency(j), and between node i and the hub Latency(i).
//
// Where the kernel has netem, netem does this: at the root of the node end of
// the veth, with the tbf as its child, so packets are shaped after their
// delay. Where it has not (DelayTUN, or DelayAuto when a probe of netem
// fails), a delay line in this process does:
//
//   - In each node namespace the route to 10.201.0.0/24 points at a TUN
//     device. The line reads each packet from it, stamps it due at
//     now+latency and queues it; every packet of a node has the same delay, so
//     the queue is a FIFO and order is kept.
//   - When a packet is due the line writes it back into the same TUN, where it
//     arrives as if from a wire. A rule (`ip rule add iif TUN table T`) routes
//     what arrives on the TUN by a table whose route to the subnet is the
//     veth, and the namespace forwards it there (ip_forward; accept_local on
//     the TUN, since the packet's source is the namespace's own address;
//     rp_filter off, since replies come in by the veth while the route back
//     is the TUN). Forwarding takes one off the TTL.
//   - The TUN has a virtio-net header and TCP segmentation offload, so TCP
//     hands the line segments of up to 64 KB, which go back whole and are cut
//     into frames only beyond the veth: one read and one write for up to 44
//     frames. Loss is drawn for each frame (seeded by Config.Seed and the node
//     index, independent between frames); when a frame of a segment is lost,
//     the line cuts the segment into frames itself and writes back the others.
//   - One goroutine per node, locked to its OS thread, runs the line: ppoll on
//     the TUN with the time until the head of the queue is due, read what
//     came, write what is due. It sleeps in the kernel with 1 ns timer slack,
//     as the Go runtime's timers wake on a millisecond grid when the process
//     is idle, too coarse for a 0.5 ms link.
//
// Most of the delay line's CPU time is the kernel's: writing a packet back
// runs, on the line's thread, the forwarding, the bridge and the receiving
// TCP stack that would otherwise run in the sender's. Per saturated link it
// was about a fifth of a core at 100 Mbit/s and a quarter at 1 Gbit/s on a
// 2-core VM (the cost follows packets more than bytes); one line has carried
// 9 Gbit/s. See TestProfilesMeasured. Measured round trips come out some
// 50-100 µs per direction longer than configured, the time a packet takes
// through the TUN and the line.
//
// # Processes and teardown
//
// Command runs a program in a namespace through `ip netns exec`, in its own
// process group, killed with the harness (parent-death signal) and by Close.
// Close kills every process still in any of the namespaces (listed by the
// kernel, so a node that was SIGKILLed or forked does not matter), stops the
// delay lines and deletes the namespaces, which deletes their veths and TUNs.
// A harness should call Close on every path out, Ctrl-C included:
//
//	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
//	defer stop()
//	n, err := netns.Build(ctx, netns.Config{Nodes: links})
//	if err != nil {
//		return err
//	}
//	defer n.Close()
//	hub := n.Command(ctx, -1, "pipeswarm", "launch", ...) // in the hub, at n.HubAddr()
//	node := n.Command(ctx, 0, "pipeswarm", "node", "--listen", "/ip4/"+n.Addr(0)+"/tcp/0", ...)
//	...
//	<-ctx.Done() // Ctrl-C: return, and the deferred Close tears everything down
//
// A harness killed with SIGKILL cannot run Close; its children die with it
// (parent-death signal) and Cleanup(prefix) removes its namespaces later.
package netns
