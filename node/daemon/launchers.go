package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/pipeswarm/pipeswarm/node/ckpt"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
)

type launcherRecord struct {
	Launcher string   `json:"launcher"`
	Addrs    []string `json:"addrs"`
	// ResumedFrom is the run (hex) whose checkpoints this run started from: pruning
	// keeps it while this run is kept.
	ResumedFrom string `json:"resumed_from,omitempty"`
}

func writeLauncherRecord(runDir string, plan *wire.Plan) error {
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		return err
	}
	rec := launcherRecord{Launcher: plan.Launcher, Addrs: plan.LauncherAddrs}
	if plan.Resume != nil {
		rec.ResumedFrom = fmt.Sprintf("%016x", plan.Resume.Run)
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	tmp := filepath.Join(runDir, "."+ckpt.LauncherFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(runDir, ckpt.LauncherFile))
}

// relaunchWindow is how recent a run must be for a restarted node to dial its
// launcher: long enough for a run that is still going, short enough not to knock on
// the doors of launchers long gone.
const relaunchWindow = 24 * time.Hour

// redialLaunchers connects to the launchers of the runs this node held lately (their
// records written in the last relaunchWindow), so that a node restarted after a crash
// or a stop is seen again by a launcher that wants its stage back, whatever port
// either comes back on. The latest run's launcher is dialled first; a launcher that
// ran several of them is dialled once with every address any of them recorded (an
// earlier launch by the same key listened elsewhere). Launchers not reached are tried
// again a few times over the first minute: one may be between two parts of a run.
func (d *Daemon) redialLaunchers(ctx context.Context) {
	targets := launcherTargets(d.dir.RunDir("*"), time.Now())
	for _, wait := range []time.Duration{0, 2 * time.Second, 5 * time.Second, 10 * time.Second, 20 * time.Second, 30 * time.Second} {
		if len(targets) == 0 {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-d.clock.After(wait):
		}
		var left []launcherTarget
		for _, t := range targets {
			if p2p.Linked(d.host.Network(), t.id) {
				continue // it dialled us, or another part of the node did
			}
			d.addAddrs(t.id, t.addrs)
			cctx, cancel := context.WithTimeout(p2p.AllowRelayed(ctx, "launcher"), 10*time.Second)
			err := d.host.Host.Connect(cctx, peer.AddrInfo{ID: t.id})
			cancel()
			if err == nil {
				d.log.Info("reconnected to the launcher of a run held here before", "launcher", t.id, "run_dir", t.runDir)
				continue
			}
			d.log.Debug("launcher of an earlier run unreachable", "launcher", t.id, "err", err)
			left = append(left, t)
		}
		targets = left
	}
	for _, t := range targets {
		d.log.Debug("the launcher of a run held here before is not reachable; it finds this node again if it lists it as a --peer",
			"launcher", t.id, "run_dir", t.runDir)
	}
}

// launcherTarget is a launcher a restarted node dials: every address its runs'
// records gave, the latest run's first.
type launcherTarget struct {
	id     peer.ID
	addrs  []string
	runDir string // the latest run it launched here
	at     time.Time
}

// launcherTargets reads the launcher records matching glob (run directories) written
// within relaunchWindow of now: one target per launcher, latest run first.
func launcherTargets(runGlob string, now time.Time) []launcherTarget {
	type rec struct {
		r   launcherRecord
		dir string
		at  time.Time
	}
	paths, _ := filepath.Glob(filepath.Join(runGlob, ckpt.LauncherFile))
	var recs []rec
	for _, path := range paths {
		st, err := os.Stat(path)
		if err != nil || now.Sub(st.ModTime()) > relaunchWindow {
			continue
		}
		b, err := os.ReadFile(path)
		var r launcherRecord
		if err != nil || json.Unmarshal(b, &r) != nil {
			continue
		}
		recs = append(recs, rec{r, filepath.Dir(path), st.ModTime()})
	}
	slices.SortStableFunc(recs, func(a, b rec) int { return b.at.Compare(a.at) })
	var out []launcherTarget
	index := map[peer.ID]int{}
	for _, r := range recs {
		id, err := peer.Decode(r.r.Launcher)
		if err != nil {
			continue
		}
		i, ok := index[id]
		if !ok {
			i, index[id] = len(out), len(out)
			out = append(out, launcherTarget{id: id, runDir: r.dir, at: r.at})
		}
		for _, a := range r.r.Addrs {
			if !slices.Contains(out[i].addrs, a) {
				out[i].addrs = append(out[i].addrs, a)
			}
		}
	}
	return out
}
