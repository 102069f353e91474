package wan

import (
	"context"
	"crypto/sha256"
	"encoding/gob"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"

	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/shard/backend"
	"github.com/pipeswarm/pipeswarm/shard/compute"
)

// Baseline is the centralised run of a spec: its metrics, its result, and the trace
// of its compute the meter schedules.
type Baseline struct {
	Dir    string
	Steps  []metrics.Step
	Outers []metrics.Outer
	Result train.Result
	Trace  *Trace
	Reused bool // found in the cache, not run now
}

const (
	traceFile  = "trace.gob"
	resultFile = "result.json" // written last: a baseline directory without it is incomplete
)

// BaselineKey names a spec's centralised run in the cache: the spec as run (steps
// and data path included), the content of its text, the GEMM provider (library
// version and kernels: providers round differently) and the compute threads (0:
// every core).
func BaselineKey(sp *spec.Spec, threads int) (string, error) {
	h := sha256.New()
	// How many forwards a stage keeps in flight changes the schedule, not the
	// arithmetic: the centralised run is the same.
	same := *sp
	same.Pipeline.InFlight = 0
	h.Write([]byte(same.String()))
	// A baseline from another build may have computed differently.
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" || s.Key == "vcs.modified" {
				h.Write([]byte(s.Key + "=" + s.Value + "\n"))
			}
		}
	}
	g, err := backend.ProcessGEMM()
	if err != nil {
		return "", err
	}
	fmt.Fprintf(h, "gemm=%s %s\n", g.Name, g.Describe())
	text, _, err := train.Corpus(sp.Data.Path)
	if err != nil {
		return "", err
	}
	h.Write(text)
	key := fmt.Sprintf("%s-%d-%s", sp.Name, sp.Train.Steps, hex.EncodeToString(h.Sum(nil))[:16])
	if threads > 0 {
		key += fmt.Sprintf("-t%d", threads)
	}
	return key, nil
}

// RunBaseline returns sp's centralised run from cacheDir if a complete one is there,
// and otherwise trains it (with its trace) into cacheDir/KEY, on threads compute
// threads (0: every core).
func RunBaseline(ctx context.Context, sp *spec.Spec, threads int, cacheDir string, log *slog.Logger, onStep func(metrics.Step)) (*Baseline, error) {
	key, err := BaselineKey(sp, threads)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(cacheDir, key)
	if b, err := loadBaseline(dir); err == nil {
		b.Reused = true
		log.Info("baseline: reusing the centralised run", "dir", dir, "steps", b.Result.Steps, "val_loss", b.Result.ValLoss)
		return b, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		log.Warn("baseline: cached run unreadable; training it again", "dir", dir, "err", err)
	}
	if err := os.RemoveAll(dir); err != nil {
		return nil, fmt.Errorf("wan: baseline: %w", err)
	}
	log.Info("baseline: training the centralised run", "dir", dir, "steps", sp.Train.Steps)
	tr := NewTrace()
	compute.SetWorkers(threads)
	defer compute.SetWorkers(0)
	res, err := train.Run(ctx, train.Options{Spec: sp, OutDir: dir, Log: log.With("run", "baseline"), OnStep: onStep, Trace: tr.Add})
	if err != nil {
		return nil, fmt.Errorf("wan: baseline: %w", err)
	}
	if err := writeTrace(filepath.Join(dir, traceFile), tr); err != nil {
		return nil, err
	}
	rb, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, resultFile), rb, 0o644); err != nil {
		return nil, fmt.Errorf("wan: baseline: %w", err)
	}
	return loadBaseline(dir)
}

func loadBaseline(dir string) (*Baseline, error) {
	rb, err := os.ReadFile(filepath.Join(dir, resultFile))
	if err != nil {
		return nil, err
	}
	b := &Baseline{Dir: dir}
	if err := json.Unmarshal(rb, &b.Result); err != nil {
		return nil, fmt.Errorf("wan: baseline %s: %w", dir, err)
	}
	f, err := os.Open(filepath.Join(dir, train.MetricsFile))
	if err != nil {
		return nil, fmt.Errorf("wan: baseline: %w", err)
	}
	defer f.Close()
	if b.Steps, b.Outers, err = metrics.ReadRun(f); err != nil {
		return nil, fmt.Errorf("wan: baseline %s: %w", dir, err)
	}
	if b.Trace, err = readTrace(filepath.Join(dir, traceFile)); err != nil {
		return nil, err
	}
	return b, nil
}

func writeTrace(path string, tr *Trace) error {
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return fmt.Errorf("wan: trace: %w", err)
	}
	err = gob.NewEncoder(f).Encode(tr.Ops())
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("wan: trace: %w", err)
	}
	return nil
}

func readTrace(path string) (*Trace, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("wan: trace: %w", err)
	}
	defer f.Close()
	var ops []train.Op
	if err := gob.NewDecoder(f).Decode(&ops); err != nil {
		return nil, fmt.Errorf("wan: trace %s: %w", path, err)
	}
	tr := NewTrace()
	for _, op := range ops {
		tr.Add(op)
	}
	return tr, nil
}
