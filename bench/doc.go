// Package bench measures pipeswarm: what stage-boundary compression costs in
// convergence and saves in bytes (Compression), and later whole swarms behind
// emulated WAN links. Results are typed rows written as Markdown and JSON.
package bench
