package p2p

import "github.com/libp2p/go-libp2p/core/protocol"

// Stream protocols. Each is versioned; an incompatible change gets a new ID.
const (
	// ProtoControl carries length-prefixed JSON control messages (WriteMsg, ReadMsg).
	ProtoControl protocol.ID = "/pipeswarm/ctl/1"
	// ProtoActivation carries tensor frames in the forward direction (WriteFrame, ReadFrame).
	// Version 2 is frame version 2: codecs and compact token ids.
	ProtoActivation protocol.ID = "/pipeswarm/act/2"
	// ProtoGradient carries tensor frames in the backward direction.
	ProtoGradient protocol.ID = "/pipeswarm/grad/2"
	// ProtoWeights carries a stage's checkpoint of a run to the run's launcher, to
	// assemble the model: a JSON request and reply (WriteMsg), then the checkpoint file.
	ProtoWeights protocol.ID = "/pipeswarm/weights/1"
)

// Gossipsub topics. They carry control traffic only, never tensors.
const (
	TopicRuns       = "pipeswarm/runs/1"       // run announcements
	TopicHeartbeats = "pipeswarm/heartbeats/1" // node heartbeats
	TopicMetrics    = "pipeswarm/metrics/1"    // run metrics
)
