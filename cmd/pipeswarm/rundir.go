package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"github.com/pipeswarm/pipeswarm/node/launcher"
	"github.com/pipeswarm/pipeswarm/node/train"
)

// runFiles are the files train and launch write into a run's directory.
var runFiles = []string{train.MetricsFile, train.SpecFile, train.CheckpointFile, train.HFConfigFile, train.TokenizerFile, train.PlotFile,
	launcher.RunFile, launcher.ResultFile}

// removeRunFiles removes the files train and launch write into dir: runFiles and
// train's stage checkpoints.
func removeRunFiles(dir string) error {
	files := slices.Clone(runFiles)
	for i := range files {
		files[i] = filepath.Join(dir, files[i])
	}
	stages, _ := filepath.Glob(filepath.Join(dir, "stage-*.safetensors"))
	for _, f := range append(files, stages...) {
		if err := os.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

// holdsRun says which file of a run dir holds, "" if none: a directory that holds a
// run is never written over unasked.
func holdsRun(dir string) string {
	for _, f := range []string{train.MetricsFile, train.SpecFile, launcher.RunFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			return filepath.Join(dir, f)
		}
	}
	return ""
}

// runDir picks the directory a train or launch writes into. With --out unset it is
// runs/NAME, or if that holds a run the first of runs/NAME-2, runs/NAME-3, … that
// does not (note says so); --resume continues runs/NAME itself. An explicit --out
// that holds a run is refused unless --resume continues it or --force overwrites it
// (its run files are removed first; nothing else in it is touched).
func runDir(out, name string, resume, force bool) (dir, note string, err error) {
	if out == "" {
		base := filepath.Join("runs", name)
		if resume || holdsRun(base) == "" {
			return base, "", nil
		}
		for i := 2; ; i++ {
			dir = fmt.Sprintf("%s-%d", base, i)
			if holdsRun(dir) == "" {
				return dir, fmt.Sprintf("%s holds an earlier run; this one goes to %s (--out chooses, --resume continues %s)", base, dir, base), nil
			}
		}
	}
	held := holdsRun(out)
	switch {
	case held == "" || resume:
		return out, "", nil
	case !force:
		return "", "", fmt.Errorf("--out %s holds a run (%s): continue it with --resume, overwrite it with --force, or choose another --out", out, held)
	}
	if err := removeRunFiles(out); err != nil {
		return "", "", fmt.Errorf("--force: %w", err)
	}
	return out, fmt.Sprintf("--force: the earlier run in %s is overwritten", out), nil
}

// dropUnused removes what a launch that failed before recording a step left in dir,
// a directory it created: a failed launch leaves no empty run folder behind.
func dropUnused(dir string, created bool) {
	if !created {
		return
	}
	if st, err := os.Stat(filepath.Join(dir, train.MetricsFile)); err == nil && st.Size() > 0 {
		return
	}
	_ = removeRunFiles(dir)
	_ = os.Remove(dir) // only if nothing else is in it
}

// exists reports whether path exists.
func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
