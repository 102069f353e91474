package reduce

import (
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/pipeswarm/pipeswarm/p2p/clock"
	"github.com/pipeswarm/pipeswarm/p2p/codec"
)

// MaxMembers is the most replicas a group may have: contributor sets are
// uint64 bitmasks.
const MaxMembers = 64

// Defaults of GroupConfig's zero fields.
const (
	// DefaultMargin multiplies the expected time of what is still to
	// come: a peer is given up after that long without progress.
	DefaultMargin = 4.0
	// DefaultPriorRate is the bytes/s assumed before any round measured
	// one: slow, so that a first round is not cut short on a slow link.
	DefaultPriorRate = 1 << 20
	// DefaultSlack is the slack of every transfer deadline (clock.Deadline):
	// scheduling and GC pauses, and round trips a mock network cannot
	// measure.
	DefaultSlack = 500 * time.Millisecond
)

// maxValuesLimit keeps every count of values and every payload length a
// uint32 on the wire, whatever the codec.
const maxValuesLimit = 1 << 28

// ErrBadConfig is wrapped by GroupConfig.Validate errors.
var ErrBadConfig = errors.New("reduce: bad group config")

// GroupConfig describes one all-reduce group: the R replicas of one
// pipeline stage of one run.
type GroupConfig struct {
	Run   uint64 // which run
	Group uint32 // which stage

	Peers []peer.ID // members in replica order, 1 to MaxMembers, distinct
	Self  int       // our index in Peers

	Codec     codec.Spec // wire encoding of contributions and results
	MaxValues int        // the largest vector a round may carry; bounds every frame

	// Margin: a peer is given up after clock.Deadline(Margin × (bytes still
	// to come / measured rate), RTT, Slack) without progress. 0 = DefaultMargin;
	// otherwise at least 1.
	Margin float64
	// PriorRate is the transfer rate in bytes/s assumed until a round has
	// measured one. 0 = DefaultPriorRate.
	PriorRate float64
	// Slack is added to every transfer deadline. 0 = DefaultSlack.
	Slack time.Duration

	// State returns what a member that fell behind downloads with
	// FetchState: the last round this member completed and its vectors
	// (global weights, outer momentum, ...), at most 64 of at most
	// MaxValues values each. It runs on the group's goroutine, so it must
	// not call the Group; the vectors are copied before it returns to the
	// group's work, so they only need to be stable during the call. nil
	// serves nothing. want is the round the fetching member asked for (0:
	// the latest); a member that still holds that round's state returns it,
	// else its latest.
	State func(want uint64) (round uint64, vecs [][]float32)

	// Clock is what deadlines are measured and timed with; nil = clock.Real.
	Clock clock.Clock

	// FaultStallRound is fault injection for tests of the others' fault handling:
	// in this round the member stops just before publishing the chunks it owns, as
	// a process that hangs in the middle of an all-reduce would, and logs "stalling
	// mid all-reduce". 0 (the default) turns it off.
	FaultStallRound uint64
}

// Validate reports the first unusable field. Errors wrap ErrBadConfig.
func (c GroupConfig) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrBadConfig}, args...)...)
	}
	if len(c.Peers) == 0 || len(c.Peers) > MaxMembers {
		return bad("Peers: %d members, want 1 to %d", len(c.Peers), MaxMembers)
	}
	seen := make(map[peer.ID]int, len(c.Peers))
	for i, p := range c.Peers {
		if p == "" {
			return bad("Peers[%d]: empty peer ID", i)
		}
		if j, dup := seen[p]; dup {
			return bad("Peers[%d]: %s is also Peers[%d]", i, p, j)
		}
		seen[p] = i
	}
	if c.Self < 0 || c.Self >= len(c.Peers) {
		return bad("Self: %d outside [0, %d)", c.Self, len(c.Peers))
	}
	if err := c.Codec.Validate(); err != nil {
		return bad("Codec: %w", err)
	}
	if c.MaxValues < 1 || c.MaxValues > maxValuesLimit {
		return bad("MaxValues: %d outside [1, %d]", c.MaxValues, maxValuesLimit)
	}
	if c.Margin != 0 && !(c.Margin >= 1 && c.Margin <= 1e6) {
		return bad("Margin: %v, want 0 (default) or 1 to 1e6", c.Margin)
	}
	if c.PriorRate != 0 && !(c.PriorRate > 0 && !math.IsInf(c.PriorRate, 0)) {
		return bad("PriorRate: %v, want 0 (default) or a positive bytes/s", c.PriorRate)
	}
	if c.Slack < 0 {
		return bad("Slack: %v is negative", c.Slack)
	}
	return nil
}

func (c GroupConfig) withDefaults() GroupConfig {
	if c.Margin == 0 {
		c.Margin = DefaultMargin
	}
	if c.PriorRate == 0 {
		c.PriorRate = DefaultPriorRate
	}
	if c.Slack == 0 {
		c.Slack = DefaultSlack
	}
	c.Clock = clock.Or(c.Clock)
	return c
}
