// Package node runs pipeline stages for a swarm: the daemon a GPU owner keeps running
// (`pipeswarm node`), the worker that trains one stage of a run, and the launcher a
// researcher uses to staff and watch a run (`pipeswarm launch`).
//
// What a stage does next is decided by node/core, a deterministic state machine; this
// package does the I/O around it. A worker owns one loop goroutine that feeds the core
// events (frames from the network, finished computations, peers' gradient norms) and
// carries out its actions, and one compute goroutine so the network never waits on a
// matmul. Tensors travel on direct libp2p streams (p2p.ProtoActivation,
// p2p.ProtoGradient); control messages (offers, signed assignments, norms, reports) are
// length-prefixed JSON on p2p.ProtoControl; gossipsub carries heartbeats and run
// announcements only.
package node
