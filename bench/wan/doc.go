// Package wan is `pipeswarm bench wan`: a whole swarm on one machine behind emulated
// internet links, and the report of how it trained against the centralised run.
//
// Three ways to emulate the links share one report:
//   - sim: every node in this process, each a real daemon whose libp2p host runs QUIC
//     over an in-process simulated network (p2p/simlink);
//   - netns: every node a `pipeswarm node` process in its own network namespace,
//     links shaped by tbf and a delay line (bench/netns; root);
//   - meter: real compute and real frames from the centralised trainer, scheduled by
//     the stages' own cores on virtual time, each stage as if on its own machine.
package wan
