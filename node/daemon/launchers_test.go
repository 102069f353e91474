package daemon

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/ckpt"
	"github.com/pipeswarm/pipeswarm/node/wire"
)

// A restarted node dials each launcher once, the latest run's first, with every address
// its runs recorded: an earlier launch by the same key, at a port now dead, must not
// hide the launcher of the run the node was in.
func TestLauncherTargetsMergeRunsOfOneLauncherLatestFirst(t *testing.T) {
	dir := t.TempDir()
	const a = "12D3KooWLRPJAA5o6Gp5PvTRWjWMDbfcmKXnu2Zh3ztz6UYFXmG9"
	const b = "12D3KooWRpXgfSPBJLhavAgZQADKH27s33oT2bHNDKEtPdWVHaiB"
	now := time.Now()
	write := func(run, launcher, addr string, age time.Duration) {
		d := filepath.Join(dir, run)
		if err := writeLauncherRecord(d, &wire.Plan{Launcher: launcher, LauncherAddrs: []string{addr}}); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(filepath.Join(d, ckpt.LauncherFile), now.Add(-age), now.Add(-age)); err != nil {
			t.Fatal(err)
		}
	}
	// Run directories sort by ID, not by age: the earlier run of launcher a sorts first.
	write("00aa", a, "/ip4/127.0.0.1/tcp/1001", time.Hour)
	write("00bb", b, "/ip4/127.0.0.1/tcp/2001", 30*time.Minute)
	write("ffaa", a, "/ip4/127.0.0.1/tcp/1002", time.Minute)
	write("ffcc", b, "/ip4/127.0.0.1/tcp/2002", 48*time.Hour) // too old to dial
	got := launcherTargets(filepath.Join(dir, "*"), now)
	if len(got) != 2 || got[0].id.String() != a || got[1].id.String() != b {
		t.Fatalf("targets %+v, want launcher a (latest run) then b", got)
	}
	if want := []string{"/ip4/127.0.0.1/tcp/1002", "/ip4/127.0.0.1/tcp/1001"}; !slices.Equal(got[0].addrs, want) {
		t.Errorf("launcher a's addresses %v, want %v (the latest run's first)", got[0].addrs, want)
	}
	if filepath.Base(got[0].runDir) != "ffaa" || !slices.Equal(got[1].addrs, []string{"/ip4/127.0.0.1/tcp/2001"}) {
		t.Errorf("targets %+v: want a's latest run ffaa, b without its stale record", got)
	}
}
