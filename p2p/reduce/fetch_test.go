package reduce

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// servedStates gives member i of a cluster a state of round 5: a shared
// vector every member holds alike (global weights), and one of its own
// (its optimiser's moments). change, if set, may alter what a member serves
// from its second call on (the first describes the state, later ones serve
// pieces).
type servedStates struct {
	shared []float32
	own    [][]float32
	calls  []atomic.Int32
	change func(member int, call int32, round uint64, vecs [][]float32) (uint64, [][]float32)
}

func newServedStates(R, sharedLen, ownLen int) *servedStates {
	s := &servedStates{shared: randVecs(1, sharedLen, 11)[0], own: randVecs(R, ownLen, 12), calls: make([]atomic.Int32, R)}
	return s
}

func (s *servedStates) tweak(i int, cfg *GroupConfig) {
	cfg.MaxValues = 1 << 22
	cfg.State = func(uint64) (uint64, [][]float32) {
		vecs := [][]float32{append([]float32(nil), s.shared...), append([]float32(nil), s.own[i]...), {}}
		n := s.calls[i].Add(1)
		if s.change != nil {
			return s.change(i, n, 5, vecs)
		}
		return 5, vecs
	}
}

// A member fetching state takes each vector's pieces from every member whose
// copy of it is the same: the shared vector from all the others at once, a
// member's own vector whole from one of them; each vector is as served.
func TestStateComesFromSeveralMembersAtOnce(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const R, v = 4, 3
	st := newServedStates(R, 6*PieceValues+17, 2*PieceValues)
	cl := newCluster(t, R, spec(t, "int8/32"), st.tweak)
	round, vecs, err := cl.groups[v].FetchState(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if round != 5 || len(vecs) != 3 {
		t.Fatalf("fetched round %d with %d vectors, want round 5 with 3", round, len(vecs))
	}
	mustEqual(t, "shared vector", vecs[0], st.shared)
	// Each member's own vector differs: the first candidate's is taken.
	mustEqual(t, "own vector", vecs[1], st.own[(v+1)%R])
	if len(vecs[2]) != 0 {
		t.Errorf("empty vector came back with %d values", len(vecs[2]))
	}
	rep := cl.groups[v].LastFetch()
	if rep.Whole || rep.Resent != 0 || rep.Round != 5 {
		t.Errorf("report %+v, want pieces from several members, none resent", rep)
	}
	if len(rep.Pieces) != R-1 {
		t.Errorf("pieces came from %d members, want %d: %v", len(rep.Pieces), R-1, rep.Pieces)
	}
	total := 0
	for id, n := range rep.Pieces {
		total += n
		if n < 2 {
			t.Errorf("%s served %d pieces; the 7 shared ones should be spread", id, n)
		}
	}
	if want := 7 + 2 + 1; total != want {
		t.Errorf("%d pieces fetched, want %d", total, want)
	}
	if n := cl.penalties.Load(); n != 0 {
		t.Errorf("%d penalties in an honest fetch", n)
	}
}

// A member that stops serving part-way (it moved on to a later round, or its
// process died) has what it still owed asked of the others; what it had sent
// is kept, and the state assembled is exact.
func TestStateFetchGoesOnWhenAServerIsLost(t *testing.T) {
	for _, mode := range []string{"moved-on", "died"} {
		t.Run(mode, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			const R, v, lost = 3, 2, 1
			st := newServedStates(R, 40*PieceValues, PieceValues)
			var cl *cluster
			var once sync.Once
			st.change = func(member int, call int32, round uint64, vecs [][]float32) (uint64, [][]float32) {
				if member != lost || call < 2 {
					return round, vecs
				}
				if mode == "moved-on" {
					return round + 1, vecs // the slot of round 5 now holds round 6
				}
				// Dies while its pieces are on their way.
				once.Do(func() {
					go func() {
						time.Sleep(2 * time.Millisecond)
						cl.kill(lost)
					}()
				})
				return round, vecs
			}
			// The lost member is found by its answer or its connection, never by the
			// stall bound; a wide one keeps healthy members that the race detector
			// slows from being taken for lost too.
			cl = newCluster(t, R, spec(t, "int8/32"), func(i int, cfg *GroupConfig) {
				st.tweak(i, cfg)
				cfg.Slack = 20 * time.Second
			})
			round, vecs, err := cl.groups[v].FetchState(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if round != 5 {
				t.Fatalf("fetched round %d, want 5", round)
			}
			mustEqual(t, "shared vector", vecs[0], st.shared)
			rep := cl.groups[v].LastFetch()
			t.Logf("report: %+v", rep)
			if rep.Whole {
				t.Errorf("fell back to a whole fetch; the pieces owed should have been asked of the other member")
			}
			total := 0
			for _, n := range rep.Pieces {
				total += n
			}
			if total != 40+1+1 {
				t.Errorf("%d pieces taken, want each of the 42 once", total)
			}
			if mode == "moved-on" && rep.Resent == 0 {
				t.Errorf("nothing resent, though member %d served none of its pieces", lost)
			}
			if n := cl.penalties.Load(); n != 0 {
				t.Errorf("%d penalties; a member that moved on or died is no offender", n)
			}
		})
	}
}

// A member serving pieces that do not match the hash it described makes the
// assembled vector fail its sha256: the fetch falls back to whole states,
// member by member, and what it returns is exact.
func TestStateFetchWithALyingServerFallsBackToWholeStates(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const R, v, liar = 3, 2, 1
	st := newServedStates(R, 4*PieceValues, PieceValues)
	st.change = func(member int, call int32, round uint64, vecs [][]float32) (uint64, [][]float32) {
		if member == liar && call == 2 {
			for k := range vecs[0] {
				vecs[0][k] += 1
			}
		}
		return round, vecs
	}
	cl := newCluster(t, R, spec(t, "int8/32"), st.tweak)
	_, vecs, err := cl.groups[v].FetchState(ctx)
	if err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "shared vector", vecs[0], st.shared)
	mustEqual(t, "own vector", vecs[1], st.own[0])
	if rep := cl.groups[v].LastFetch(); !rep.Whole || len(rep.Pieces) != 1 {
		t.Errorf("report %+v, want the whole state from one member", rep)
	}
}

// A request for pieces a state does not have is a protocol violation.
func TestPiecesRequestBeyondTheStateIsPenalised(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st := newServedStates(2, PieceValues, 1)
	cl := newCluster(t, 2, spec(t, "int8/32"), st.tweak)
	payload := []byte{0, 0, 0, 0, 9, 0, 0, 0} // vector 0, piece 9 of 1
	rawSend(t, ctx, cl.hosts[1], cl.hosts[0].ID(), outFrame{
		hdr: header{typ: typeStatePiecesReq, codec: spec(t, "int8/32"), run: 7, group: 2, round: 5, index: 1, plen: 8}, payload: payload})
	deadline := time.Now().Add(10 * time.Second)
	for cl.penalties.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("a request for piece 9 of a one-piece vector was not penalised")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Two members swap places (a survivor of a broken replica pipeline moved into
// another's): the others Replace one place with the other's peer, each of the
// two joins again in its new place and fetches the state, and the next round
// counts everyone in, bit-identical to Reference.
func TestSwappedMembersRejoinInTheirNewPlaces(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const R = 3
	c := spec(t, "int8/32")
	var mu sync.Mutex
	var round uint64
	var global []float32
	state := func(uint64) (uint64, [][]float32) {
		mu.Lock()
		defer mu.Unlock()
		return round, [][]float32{append([]float32(nil), global...)}
	}
	cl := newCluster(t, R, c, func(_ int, cfg *GroupConfig) { cfg.State = state })
	ys := randVecs(R, 3*PieceValues, 9)
	out := cl.run(ctx, 1, ys, time.Minute, nil)
	for i, o := range out {
		if o.err != nil {
			t.Fatalf("round 1, member %d: %v", i, o.err)
		}
	}
	mu.Lock()
	round, global = 1, out[0].res.Avg
	mu.Unlock()

	a, b := cl.hosts[1].ID(), cl.hosts[2].ID()
	if err := cl.groups[0].Replace(1, b); err != nil {
		t.Fatalf("swap: %v", err)
	}
	if err := cl.groups[0].Replace(2, a); err != nil {
		t.Fatalf("the swap's second half: %v", err)
	}
	// Hosts 1 and 2 leave their old places and join in each other's.
	ids := []peer.ID{cl.hosts[0].ID(), b, a}
	var wg sync.WaitGroup
	for _, h := range []int{1, 2} {
		cl.groups[h].Close()
		self := 3 - h
		g, err := cl.svcs[h].Join(GroupConfig{Run: 7, Group: 2, Peers: ids, Self: self, Codec: c, MaxValues: 1 << 20,
			PriorRate: 100 << 20, Slack: 2 * time.Second, State: state})
		if err != nil {
			t.Fatal(err)
		}
		cl.groups[h] = g
		wg.Go(func() {
			got, vecs, err := g.FetchState(ctx)
			if err != nil {
				t.Errorf("host %d in place %d: %v", h, self, err)
				return
			}
			if got != 1 {
				t.Errorf("host %d fetched round %d, want 1", h, got)
			}
			mustEqual(t, fmt.Sprintf("host %d's fetched global", h), vecs[0], global)
		})
	}
	wg.Wait()
	// Place p's contribution is now made by the host in place p.
	byHost := []int{0, 2, 1} // host → place
	ysByHost := make([][]float32, R)
	for h, p := range byHost {
		ysByHost[h] = ys[p]
	}
	out = cl.run(ctx, 2, ysByHost, time.Minute, nil)
	avg, _, _ := Reference(c, ys)
	for h, o := range out {
		if o.err != nil {
			t.Fatalf("round 2, host %d: %v", h, o.err)
		}
		if len(o.res.Missing) != 0 {
			t.Errorf("round 2, host %d: missing %v", h, o.res.Missing)
		}
		mustEqual(t, fmt.Sprintf("round 2 host %d Avg", h), o.res.Avg, avg)
	}
	if n := cl.penalties.Load(); n != 0 {
		t.Errorf("%d penalties; swapped members are no offenders", n)
	}
}

// Asked for the state as of a round, the fetch takes it from the members that
// still hold that round, even when more of them have moved on.
func TestStateAsOfARoundComesFromTheMembersStillHoldingIt(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const R, v = 4, 3
	old, cur := randVecs(1, 2*PieceValues, 21)[0], randVecs(1, 2*PieceValues, 22)[0]
	cl := newCluster(t, R, spec(t, "int8/32"), func(i int, cfg *GroupConfig) {
		cfg.State = func(want uint64) (uint64, [][]float32) {
			if i == 2 && want == 5 { // the only one that still holds round 5
				return 5, [][]float32{append([]float32(nil), old...)}
			}
			return 6, [][]float32{append([]float32(nil), cur...)}
		}
	})
	round, vecs, err := cl.groups[v].FetchStateAt(ctx, 5)
	if err != nil {
		t.Fatal(err)
	}
	if round != 5 {
		t.Fatalf("fetched round %d, want 5", round)
	}
	mustEqual(t, "round 5's vector", vecs[0], old)
	round, vecs, err = cl.groups[v].FetchState(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if round != 6 {
		t.Fatalf("the latest: round %d, want 6", round)
	}
	mustEqual(t, "round 6's vector", vecs[0], cur)
}
