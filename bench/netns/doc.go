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
// # Bandwidth
//
// A tbf qdisc on each end of a node's veth: the node end limits what the node
// sends (upload), the hub end limits what it receives (download). The bucket
// holds rate/250 s of bytes (a kernel tick at HZ=250; tbf's watchdog is a
// high-resolution timer, so this only bounds burstiness), and the queue holds
// one bandwidth-delay product for the longest round trip this node can have
// (its latency plus the largest latency of any node), so one TCP flow keeps
// the link busy through a congestion-window cut.
//
// # Latency and loss
//
// A packet sent by node i is held for Nodes[i].Latency and dropped with
// probability Nodes[i].Loss, whatever its destination (another node or the
// hub); the hub adds nothing. So the round trip between nodes i and j is
// Latency(i)+Latency(j), and between node i and the hub Latency(i).
//
// Where the kernel has netem, it does this: netem at the root of the node end
// of the veth with the tbf as its child, so packets are shaped after their
// delay, the same order as below. Where it has not (DelayTUN, or DelayAuto when
// a probe of netem fails), a delay line in this process does it. In each node
// namespace the route to 10.201.0.0/24 points at a TUN device; a goroutine
// reads each packet from it, stamps it due at now+latency and queues it (FIFO:
// every packet of one node has the same delay, so order is kept); a second
// goroutine, on its own OS thread with 1 ns timer slack so that sub-millisecond
// delays are kept, sleeps until the head is due and writes it to a raw IPv4
// socket (IP_HDRINCL) created in the node namespace with SO_MARK set. A policy
// rule in the namespace sends marked packets to a table whose route to the
// subnet is the veth, so they leave by the veth instead of coming back into the
// TUN. Reverse-path filtering is off in node namespaces because replies arrive
// on the veth while the route back points at the TUN. The cost is two system
// calls and a channel hand-off per packet (about 1500 bytes: the TUN has no
// offloads), see the package tests for figures.
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
