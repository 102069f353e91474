// Package faults holds no code, only tests: whole swarms in one process, each node a
// real daemon (daemon.New) and the launcher a real one (launcher.Launch), every libp2p
// host on QUIC over p2p/simlink's simulated links, as the WAN bench builds its swarm.
//
// Its tests put runs through what happens to swarms on real networks and check what
// the docs promise of each: nodes killed (their endpoints cut, so they say no goodbye,
// then closed) and restarted on their data directories and keys, every node stopped
// and the run resumed, a node that hangs (its link goes silent), a replica lost in the
// middle of an all-reduce, newcomers that take the cell of a node gone, the survivors
// of two broken replica pipelines paired into one, and a launcher killed mid-run.
// Where the docs say a run continues bit for bit, the losses are compared with
// `train`'s for equality, not within a tolerance.
//
// The command's own tests (cmd/pipeswarm) keep two of these with real node processes
// and signals; the rest are here, where a fault is a call at a known step rather than a
// signal sent after polling files.
package faults
