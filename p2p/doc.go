// Package p2p is pipeswarm's network layer.
//
// It builds the libp2p host a node runs on (identity, TCP and QUIC
// transports, Noise/TLS security, yamux, a resource manager, optional mDNS
// discovery and gossipsub), and defines the wire formats peers speak:
//
//   - tensor frames (frame.go) carry activations and activation-gradients on
//     direct streams (ProtoActivation, ProtoGradient), their values encoded
//     with a codec chosen per run (package p2p/codec: fp32, bf16 or blockwise
//     int8 or int4, optionally with zstd) and their token ids in as few bytes as fit;
//   - length-prefixed JSON messages (msg.go) carry control traffic on
//     ProtoControl streams;
//   - signed envelopes (signed.go) let nodes accept run assignments only from
//     launchers they trust;
//   - gossipsub topics (TopicRuns, TopicHeartbeats, TopicMetrics) carry run
//     announcements, heartbeats and metrics, never tensors.
//
// NAT traversal (nat.go, reachability.go, paths.go), all off unless
// HostOptions asks for it: the host finds out whether peers can dial it
// (AutoNAT v2 against the peers it knows, and what they observed of it) and
// Assess turns that into a Reachability with a reason and a fix; it serves as
// a circuit relay v2 with limits a training run fits in, reserves slots on
// relays while it is not reachable, and upgrades relayed connections by hole
// punching (DCUtR). OpenTensorStream prefers a direct connection and records
// which path each peer's tensor streams take.
//
// Everything read from the network is length-limited, versioned and
// validated; malformed input is an error wrapping ErrBadFrame, ErrBadMsg or
// ErrBadSignature, never a panic. Those, and the violations of the
// subpackages' protocols, wrap ErrViolation; callers count only such errors
// against the sender, with Penalties (a stream reset, a timeout or a stream
// cut short is not one). Scores decay and bans expire; the Host refuses a
// banned peer's streams and connections while its ban lasts.
//
// This package must not import shard, optim or node (see deps_test.go).
package p2p
