package p2p

import (
	"sync"

	"github.com/libp2p/go-libp2p/core/peer"
)

// DefaultPenaltyLimit is the Limit of the Penalties a Host owns.
const DefaultPenaltyLimit = 10

// Penalties counts misbehaviour per peer: bad frames, bad messages, bad
// signatures. A peer whose count is at or over Limit is banned. It is safe
// for concurrent use; the zero value counts but never bans.
//
// Counts do not decay: a ban lasts as long as the Penalties does.
type Penalties struct {
	// Limit is the count at which a peer is banned; <= 0 never bans.
	// Set it before the Penalties is shared.
	Limit int

	mu       sync.Mutex
	counts   map[peer.ID]int
	reported map[peer.ID]bool // banned peers whose refusal was logged
}

// NewPenalties returns Penalties that ban a peer at limit.
func NewPenalties(limit int) *Penalties { return &Penalties{Limit: limit} }

// Add records one offence by id (reason is for the caller's logs and
// future tracing) and returns the peer's new count.
func (p *Penalties) Add(id peer.ID, reason string) (count int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.counts == nil {
		p.counts = make(map[peer.ID]int)
	}
	p.counts[id]++
	return p.counts[id]
}

// Count is id's number of offences so far.
func (p *Penalties) Count(id peer.ID) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.counts[id]
}

// Counts is every peer's number of offences, a copy. Counts only grow, so their
// sum does too.
func (p *Penalties) Counts() map[peer.ID]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[peer.ID]int, len(p.counts))
	for id, n := range p.counts {
		out[id] = n
	}
	return out
}

// Banned reports whether id has reached Limit.
func (p *Penalties) Banned(id peer.ID) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.banned(id)
}

func (p *Penalties) banned(id peer.ID) bool { return p.Limit > 0 && p.counts[id] >= p.Limit }

// Ban bans id at once, whatever its count.
func (p *Penalties) Ban(id peer.ID, reason string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.counts == nil {
		p.counts = make(map[peer.ID]int)
	}
	p.counts[id] = max(p.counts[id], p.Limit)
}

// firstRefusal reports whether id is banned and this is the first time
// anyone asked on behalf of a refused stream, so the refusal is logged once.
func (p *Penalties) firstRefusal(id peer.ID) (banned, first bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.banned(id) {
		return false, false
	}
	if p.reported[id] {
		return true, false
	}
	if p.reported == nil {
		p.reported = make(map[peer.ID]bool)
	}
	p.reported[id] = true
	return true, true
}

// pubsubBlacklist lets gossipsub drop banned peers' messages and refuse
// them as neighbours (pubsub.WithBlacklist).
type pubsubBlacklist struct{ p *Penalties }

func (b pubsubBlacklist) Add(id peer.ID) bool {
	b.p.Ban(id, "pubsub blacklist")
	return true
}

func (b pubsubBlacklist) Contains(id peer.ID) bool { return b.p.Banned(id) }
