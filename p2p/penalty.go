package p2p

import (
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// Defaults of PenaltyOptions.
const (
	// DefaultPenaltyLimit is the score at which a peer is banned: ten
	// violations in quick succession.
	DefaultPenaltyLimit = 10
	// DefaultPenaltyHalfLife is how long a score takes to halve: a peer that
	// breaks the protocol now and then, rarer than Limit per few half-lives,
	// is never banned.
	DefaultPenaltyHalfLife = 10 * time.Minute
	// DefaultBanDuration is how long a ban lasts.
	DefaultBanDuration = 30 * time.Minute
)

// PenaltyOptions configure Penalties. Zero fields take the defaults.
type PenaltyOptions struct {
	Limit    float64          // score at which a peer is banned (each violation adds 1); 0 = DefaultPenaltyLimit
	HalfLife time.Duration    // time for a score to halve; 0 = DefaultPenaltyHalfLife
	BanFor   time.Duration    // how long a ban lasts; 0 = DefaultBanDuration
	Now      func() time.Time // the clock; nil = time.Now
}

// EnsureDefaults sets zero fields to their defaults.
func (o *PenaltyOptions) EnsureDefaults() {
	if o.Limit == 0 {
		o.Limit = DefaultPenaltyLimit
	}
	if o.HalfLife == 0 {
		o.HalfLife = DefaultPenaltyHalfLife
	}
	if o.BanFor == 0 {
		o.BanFor = DefaultBanDuration
	}
	if o.Now == nil {
		o.Now = time.Now
	}
}

// Validate reports the first bad field (zero fields are fine: they take the
// defaults). Errors wrap ErrBadOptions.
func (o PenaltyOptions) Validate() error {
	switch {
	case o.Limit != 0 && !(o.Limit >= 1 && !math.IsInf(o.Limit, 0)):
		return fmt.Errorf("%w: Penalties.Limit: %v, want a finite score ≥ 1", ErrBadOptions, o.Limit)
	case o.HalfLife < 0:
		return fmt.Errorf("%w: Penalties.HalfLife: %v is negative", ErrBadOptions, o.HalfLife)
	case o.BanFor < 0:
		return fmt.Errorf("%w: Penalties.BanFor: %v is negative", ErrBadOptions, o.BanFor)
	}
	return nil
}

func (o PenaltyOptions) String() string {
	return fmt.Sprintf("limit %g, half-life %v, bans for %v", o.Limit, o.HalfLife, o.BanFor)
}

// Penalties keeps a score per peer of its protocol violations (errors that
// wrap ErrViolation: bad frames, bad messages, bad signatures). Each
// violation adds 1; scores decay exponentially with HalfLife. A peer whose
// score reaches Limit is banned for BanFor; then it may connect again, with
// what is left of its score, so a peer that goes on misbehaving is soon
// banned again. It is safe for concurrent use.
type Penalties struct {
	opt PenaltyOptions

	mu    sync.Mutex
	peers map[peer.ID]*standing
	prune int // prune peers' records when there are more than this
	stats PenaltyStats
}

// standing is one peer's record.
type standing struct {
	score    float64
	at       time.Time // when score was last decayed
	until    time.Time // end of the current (or last) ban; zero if never banned
	offences int
	logged   bool // the current ban's first refusal has been logged
}

// PenaltyStats counts what Penalties recorded since it was made.
type PenaltyStats struct {
	Offences int `json:"offences"` // violations recorded
	Bans     int `json:"bans"`     // bans imposed
	Banned   int `json:"banned"`   // peers banned now
}

// burstSlack is how far under Limit a score may be and still ban: violations
// in quick succession have decayed a little by the last of them (ten over a
// few seconds score 9.99), and the Limit-th of them is the one that bans. Ten
// violations still ban within 0.07 half-lives of the first (10·2^-0.074 = 9.5).
const burstSlack = 0.5

// minPrune is the least number of records kept before pruning.
const minPrune = 256

// NewPenalties returns Penalties with o's settings (zero fields take the
// defaults).
func NewPenalties(o PenaltyOptions) (*Penalties, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	o.EnsureDefaults()
	return &Penalties{opt: o, peers: map[peer.ID]*standing{}, prune: minPrune}, nil
}

// Options are the settings in force, defaults filled in.
func (p *Penalties) Options() PenaltyOptions { return p.opt }

// get is id's record brought up to now, created if absent.
func (p *Penalties) get(id peer.ID, now time.Time) *standing {
	s := p.peers[id]
	if s == nil {
		s = &standing{at: now}
		p.peers[id] = s
		return s
	}
	if dt := now.Sub(s.at); dt > 0 {
		s.score *= math.Exp2(-float64(dt) / float64(p.opt.HalfLife))
		s.at = now
	}
	return s
}

// Add records one violation by id (reason is for the caller's logs) and
// returns id's score after it and whether id is banned. Reaching Limit (less
// the decay of a quick burst, burstSlack) bans id for BanFor; violations during a ban add to the score but do not extend
// the ban.
func (p *Penalties) Add(id peer.ID, reason string) (score float64, banned bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.opt.Now()
	s := p.get(id, now)
	s.score++
	s.offences++
	p.stats.Offences++
	if now.Before(s.until) {
		return s.score, true
	}
	if s.score >= p.opt.Limit-burstSlack {
		p.ban(s, now)
		return s.score, true
	}
	p.maybePrune(now)
	return s.score, false
}

func (p *Penalties) ban(s *standing, now time.Time) {
	s.until = now.Add(p.opt.BanFor)
	s.logged = false
	p.stats.Bans++
}

// maybePrune forgets peers whose score has decayed to nothing and who are
// not banned, once there are twice as many records as after the last prune:
// so a host that meets many peers does not keep a record of each for good.
func (p *Penalties) maybePrune(now time.Time) {
	if len(p.peers) <= p.prune {
		return
	}
	for id := range p.peers {
		s := p.get(id, now)
		if s.score < 1e-3 && !now.Before(s.until) {
			delete(p.peers, id)
		}
	}
	p.prune = max(minPrune, 2*len(p.peers))
}

// Score is id's score now.
func (p *Penalties) Score(id peer.ID) float64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.peers[id]; !ok {
		return 0
	}
	return p.get(id, p.opt.Now()).score
}

// Offences is how many violations of id are on record (a record is dropped
// once its score has decayed to nothing and it is not banned).
func (p *Penalties) Offences(id peer.ID) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if s := p.peers[id]; s != nil {
		return s.offences
	}
	return 0
}

// Banned reports whether id is banned now.
func (p *Penalties) Banned(id peer.ID) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.peers[id]
	return s != nil && p.opt.Now().Before(s.until)
}

// BannedUntil is when id's ban ends, or the zero time if it is not banned.
func (p *Penalties) BannedUntil(id peer.ID) time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	if s := p.peers[id]; s != nil && p.opt.Now().Before(s.until) {
		return s.until
	}
	return time.Time{}
}

// Ban bans id for BanFor at once, whatever its score, unless it is banned
// already (reason is for the caller's logs).
func (p *Penalties) Ban(id peer.ID, reason string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.opt.Now()
	s := p.get(id, now)
	if now.Before(s.until) {
		return
	}
	s.score = max(s.score, p.opt.Limit)
	p.ban(s, now)
}

// Stats counts the violations and bans recorded so far, and the peers banned
// now.
func (p *Penalties) Stats() PenaltyStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := p.stats
	now := p.opt.Now()
	for _, s := range p.peers {
		if now.Before(s.until) {
			st.Banned++
		}
	}
	return st
}

// firstRefusal reports whether id is banned and, if so, whether this is the
// first refusal of one of its streams during this ban, so that each ban's
// refusals are logged once.
func (p *Penalties) firstRefusal(id peer.ID) (banned, first bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.peers[id]
	if s == nil || !p.opt.Now().Before(s.until) {
		return false, false
	}
	first = !s.logged
	s.logged = true
	return true, first
}

// pubsubBlacklist lets gossipsub drop banned peers' messages and refuse
// them as neighbours (pubsub.WithBlacklist) while their ban lasts.
type pubsubBlacklist struct{ p *Penalties }

func (b pubsubBlacklist) Add(id peer.ID) bool {
	b.p.Ban(id, "pubsub blacklist")
	return true
}

func (b pubsubBlacklist) Contains(id peer.ID) bool { return b.p.Banned(id) }

// Counts is every recorded peer's number of violations, a copy (for a status page).
func (p *Penalties) Counts() map[peer.ID]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[peer.ID]int, len(p.peers))
	for id, s := range p.peers {
		out[id] = s.offences
	}
	return out
}
