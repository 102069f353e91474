package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/pipeswarm/pipeswarm/node/ckpt"
)

// RunFolder is one run's folder in a node's data directory (DIR/runs/<run ID>):
// its stage checkpoints, optimiser state and launcher record.
type RunFolder struct {
	ID      string    // the folder's name, the run ID in 16 hex digits
	Path    string    // absolute
	Written time.Time // the newest write in it: its last checkpoint, or when it was accepted
	Bytes   int64
	// ResumedFrom is the run whose checkpoints this one started from ("" if none).
	ResumedFrom string
}

// RunFolders lists the run folders under dataDir, newest first.
func RunFolders(dataDir string) ([]RunFolder, error) {
	root := filepath.Join(dataDir, "runs")
	ents, err := os.ReadDir(root)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("run folders: %w", err)
	}
	var out []RunFolder
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		f := RunFolder{ID: e.Name(), Path: filepath.Join(root, e.Name())}
		// Checkpoints are renamed into place, so the folder's own time moves with them;
		// files written in place (logs) count too.
		if st, err := os.Stat(f.Path); err == nil {
			f.Written = st.ModTime()
		}
		_ = filepath.WalkDir(f.Path, func(p string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return nil
			}
			if info, err := d.Info(); err == nil {
				f.Bytes += info.Size()
				if info.ModTime().After(f.Written) {
					f.Written = info.ModTime()
				}
			}
			return nil
		})
		if b, err := os.ReadFile(filepath.Join(f.Path, ckpt.LauncherFile)); err == nil {
			var r launcherRecord
			if json.Unmarshal(b, &r) == nil {
				f.ResumedFrom = r.ResumedFrom
			}
		}
		out = append(out, f)
	}
	slices.SortStableFunc(out, func(a, b RunFolder) int {
		if c := b.Written.Compare(a.Written); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, nil
}

// Prunable picks, from runs (newest first), the folders to remove so that keep
// remain: the oldest beyond the newest keep, sparing every run in inUse (held by the
// node now), and every run a spared one resumed from, and so on back (its
// checkpoints are what a resume of it would start from). keep 0 removes nothing.
func Prunable(runs []RunFolder, keep int, inUse map[string]bool) []RunFolder {
	if keep <= 0 {
		return nil
	}
	from := map[string]string{}
	for _, r := range runs {
		from[r.ID] = r.ResumedFrom
	}
	spared := map[string]bool{}
	spare := func(id string) {
		for id != "" && !spared[id] {
			spared[id] = true
			id = from[id]
		}
	}
	for id := range inUse {
		spare(id)
	}
	for i, r := range runs {
		if i < keep {
			spare(r.ID)
		}
	}
	var out []RunFolder
	for _, r := range runs {
		if !spared[r.ID] {
			out = append(out, r)
		}
	}
	return out
}

// removeRunFolder takes a run folder out of sight at once (renamed to a name
// CleanTemp would remove after a crash), then deletes it.
func removeRunFolder(f RunFolder) error {
	tmp := filepath.Join(filepath.Dir(f.Path), ".pruned-"+f.ID)
	if err := os.Rename(f.Path, tmp); err != nil {
		return fmt.Errorf("prune run %s: %w", f.ID, err)
	}
	if err := os.RemoveAll(tmp); err != nil {
		return fmt.Errorf("prune run %s: %w", f.ID, err)
	}
	return nil
}

// PruneRuns removes the run folders of dataDir that Prunable picks and returns them.
// The caller holds the data directory (a running node, or `pipeswarm node prune`
// with the node stopped), so no run it does not name in inUse is in progress.
func PruneRuns(dataDir string, keep int, inUse map[string]bool) ([]RunFolder, error) {
	runs, err := RunFolders(dataDir)
	if err != nil {
		return nil, err
	}
	var done []RunFolder
	for _, f := range Prunable(runs, keep, inUse) {
		if err := removeRunFolder(f); err != nil {
			return done, err
		}
		done = append(done, f)
	}
	return done, nil
}

// pruneRuns applies the node's keep_runs, sparing the runs it holds now and the runs
// they resumed from. The folders are renamed away on the loop (pruneFolders), which
// counts the plans being accepted as held.
func (d *Daemon) pruneRuns() {
	if d.cfg.KeepRuns <= 0 {
		return
	}
	runs, err := RunFolders(d.dir.Path)
	if err != nil {
		d.log.Warn("run folders not pruned", "err", err)
		return
	}
	r := &pruneFolders{folders: runs}
	if !d.ask(r) {
		return
	}
	moved := r.moved
	var freed int64
	var ids []string
	for _, f := range moved {
		if err := os.RemoveAll(f.Path); err != nil {
			d.log.Warn("run folder not pruned", "run", f.ID, "err", err)
			continue
		}
		freed += f.Bytes
		ids = append(ids, f.ID)
	}
	if len(ids) > 0 {
		d.log.Info("pruned old run folders", "runs", strings.Join(ids, ","), "freed_mib", fmt.Sprintf("%.1f", float64(freed)/(1<<20)),
			"keep_runs", d.cfg.KeepRuns)
	}
}
