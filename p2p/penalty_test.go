package p2p

import (
	"errors"
	"math"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// fakeClock is a clock that moves only when told.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func testPenalties(t *testing.T, o PenaltyOptions) (*Penalties, *fakeClock) {
	t.Helper()
	c := newFakeClock()
	o.Now = c.Now
	p, err := NewPenalties(o)
	if err != nil {
		t.Fatal(err)
	}
	return p, c
}

func testPeer(t *testing.T) peer.ID {
	t.Helper()
	id, err := PeerID(mustKey(t))
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func TestPenaltiesBanAtTheLimitAndOnlyTheOffender(t *testing.T) {
	p, _ := testPenalties(t, PenaltyOptions{Limit: 3})
	id, other := testPeer(t), testPeer(t)
	for i := 1; i <= 3; i++ {
		if p.Banned(id) {
			t.Fatalf("banned after %d offences, limit 3", i-1)
		}
		score, banned := p.Add(id, "bad frame")
		if score != float64(i) || banned != (i == 3) {
			t.Fatalf("offence %d: score %v banned %v, want %d and %v", i, score, banned, i, i == 3)
		}
	}
	if !p.Banned(id) || p.Offences(id) != 3 {
		t.Fatalf("at the limit: banned=%v offences=%d", p.Banned(id), p.Offences(id))
	}
	if p.Banned(other) || p.Score(other) != 0 || p.Offences(other) != 0 {
		t.Fatal("an innocent peer is penalised")
	}
	if st := p.Stats(); st != (PenaltyStats{Offences: 3, Bans: 1, Banned: 1}) {
		t.Fatalf("stats %+v", st)
	}
}

func TestPenaltyScoresHalveEveryHalfLife(t *testing.T) {
	p, clock := testPenalties(t, PenaltyOptions{Limit: 10, HalfLife: time.Minute})
	id := testPeer(t)
	for range 8 {
		p.Add(id, "bad frame")
	}
	for _, want := range []float64{8, 4, 2, 1} {
		if got := p.Score(id); math.Abs(got-want) > 1e-9 {
			t.Fatalf("score %v, want %v", got, want)
		}
		clock.Advance(time.Minute)
	}
	// Four offences every half-life: after each burst the score is half the last
	// plus 4, which stays below 8, under the limit of 10.
	clock.Advance(time.Hour)
	for range 5 {
		for range 4 {
			if _, banned := p.Add(id, "bad frame"); banned {
				t.Fatalf("banned at score %v", p.Score(id))
			}
		}
		clock.Advance(time.Minute)
	}
}

func TestABanExpiresAndARepeatOffenderIsBannedAgain(t *testing.T) {
	p, clock := testPenalties(t, PenaltyOptions{Limit: 4, HalfLife: 10 * time.Minute, BanFor: 30 * time.Minute})
	id := testPeer(t)
	for range 4 {
		p.Add(id, "bad frame")
	}
	start := clock.Now()
	if !p.Banned(id) || !p.BannedUntil(id).Equal(start.Add(30*time.Minute)) {
		t.Fatalf("banned %v until %v, want until %v", p.Banned(id), p.BannedUntil(id), start.Add(30*time.Minute))
	}
	// An offence during the ban counts but does not extend it.
	clock.Advance(10 * time.Minute)
	p.Add(id, "bad frame")
	clock.Advance(20*time.Minute - time.Nanosecond)
	if !p.Banned(id) {
		t.Fatal("the ban ended early")
	}
	clock.Advance(time.Nanosecond)
	if p.Banned(id) || !p.BannedUntil(id).IsZero() {
		t.Fatal("the ban did not end after BanFor")
	}
	// 4 at 0, halved to 2 by the offence at 10 min (3), halved twice by 30 min.
	if got, want := p.Score(id), 3.0/4; math.Abs(got-want) > 1e-9 {
		t.Fatalf("score after the ban %v, want %v", got, want)
	}
	// The decayed score is where a re-offence starts: three more (3.75, within
	// a burst's slack of 4) now ban again.
	for i := range 3 {
		if _, banned := p.Add(id, "bad frame"); banned != (i == 2) {
			t.Fatalf("re-offence %d: banned %v", i, banned)
		}
	}
	if st := p.Stats(); st != (PenaltyStats{Offences: 8, Bans: 2, Banned: 1}) {
		t.Fatalf("stats %+v", st)
	}
}

func TestBanBansAtOnceUntilBanFor(t *testing.T) {
	p, clock := testPenalties(t, PenaltyOptions{BanFor: time.Hour})
	id := testPeer(t)
	p.Ban(id, "pubsub blacklist")
	p.Ban(id, "again") // already banned: one ban
	if !p.Banned(id) || p.Score(id) != DefaultPenaltyLimit {
		t.Fatalf("banned %v score %v", p.Banned(id), p.Score(id))
	}
	bl := pubsubBlacklist{p}
	if !bl.Contains(id) {
		t.Fatal("gossipsub is not told of the ban")
	}
	clock.Advance(time.Hour)
	if p.Banned(id) || bl.Contains(id) {
		t.Fatal("the ban outlived BanFor")
	}
	if st := p.Stats(); st.Bans != 1 || st.Offences != 0 || st.Banned != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestEachBansFirstRefusalIsReportedOnce(t *testing.T) {
	p, clock := testPenalties(t, PenaltyOptions{Limit: 1, BanFor: time.Minute})
	id := testPeer(t)
	if banned, _ := p.firstRefusal(id); banned {
		t.Fatal("refused a peer never penalised")
	}
	for ban := range 2 {
		p.Add(id, "bad frame")
		for i := range 3 {
			banned, first := p.firstRefusal(id)
			if !banned || first != (i == 0) {
				t.Fatalf("ban %d refusal %d: banned %v first %v", ban, i, banned, first)
			}
		}
		clock.Advance(time.Minute)
		if banned, _ := p.firstRefusal(id); banned {
			t.Fatalf("ban %d: refused after it ended", ban)
		}
	}
}

func TestPenaltiesForgetPeersWhoseScoreDecayed(t *testing.T) {
	p, clock := testPenalties(t, PenaltyOptions{HalfLife: time.Minute})
	for range minPrune {
		p.Add(testPeer(t), "bad frame")
	}
	clock.Advance(time.Hour) // 2^-60 of a point each
	last := testPeer(t)
	p.Add(last, "bad frame")
	if n := len(p.peers); n != 1 {
		t.Fatalf("%d records after pruning, want the fresh one", n)
	}
	if p.Offences(last) != 1 || p.Stats().Offences != minPrune+1 {
		t.Fatalf("pruning lost counts: %d, %+v", p.Offences(last), p.Stats())
	}
}

func TestPenaltyOptionsValidateNamesTheBadField(t *testing.T) {
	for _, c := range []struct {
		o    PenaltyOptions
		want string
	}{
		{PenaltyOptions{Limit: 0.5}, "Penalties.Limit"},
		{PenaltyOptions{Limit: math.Inf(1)}, "Penalties.Limit"},
		{PenaltyOptions{Limit: math.NaN()}, "Penalties.Limit"},
		{PenaltyOptions{HalfLife: -time.Second}, "Penalties.HalfLife"},
		{PenaltyOptions{BanFor: -time.Second}, "Penalties.BanFor"},
	} {
		_, err := NewPenalties(c.o)
		if !errors.Is(err, ErrBadOptions) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: got %v, want ErrBadOptions naming %s", c.o, err, c.want)
		}
		if err := (HostOptions{Key: mustKey(t), Penalties: c.o}).Validate(); !errors.Is(err, ErrBadOptions) {
			t.Errorf("%+v: HostOptions.Validate: %v", c.o, err)
		}
	}
	p, err := NewPenalties(PenaltyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if o := p.Options(); o.Limit != DefaultPenaltyLimit || o.HalfLife != DefaultPenaltyHalfLife || o.BanFor != DefaultBanDuration || o.Now == nil {
		t.Fatalf("defaults %v", o)
	}
}

// Violations a second apart decay a little in between; the Limit-th still bans.
func TestTheLimitThViolationInQuickSuccessionBans(t *testing.T) {
	p, clock := testPenalties(t, PenaltyOptions{})
	id := testPeer(t)
	for i := 1; i <= DefaultPenaltyLimit; i++ {
		clock.Advance(time.Second)
		score, banned := p.Add(id, "bad message")
		if banned != (i == DefaultPenaltyLimit) {
			t.Fatalf("violation %d (score %.3f): banned %v, want %v", i, score, banned, i == DefaultPenaltyLimit)
		}
	}
}
