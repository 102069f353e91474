package daemon

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
)

// inLoop is a request that runs f on the daemon's loop (tests look at the table so).
type inLoop func(d *Daemon, t *table)

func (f inLoop) do(d *Daemon, t *table) { f(d, t) }

// consistent reports what is wrong with t (as the loop holds it, between requests)
// and with the view the loop last published.
func consistent(d *Daemon, t *table) []string {
	var bad []string
	if n := len(t.runs) + len(t.pending); n > d.cfg.MaxStages {
		bad = append(bad, fmt.Sprintf("%d runs held or being accepted, max_stages %d", n, d.cfg.MaxStages))
	}
	for id := range t.runs {
		if _, ok := t.pending[id]; ok {
			bad = append(bad, fmt.Sprintf("run %d both held and pending", id))
		}
		if t.members[id] == nil {
			bad = append(bad, fmt.Sprintf("run %d held without members", id))
		}
		if _, ok := t.ended[id]; ok {
			bad = append(bad, fmt.Sprintf("run %d held and ended", id))
		}
	}
	for id := range t.members {
		if t.runs[id] == nil {
			bad = append(bad, fmt.Sprintf("members of run %d, which is not held", id))
		}
	}
	for id := range t.reserved {
		if t.runs[id] == nil {
			bad = append(bad, fmt.Sprintf("reservations of run %d, which is not held", id))
		}
	}
	for p := range t.tensorIn {
		if !t.isMember(p) {
			bad = append(bad, fmt.Sprintf("tensor streams tracked from %s, no member", p))
		}
	}
	if len(t.finished) > keptRuns {
		bad = append(bad, fmt.Sprintf("%d finished runs kept, want at most %d", len(t.finished), keptRuns))
	}
	v, want := d.view.Load(), t.view()
	if !maps.Equal(v.runs, want.runs) || v.pending != want.pending || !maps.Equal(v.members, want.members) || !maps.EqualFunc(v.ended, want.ended, time.Time.Equal) {
		bad = append(bad, "the published view is not the table's")
	}
	return bad
}

// Accepts (each plan sent several times at once), aborts and ends, control streams,
// tensor streams, heartbeats and status reads, all at once, leave the run table as
// one goroutine would: never more runs than max_stages, each plan taken once, the
// view the table's, and once every run has ended nothing held or counted.
func TestTheRunTableStaysConsistentUnderConcurrentAcceptsEndsAndControls(t *testing.T) {
	d := testDaemon(t)
	d.cfg.MaxStages = 3
	const runs, copies = 12, 3
	type launcher struct {
		id     peer.ID
		signed *p2p.Signed
	}
	ls := make([]launcher, runs)
	for i := range ls {
		k, _ := p2p.GenerateKey()
		id, _ := p2p.PeerID(k)
		ls[i] = launcher{id, signedPlanBy(t, d, k, uint64(100+i), time.Now().Add(time.Minute))}
	}
	var problems []string
	check := func() {
		d.ask(inLoop(func(d *Daemon, t *table) { problems = append(problems, consistent(d, t)...) }))
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	taken := map[uint64]int{}
	for i, l := range ls {
		run := uint64(100 + i)
		for range copies {
			wg.Go(func() {
				// Refused for want of a slot, a launcher tries again (as its staffing does)
				// until one of its copies is taken.
				for {
					err := d.accept(l.id, l.signed)
					if err == nil {
						mu.Lock()
						taken[run]++
						mu.Unlock()
						break
					}
					if !strings.Contains(err.Error(), "max_stages") {
						if !strings.Contains(err.Error(), "already accepted") {
							t.Errorf("run %d: %v", run, err)
						}
						return
					}
					time.Sleep(time.Millisecond)
				}
				// Its control streams, tensor streams and a status read while it is held.
				class, ok := d.ctlAdmit(l.id, "10.0.0.1")
				if !ok || class != ctlLauncher {
					t.Errorf("run %d: its launcher's control stream admitted %v as %v, want true as a launcher", run, ok, class)
				}
				if !d.isMember(l.id) || d.run(run) == nil {
					t.Errorf("run %d: held, but its launcher is no member or the run is not found", run)
				}
				_ = d.Snapshot()
				_ = d.Heartbeat()
				_ = d.frameLimit()
				d.noteHeartbeat(l.id, wire.Heartbeat{})
				if r := d.control(l.id, wire.Msg{Type: wire.MsgAbort, Run: run, Reason: "test"}); !r.OK {
					t.Errorf("run %d: abort: %s", run, r.Error)
				}
				d.ctlRelease(l.id, "10.0.0.1", class)
			})
		}
	}
	// Strangers' control streams and status reads meanwhile.
	stop := make(chan struct{})
	var others sync.WaitGroup
	for g := range 3 {
		others.Go(func() {
			ip := fmt.Sprintf("10.0.1.%d", g)
			for {
				select {
				case <-stop:
					return
				default:
				}
				if class, ok := d.ctlAdmit(peer.ID(fmt.Sprint("stranger", g)), ip); ok {
					d.ctlRelease(peer.ID(fmt.Sprint("stranger", g)), ip, class)
				}
				_ = d.control(peer.ID(fmt.Sprint("stranger", g)), wire.Msg{Type: wire.MsgOffer})
				_ = d.Snapshot()
				check()
			}
		})
	}
	wg.Wait()
	deadline := time.Now().Add(60 * time.Second)
	for len(d.view.Load().runs) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("runs still held a minute after every one was aborted: %v", slices.Collect(maps.Keys(d.view.Load().runs)))
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	others.Wait()
	check()
	for i := range runs {
		if n := taken[uint64(100+i)]; n != 1 {
			t.Errorf("run %d taken %d times, want once", 100+i, n)
		}
	}
	d.ask(inLoop(func(d *Daemon, t *table) {
		if len(t.runs)+len(t.pending)+len(t.members)+len(t.reserved)+len(t.tensorIn)+len(t.ctlOpen)+len(t.ctlIP)+len(t.heard) != 0 {
			problems = append(problems, fmt.Sprintf("after every run ended: runs %d pending %d members %d reserved %d tensorIn %d ctlOpen %v ctlIP %v heard %d",
				len(t.runs), len(t.pending), len(t.members), len(t.reserved), len(t.tensorIn), t.ctlOpen, t.ctlIP, len(t.heard)))
		}
		if len(t.ended) != runs || len(t.finished) != keptRuns {
			problems = append(problems, fmt.Sprintf("after %d runs ended: %d remembered as ended, %d kept for the status page; want %d and %d",
				runs, len(t.ended), len(t.finished), runs, keptRuns))
		}
	}))
	for _, p := range slices.Compact(problems) {
		t.Error(p)
	}
}
