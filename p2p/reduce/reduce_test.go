package reduce

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	mocknet "github.com/libp2p/go-libp2p/p2p/net/mock"
	"github.com/pipeswarm/pipeswarm/p2p/codec"
	"github.com/pipeswarm/pipeswarm/p2p/traffic"
)

func spec(t testing.TB, s string) codec.Spec {
	t.Helper()
	c, err := codec.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func testLog() *slog.Logger {
	if os.Getenv("REDUCE_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// cluster is R members of one group, each on its own host of a mock
// network.
type cluster struct {
	t         testing.TB
	mn        mocknet.Mocknet
	hosts     []host.Host
	svcs      []*Service
	groups    []*Group
	meters    []*traffic.Meter
	penalties atomic.Int64
}

func newCluster(t testing.TB, R int, c codec.Spec, tweak func(i int, cfg *GroupConfig)) *cluster {
	t.Helper()
	mn, err := mocknet.FullMeshConnected(R)
	if err != nil {
		t.Fatal(err)
	}
	cl := &cluster{t: t, mn: mn, hosts: mn.Hosts()}
	ids := make([]peer.ID, R)
	for i, h := range cl.hosts {
		ids[i] = h.ID()
	}
	for i, h := range cl.hosts {
		m := &traffic.Meter{}
		cl.meters = append(cl.meters, m)
		svc := NewService(h, testLog().With("member", i), func(p peer.ID, err error) {
			cl.penalties.Add(1)
			t.Logf("member %d penalises %s: %v", i, p, err)
		}, WithMeter(m))
		h.SetStreamHandler(Proto, svc.HandleStream)
		cfg := GroupConfig{Run: 7, Group: 2, Peers: ids, Self: i, Codec: c, MaxValues: 1 << 20, PriorRate: 100 << 20, Slack: 2 * time.Second}
		if tweak != nil {
			tweak(i, &cfg)
		}
		g, err := svc.Join(cfg)
		if err != nil {
			t.Fatal(err)
		}
		cl.svcs = append(cl.svcs, svc)
		cl.groups = append(cl.groups, g)
	}
	t.Cleanup(func() {
		for _, s := range cl.svcs {
			s.Close()
		}
		mn.Close()
	})
	return cl
}

// kill closes member i's host: its connections close, as when the
// process dies.
func (cl *cluster) kill(i int) {
	cl.svcs[i].Close()
	cl.hosts[i].Close()
}

type outcome struct {
	res *Result
	err error
}

// run calls AllReduce on the members in who (all if nil) concurrently.
func (cl *cluster) run(ctx context.Context, round uint64, ys [][]float32, arrive time.Duration, who []int) []outcome {
	if who == nil {
		for i := range cl.groups {
			who = append(who, i)
		}
	}
	out := make([]outcome, len(cl.groups))
	var wg sync.WaitGroup
	for _, i := range who {
		wg.Go(func() {
			res, err := cl.groups[i].AllReduce(ctx, round, ys[i], arrive)
			out[i] = outcome{res, err}
		})
	}
	wg.Wait()
	return out
}

func randVecs(R, n int, seed uint64) [][]float32 {
	rng := rand.New(rand.NewPCG(seed, 99))
	ys := make([][]float32, R)
	for r := range ys {
		ys[r] = make([]float32, n)
		for i := range ys[r] {
			ys[r][i] = float32(rng.NormFloat64()) * float32(1+r)
		}
	}
	return ys
}

func sameBits(a, b []float32) int {
	if len(a) != len(b) {
		return -2
	}
	for i := range a {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) {
			return i
		}
	}
	return -1
}

func mustEqual(t testing.TB, what string, got, want []float32) {
	t.Helper()
	switch i := sameBits(got, want); {
	case i == -2:
		t.Fatalf("%s: %d values, want %d", what, len(got), len(want))
	case i >= 0:
		t.Fatalf("%s[%d] = %v, want %v (bit for bit)", what, i, got[i], want[i])
	}
}

var testCodecs = []string{"fp32", "bf16", "int8/32", "int8/32+zstd", "bf16+zstd"}

// With every member present, each member's Avg is bit-identical to
// Reference's, its Own is Reference's own, and its bytes sent are
// Reference's count, for 1 to 8 members and every codec.
func TestAllPresentMatchesReference(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for R := 1; R <= 8; R++ {
		for _, cs := range testCodecs {
			t.Run(fmt.Sprintf("R%d/%s", R, cs), func(t *testing.T) {
				c := spec(t, cs)
				n := 2*PieceValues + 1001 // several pieces per chunk when R is small
				if R > 4 {
					n = PieceValues/2 + 7
				}
				cl := newCluster(t, R, c, nil)
				ys := randVecs(R, n, uint64(R))
				avg, own, sent := Reference(c, ys)
				for round := uint64(1); round <= 2; round++ {
					out := cl.run(ctx, round, ys, 10*time.Second, nil)
					for i, o := range out {
						if o.err != nil {
							t.Fatalf("member %d: %v", i, o.err)
						}
						mustEqual(t, fmt.Sprintf("member %d Avg", i), o.res.Avg, avg)
						mustEqual(t, fmt.Sprintf("member %d Own", i), o.res.Own, own[i])
						if o.res.Sent != sent[i] {
							t.Errorf("member %d sent %d bytes, Reference says %d", i, o.res.Sent, sent[i])
						}
						if len(o.res.Missing) != 0 {
							t.Errorf("member %d: missing %v", i, o.res.Missing)
						}
						for ci, ch := range o.res.Chunks {
							if ch.Owner != ci || ch.Contributors != bit(R)-1 && R < 64 {
								t.Errorf("member %d chunk %d: owner %d contributors %#x", i, ci, ch.Owner, ch.Contributors)
							}
						}
					}
				}
				if p := cl.penalties.Load(); p != 0 {
					t.Errorf("%d penalties in a fault-free run", p)
				}
			})
		}
	}
}

// expectChunk is chunk ch's average over the members in mask, computed
// directly: each contribution as its owner decodes it, summed in
// ascending member order, divided, and sent through the codec.
func expectChunk(t testing.TB, c codec.Spec, ys [][]float32, ch Range, mask uint64) []float32 {
	t.Helper()
	out := make([]float32, ch.Len())
	plen := pieceLen(align(c))
	for k := range numPieces(ch.Len(), plen) {
		pr := pieceRange(ch.Len(), plen, k)
		sum := make([]float32, pr.Len())
		q := make([]float32, pr.Len())
		for _, m := range members(mask) {
			if _, err := roundTrip(c, q, ys[m][ch.Lo+pr.Lo:ch.Lo+pr.Hi]); err != nil {
				t.Fatal(err)
			}
			for i := range sum {
				sum[i] += q[i]
			}
		}
		for i := range sum {
			sum[i] /= float32(len(members(mask)))
		}
		if _, err := roundTrip(c, out[pr.Lo:pr.Hi], sum); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// checkSurvivors checks that every member in live finished, that they
// agree bit for bit, and that each chunk is the average over the
// contributors its result names. It returns member live[0]'s result.
func checkSurvivors(t *testing.T, c codec.Spec, ys [][]float32, out []outcome, live []int) *Result {
	t.Helper()
	first := out[live[0]]
	for _, i := range live {
		if out[i].err != nil {
			t.Fatalf("member %d: %v", i, out[i].err)
		}
		mustEqual(t, fmt.Sprintf("member %d Avg vs member %d", i, live[0]), out[i].res.Avg, first.res.Avg)
		for ci, ch := range out[i].res.Chunks {
			if ch != first.res.Chunks[ci] {
				t.Errorf("member %d chunk %d: %+v, member %d has %+v", i, ci, ch, live[0], first.res.Chunks[ci])
			}
		}
	}
	for ci, ch := range first.res.Chunks {
		mustEqual(t, fmt.Sprintf("chunk %d (contributors %#x)", ci, ch.Contributors), first.res.Avg[ch.Lo:ch.Hi], expectChunk(t, c, ys, ch.Range, ch.Contributors))
	}
	return first.res
}

// rawSend writes frames from host h to peer p on a stream of its own, as
// a member that runs no Group would.
func rawSend(t testing.TB, ctx context.Context, h host.Host, p peer.ID, frames ...outFrame) {
	t.Helper()
	st, err := h.NewStream(ctx, p, Proto)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range frames {
		if err := writeFrame(st, &f.hdr, f.payload); err != nil {
			t.Fatal(err)
		}
	}
}

// contribFrames are member y's contribution frames to chunk ci of round.
func contribFrames(c codec.Spec, R int, round uint64, y []float32, ci int) []outFrame {
	ch := chunkRange(len(y), R, align(c), ci)
	plen := pieceLen(align(c))
	var fs []outFrame
	for k := range numPieces(ch.Len(), plen) {
		pr := pieceRange(ch.Len(), plen, k)
		enc := c.Encode(nil, y[ch.Lo+pr.Lo:ch.Lo+pr.Hi])
		fs = append(fs, outFrame{hdr: header{typ: typeContrib, codec: c, run: 7, group: 2, round: round, n: uint32(len(y)), index: uint32(ci), offset: uint32(pr.Lo), count: uint32(pr.Len())}, payload: enc})
	}
	return fs
}

func others(R int, gone ...int) []int {
	var out []int
	for i := range R {
		skip := false
		for _, g := range gone {
			skip = skip || i == g
		}
		if !skip {
			out = append(out, i)
		}
	}
	return out
}

// A member dropped in phase 1 — dead before it sends, or after it sent
// its contribution to only some owners — does not stop the others: they
// agree bit for bit, each chunk is the average over its actual
// contributors, the dead member's chunk goes to the next member in ring
// order, and the dead member is out of the next round.
func TestPhase1DropFinishes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := spec(t, "int8/32")
	for _, R := range []int{2, 3, 5, 8} {
		for _, mode := range []string{"before", "partial"} {
			t.Run(fmt.Sprintf("R%d/%s", R, mode), func(t *testing.T) {
				cl := newCluster(t, R, c, nil)
				v := R / 2
				n := 3*PieceValues + 17
				ys := randVecs(R, n, uint64(10*R))
				live := others(R, v)
				switch mode {
				case "before":
					cl.kill(v)
				case "partial":
					// v runs no group: it sends contributions to the
					// owners of the chunks before its own, then dies.
					cl.groups[v].Close()
					for ci := range v {
						rawSend(t, ctx, cl.hosts[v], cl.hosts[ci].ID(), contribFrames(c, R, 1, ys[v], ci)...)
					}
				}
				start := time.Now()
				done := make(chan []outcome)
				go func() { done <- cl.run(ctx, 1, ys, time.Minute, live) }()
				if mode == "partial" {
					cl.kill(v)
				}
				out := <-done
				if d := time.Since(start); d > 20*time.Second {
					t.Errorf("took %v with a dead member", d)
				}
				res := checkSurvivors(t, c, ys, out, live)
				if ch := res.Chunks[v]; ch.Owner != (v+1)%R || ch.Contributors&bit(v) != 0 {
					t.Errorf("dead member's chunk: owner %d contributors %#x, want owner %d without %d", ch.Owner, ch.Contributors, (v+1)%R, v)
				}
				for ci := v + 1; ci < R; ci++ {
					if res.Chunks[ci].Contributors&bit(v) != 0 {
						t.Errorf("chunk %d counts member %d, which never sent to it", ci, v)
					}
				}
				if len(res.Missing) != 1 || res.Missing[0] != v {
					t.Errorf("missing %v, want [%d]", res.Missing, v)
				}
				// The next round runs without it and without waiting.
				out = cl.run(ctx, 2, ys, time.Minute, live)
				res = checkSurvivors(t, c, ys, out, live)
				if res.Duration > 10*time.Second {
					t.Errorf("round 2 took %v", res.Duration)
				}
			})
		}
	}
}

// An owner that dies after receiving every contribution to its chunk, but
// before it sends the result, has its chunk taken over by the next member
// in ring order, to which the others re-send their contributions; the
// survivors agree bit for bit.
func TestPhase2OwnerDropReassigns(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, R := range []int{2, 3, 5, 8} {
		for _, cs := range []string{"fp32", "int8/32+zstd"} {
			t.Run(fmt.Sprintf("R%d/%s", R, cs), func(t *testing.T) {
				c := spec(t, cs)
				v := R - 1
				stopped := make(chan struct{})
				var once sync.Once
				cl := newCluster(t, R, c, nil)
				cl.groups[v].hookPublish = func(round uint64, chunk int) bool {
					once.Do(func() { close(stopped) })
					return false
				}
				n := 2*PieceValues + 5
				ys := randVecs(R, n, uint64(R))
				live := others(R, v)
				vctx, vcancel := context.WithCancel(ctx)
				defer vcancel()
				go cl.groups[v].AllReduce(vctx, 1, ys[v], time.Minute)
				done := make(chan []outcome)
				go func() { done <- cl.run(ctx, 1, ys, time.Minute, live) }()
				select {
				case <-stopped:
				case <-ctx.Done():
					t.Fatal("owner never had its chunk complete")
				}
				cl.hosts[v].Close()
				out := <-done
				res := checkSurvivors(t, c, ys, out, live)
				ch := res.Chunks[v]
				if ch.Owner != (v+1)%R {
					t.Errorf("dead owner's chunk taken by %d, want %d", ch.Owner, (v+1)%R)
				}
				if want := bit(R-1) - 1; ch.Contributors != want {
					t.Errorf("dead owner's chunk: contributors %#x, want the survivors %#x", ch.Contributors, want)
				}
			})
		}
	}
}

// A member that never starts the round, its connection up, is waited for
// only the arrive time; the others finish without it and run the next
// round without waiting for it at all. So are members that stop sending
// part-way through their contribution.
func TestStalledMemberIsExcluded(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := spec(t, "bf16")
	for _, mode := range []string{"never-starts", "stops-mid-way"} {
		t.Run(mode, func(t *testing.T) {
			const R, v = 4, 2
			cl := newCluster(t, R, c, nil)
			n := 8 * PieceValues // two pieces per chunk
			ys := randVecs(R, n, 5)
			live := others(R, v)
			arrive := 300 * time.Millisecond
			if mode == "stops-mid-way" {
				// v sends member 0 the first piece of its contribution
				// and nothing more; the connection stays up.
				cl.groups[v].Close()
				rawSend(t, ctx, cl.hosts[v], cl.hosts[0].ID(), contribFrames(c, R, 1, ys[v], 0)[0])
			}
			start := time.Now()
			out := cl.run(ctx, 1, ys, arrive, live)
			elapsed := time.Since(start)
			res := checkSurvivors(t, c, ys, out, live)
			if len(res.Missing) != 1 || res.Missing[0] != v {
				t.Errorf("missing %v, want [%d]", res.Missing, v)
			}
			// arrive, plus the deadline rule's slack and round trips (which a
			// loaded machine measures long), and margin: far below a minute.
			if elapsed > 15*time.Second {
				t.Errorf("round with a stalled member took %v", elapsed)
			}
			start = time.Now()
			out = cl.run(ctx, 2, ys, time.Minute, live)
			if d := time.Since(start); d > 15*time.Second {
				t.Errorf("next round took %v: it waited for the excluded member", d)
			}
			res = checkSurvivors(t, c, ys, out, live)
			if res.Chunks[v].Owner != v+1 {
				t.Errorf("excluded member's chunk owned by %d", res.Chunks[v].Owner)
			}
		})
	}
}

// A member that skips a round and then calls AllReduce for it is told it
// is behind; FetchState gives it exactly what a live member's State
// serves; it then takes part in the next round, which is fault-free again
// and so bit-identical to Reference.
func TestBehindMemberFetchesStateAndRejoins(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const R, v = 3, 2
	c := spec(t, "int8/32+zstd")
	type state struct {
		mu    sync.Mutex
		round uint64
		vecs  [][]float32
	}
	states := make([]*state, R)
	cl := newCluster(t, R, c, func(i int, cfg *GroupConfig) {
		s := &state{}
		states[i] = s
		cfg.State = func(uint64) (uint64, [][]float32) {
			s.mu.Lock()
			defer s.mu.Unlock()
			return s.round, s.vecs
		}
	})
	n := PieceValues + 3 // a state vector of two pieces
	ys := randVecs(R, n, 3)
	record := func(out []outcome, who []int) {
		for _, i := range who {
			if out[i].err != nil {
				t.Fatalf("member %d: %v", i, out[i].err)
			}
			s := states[i]
			s.mu.Lock()
			s.round = out[i].res.Round
			momentum := make([]float32, 5)
			momentum[0] = float32(out[i].res.Round)
			s.vecs = [][]float32{out[i].res.Avg, momentum, {}}
			s.mu.Unlock()
		}
	}
	record(cl.run(ctx, 1, ys, time.Minute, nil), others(R))

	live := others(R, v)
	record(cl.run(ctx, 2, ys, 200*time.Millisecond, live), live)

	_, err := cl.groups[v].AllReduce(ctx, 2, ys[v], time.Minute)
	if !errors.Is(err, ErrBehind) {
		t.Fatalf("late member's AllReduce: %v, want ErrBehind", err)
	}
	if _, err := cl.groups[v].AllReduce(ctx, 3, ys[v], time.Minute); !errors.Is(err, ErrBehind) {
		t.Fatalf("AllReduce before FetchState: %v, want ErrBehind", err)
	}
	round, vecs, err := cl.groups[v].FetchState(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if round != 2 || len(vecs) != 3 {
		t.Fatalf("fetched round %d with %d vectors, want round 2 with 3", round, len(vecs))
	}
	want := states[(v+1)%R]
	for i := range vecs {
		mustEqual(t, fmt.Sprintf("fetched vector %d", i), vecs[i], want.vecs[i])
	}

	out := cl.run(ctx, 3, ys, time.Minute, nil)
	avg, own, sent := Reference(c, ys)
	for i, o := range out {
		if o.err != nil {
			t.Fatalf("round 3, member %d: %v", i, o.err)
		}
		mustEqual(t, fmt.Sprintf("round 3 member %d Avg", i), o.res.Avg, avg)
		mustEqual(t, fmt.Sprintf("round 3 member %d Own", i), o.res.Own, own[i])
		if o.res.Sent != sent[i] || len(o.res.Missing) != 0 {
			t.Errorf("round 3 member %d: sent %d (want %d), missing %v", i, o.res.Sent, sent[i], o.res.Missing)
		}
	}
}

// A member's node dies and another peer takes its place: the others Replace it, the
// newcomer fetches the state and is counted in the next round, which matches the
// reference of all three.
func TestReplacedMemberIsTakenOverByANewPeer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const R, v = 3, 2
	c := spec(t, "int8/32")
	var mu sync.Mutex
	var round uint64
	var global []float32
	state := func(uint64) (uint64, [][]float32) {
		mu.Lock()
		defer mu.Unlock()
		return round, [][]float32{global}
	}
	cl := newCluster(t, R, c, func(i int, cfg *GroupConfig) { cfg.State = state })
	ys := randVecs(R, 1000, 5)
	for i, o := range cl.run(ctx, 1, ys, time.Minute, nil) {
		if o.err != nil {
			t.Fatalf("round 1, member %d: %v", i, o.err)
		}
	}
	cl.kill(v)
	live := others(R, v)
	out := cl.run(ctx, 2, ys, 200*time.Millisecond, live)
	for _, i := range live {
		if out[i].err != nil {
			t.Fatalf("round 2, member %d: %v", i, out[i].err)
		}
	}
	mu.Lock()
	round, global = 2, out[0].res.Avg
	mu.Unlock()

	h, err := cl.mn.GenPeer()
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range live {
		if _, err := cl.mn.LinkPeers(h.ID(), cl.hosts[i].ID()); err != nil {
			t.Fatal(err)
		}
		if _, err := cl.mn.ConnectPeers(h.ID(), cl.hosts[i].ID()); err != nil {
			t.Fatal(err)
		}
	}
	svc := NewService(h, testLog().With("member", "new"), func(p peer.ID, err error) {
		cl.penalties.Add(1)
		t.Logf("the newcomer penalises %s: %v", p, err)
	})
	h.SetStreamHandler(Proto, svc.HandleStream)
	t.Cleanup(func() { svc.Close() })
	ids := []peer.ID{cl.hosts[0].ID(), cl.hosts[1].ID(), h.ID()}
	g, err := svc.Join(GroupConfig{Run: 7, Group: 2, Peers: ids, Self: v, Codec: c, MaxValues: 1 << 20, PriorRate: 100 << 20, Slack: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range live {
		if err := cl.groups[i].Replace(v, h.ID()); err != nil {
			t.Fatalf("member %d: Replace: %v", i, err)
		}
	}
	if err := cl.groups[0].Replace(0, h.ID()); err == nil {
		t.Error("Replace of this member's own place: no error")
	}
	if err := cl.groups[0].Replace(1, cl.hosts[0].ID()); err == nil {
		t.Error("Replace giving this member's peer another place: no error")
	}
	got, vecs, err := g.FetchState(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got != 2 {
		t.Fatalf("the newcomer fetched round %d, want 2", got)
	}
	mustEqual(t, "fetched global", vecs[0], global)
	cl.groups[v] = g
	out = cl.run(ctx, 3, ys, time.Minute, nil)
	avg, _, _ := Reference(c, ys)
	for i, o := range out {
		if o.err != nil {
			t.Fatalf("round 3, member %d: %v", i, o.err)
		}
		if len(o.res.Missing) != 0 {
			t.Errorf("round 3, member %d: missing %v; the newcomer should count", i, o.res.Missing)
		}
		mustEqual(t, fmt.Sprintf("round 3 member %d Avg", i), o.res.Avg, avg)
	}
	if n := cl.penalties.Load(); n != 0 {
		t.Errorf("%d penalties; a newcomer in a replaced place is no offender", n)
	}
}

// Every frame a member writes is counted once where it is written and once where it
// is read: once a round's frames have all landed, what all members sent equals what
// they all received, and each member's meter holds at least the data frames its
// round reports sending (Result.Sent; the meter counts control frames too).
func TestMetersCountEveryFrameOnBothEnds(t *testing.T) {
	const R = 3
	cl := newCluster(t, R, spec(t, "int8/32"), nil)
	ys := randVecs(R, 200_000, 5)
	out := cl.run(t.Context(), 1, ys, 10*time.Second, nil)
	for i, o := range out {
		if o.err != nil {
			t.Fatalf("member %d: %v", i, o.err)
		}
	}
	// Frames are written by a queue of their own: the last of a round may still be
	// queued or on their way when AllReduce returns.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var in, sent traffic.Counts
		short := -1
		for i, m := range cl.meters {
			c := m.Counts()
			in.FramesIn += c.FramesIn
			in.BytesIn += c.BytesIn
			sent.FramesOut += c.FramesOut
			sent.BytesOut += c.BytesOut
			if c.BytesOut < uint64(out[i].res.Sent) {
				short = i
			}
		}
		if short < 0 && in.FramesIn == sent.FramesOut && in.BytesIn == sent.BytesOut && in.FramesIn > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("members received %d frames, %d bytes; sent %d frames, %d bytes; member %d's meter below its Result.Sent",
				in.FramesIn, in.BytesIn, sent.FramesOut, sent.BytesOut, short)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A frame for a run the host does not hold (WithRuns) is refused at its header
// and counts against its sender: a peer cannot make the host read and drop a
// large payload at will. A frame for a group of a held run not joined yet is
// still skipped without penalty.
func TestAFrameForARunNotHeldIsRefusedAtItsHeader(t *testing.T) {
	mn, err := mocknet.FullMeshConnected(2)
	if err != nil {
		t.Fatal(err)
	}
	defer mn.Close()
	hs := mn.Hosts()
	var penalties []error
	var mu sync.Mutex
	svc := NewService(hs[0], testLog(), func(p peer.ID, err error) {
		mu.Lock()
		penalties = append(penalties, err)
		mu.Unlock()
	}, WithRuns(func(run uint64) bool { return run == 7 }))
	defer svc.Close()
	hs[0].SetStreamHandler(Proto, svc.HandleStream)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	send := func(run uint64, plen uint32) network.Stream {
		s, err := hs[1].NewStream(ctx, hs[0].ID(), Proto)
		if err != nil {
			t.Fatal(err)
		}
		h := header{typ: typeStateReq, run: run, group: 3, plen: plen}
		var b [headerLen]byte
		h.put(&b)
		if _, err := s.Write(b[:]); err != nil {
			t.Fatal(err)
		}
		return s
	}
	// A held run's group not joined yet: a small payload is read and dropped.
	s := send(7, 4)
	_, _ = s.Write(make([]byte, 4))
	// Another run's, declaring 64 MiB and sending none of it: refused at once.
	s2 := send(9, 64<<20)
	_ = s2.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := s2.Read(make([]byte, 1)); err == nil || strings.Contains(err.Error(), "deadline") {
		t.Fatalf("frame for a run not held: %v, want the stream reset at its header", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(penalties) != 1 || !errors.Is(penalties[0], ErrBadFrame) || !strings.Contains(penalties[0].Error(), "does not hold") {
		t.Fatalf("penalties %v, want one for the frame of a run not held", penalties)
	}
	s.Close()
}

// A member that hangs, in either phase, with its connections up, and that another
// party drops (Drop) from the live members' groups while they wait for it: the round
// in progress finishes without it at once, not at its deadline (a minute here), and
// the next round does not wait for it either. A Drop naming a peer that no longer
// holds the place changes nothing.
func TestADroppedMemberIsGivenUpInTheRoundInProgress(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := spec(t, "bf16")
	for _, mode := range []string{"never-starts", "stops-mid-way"} {
		t.Run(mode, func(t *testing.T) {
			const R, v = 3, 2
			cl := newCluster(t, R, c, nil)
			n := 8 * PieceValues
			ys := randVecs(R, n, 11)
			live := others(R, v)
			if mode == "stops-mid-way" {
				cl.groups[v].Close()
				rawSend(t, ctx, cl.hosts[v], cl.hosts[0].ID(), contribFrames(c, R, 1, ys[v], 0)[0])
			}
			if cl.groups[0].Drop(v, cl.hosts[0].ID(), errors.New("not its place")) {
				t.Error("Drop of a peer that does not hold the place: reported dropped")
			}
			const dropAfter = 300 * time.Millisecond
			time.AfterFunc(dropAfter, func() {
				for _, i := range live {
					if !cl.groups[i].Drop(v, cl.hosts[v].ID(), errors.New("its pipeline is broken")) {
						t.Errorf("member %d: Drop(%d) reported the place held by another peer", i, v)
					}
				}
			})
			start := time.Now()
			out := cl.run(ctx, 1, ys, time.Minute, live)
			elapsed := time.Since(start)
			res := checkSurvivors(t, c, ys, out, live)
			if len(res.Missing) != 1 || res.Missing[0] != v {
				t.Errorf("missing %v, want [%d]", res.Missing, v)
			}
			t.Logf("round done %v after it started, dropped after %v", elapsed.Round(time.Millisecond), dropAfter)
			if elapsed > 10*time.Second {
				t.Errorf("round took %v: it waited for the dropped member's deadline", elapsed)
			}
			start = time.Now()
			out = cl.run(ctx, 2, ys, time.Minute, live)
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("next round took %v: it waited for the dropped member", d)
			}
			checkSurvivors(t, c, ys, out, live)
		})
	}
}

// A member fetches state a round old (served just before the others finished the
// next round without it): the others count it in from the round after the one they
// finished, so its next round fails with ErrBehind instead of running alone, and
// once it fetches the newer state every member's round matches the reference.
func TestAMemberWhoseFetchedStateIsARoundOldIsBehind(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const R, v = 3, 2
	c := spec(t, "int8/32+zstd")
	var mu sync.Mutex
	served := map[int]struct {
		round uint64
		vecs  [][]float32
	}{}
	cl := newCluster(t, R, c, func(i int, cfg *GroupConfig) {
		cfg.State = func(uint64) (uint64, [][]float32) {
			mu.Lock()
			defer mu.Unlock()
			return served[i].round, served[i].vecs
		}
	})
	ys := randVecs(R, PieceValues+3, 5)
	serve := func(out []outcome, who []int) {
		mu.Lock()
		defer mu.Unlock()
		for _, i := range who {
			if out[i].err != nil {
				t.Fatalf("round of member %d: %v", i, out[i].err)
			}
			served[i] = struct {
				round uint64
				vecs  [][]float32
			}{out[i].res.Round, [][]float32{out[i].res.Avg, {float32(out[i].res.Round)}}}
		}
	}
	serve(cl.run(ctx, 1, ys, time.Minute, nil), others(R))
	live := others(R, v)
	serve(cl.run(ctx, 2, ys, 200*time.Millisecond, live), live)
	if _, err := cl.groups[v].AllReduce(ctx, 2, ys[v], time.Minute); !errors.Is(err, ErrBehind) {
		t.Fatalf("late member's round 2: %v, want ErrBehind", err)
	}
	// The others finish round 3 without it but still serve round 2's state.
	out3 := cl.run(ctx, 3, ys, 200*time.Millisecond, live)
	round, _, err := cl.groups[v].FetchState(ctx)
	if err != nil || round != 2 {
		t.Fatalf("FetchState: round %d, %v; want round 2", round, err)
	}
	serve(out3, live)
	// The others start round 4 counting it in; its frames of round 3 are then a
	// member's late ones, which they do not answer.
	var wg sync.WaitGroup
	out4 := make([]outcome, R)
	for _, i := range live {
		wg.Go(func() {
			res, err := cl.groups[i].AllReduce(ctx, 4, ys[i], time.Minute)
			out4[i] = outcome{res, err}
		})
	}
	time.Sleep(100 * time.Millisecond)
	if res, err := cl.groups[v].AllReduce(ctx, 3, ys[v], 2*time.Second); !errors.Is(err, ErrBehind) {
		var missing []int
		if res != nil {
			missing = res.Missing
		}
		t.Fatalf("round 3 after fetching round 2's state, which the others finished without it: missing %v, err %v; want ErrBehind", missing, err)
	}

	if round, _, err := cl.groups[v].FetchState(ctx); err != nil || round != 3 {
		t.Fatalf("second FetchState: round %d, %v; want round 3", round, err)
	}
	res, err := cl.groups[v].AllReduce(ctx, 4, ys[v], time.Minute)
	out4[v] = outcome{res, err}
	wg.Wait()
	avg, _, _ := Reference(c, ys)
	for i, o := range out4 {
		if o.err != nil {
			t.Fatalf("round 4, member %d: %v", i, o.err)
		}
		mustEqual(t, fmt.Sprintf("round 4 member %d Avg", i), o.res.Avg, avg)
	}
}
