package worker

import (
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"

	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/clock"
)

// The replica dials run on goroutines of their own while the loop moves cells (a
// replaced node): they read the column the loop publishes, never the loop's grid, so
// under -race the two share no memory, and a dial after the moves sees the last of
// them.
func TestReplicaDialsDoNotRaceTheLoopMovingCells(t *testing.T) {
	const R, S, idx = 4, 2, 1
	var ids []peer.ID
	for range 2 * R * S {
		k, err := p2p.GenerateKey()
		if err != nil {
			t.Fatal(err)
		}
		id, err := peer.IDFromPrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	grid := make([][]peer.ID, R)
	for r := range grid {
		grid[r] = slices.Clone(ids[r*S : (r+1)*S])
	}
	w := &Worker{host: natTestHost(t, p2p.HostOptions{}), log: slog.New(slog.DiscardHandler), ctx: t.Context(), grid: grid, idx: idx}
	w.publishReplicas()
	var wg sync.WaitGroup
	wg.Go(func() {
		for range 10 {
			w.connectReplicas() // peers with no address: each dial fails at once
		}
	})
	for i := range 100 {
		w.moved(cellMoved{stage: i % S, replica: 1 + i%(R-1), id: ids[(i*7)%len(ids)]})
	}
	wg.Wait()
	var col []peer.ID
	for _, row := range w.grid {
		col = append(col, row[idx])
	}
	if got := *w.replicas.Load(); !slices.Equal(got, col) {
		t.Fatalf("published column %v, want the grid's %v", got, col)
	}
}

// A replica whose node is down, its addresses still listed, refuses every dial: it is
// left out of the outer step at once rather than dialled until its deadline, here
// made longer than the test may run.
func TestAReplicaWhoseNodeIsDownIsLeftOutWithoutWaitingForItsDeadline(t *testing.T) {
	w := &Worker{host: natTestHost(t, p2p.HostOptions{}), log: slog.New(slog.NewTextHandler(t.Output(), nil)), ctx: t.Context()}
	live, gone := natTestHost(t, p2p.HostOptions{}), natTestHost(t, p2p.HostOptions{})
	goneID, goneAddrs := gone.ID(), gone.Host.Addrs()
	if err := gone.Close(); err != nil {
		t.Fatal(err)
	}
	w.host.Peerstore().AddAddrs(goneID, goneAddrs, peerstore.PermanentAddrTTL)
	w.host.Peerstore().AddAddrs(live.ID(), live.Host.Addrs(), peerstore.PermanentAddrTTL)
	w.host.Peerstore().RecordLatency(goneID, 10*time.Minute)
	w.grid = [][]peer.ID{{w.host.ID()}, {goneID}, {live.ID()}}
	w.publishReplicas()

	done := make(chan struct{})
	go func() {
		defer close(done)
		w.connectReplicas()
	}()
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatalf("still dialling a replica whose node is down after a minute, as if until its deadline (%v)",
			clock.Deadline(0, w.host.Peerstore().LatencyEWMA(goneID), clock.Brief))
	}
	if !p2p.Linked(w.host.Network(), live.ID()) {
		t.Fatal("the live replica was not reached")
	}
	if p2p.Linked(w.host.Network(), goneID) {
		t.Fatal("linked to a replica whose node is closed")
	}
}
