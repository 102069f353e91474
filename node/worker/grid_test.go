package worker

import (
	"log/slog"
	"slices"
	"sync"
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/p2p"
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
