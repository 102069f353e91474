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
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

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
	// Made is when and how it was trained; zero for a baseline cached before it was
	// recorded.
	Made BaselineMade
}

// BaselineMade is when and how a centralised baseline was trained, kept beside it
// (made.json): its timings are of that moment's machine.
type BaselineMade struct {
	Trained time.Time `json:"trained"`
	Mode    string    `json:"mode"`    // the bench mode of the run that trained it
	Threads int       `json:"threads"` // compute threads (0: every core)
	Cores   int       `json:"cores"`
	// Load is the 1-minute load average as training began and ended (-1 unknown).
	LoadBefore float64 `json:"load_before"`
	LoadAfter  float64 `json:"load_after"`
}

const (
	traceFile = "trace.gob"
	madeFile  = "made.json"
	// resultFile is train.Result as encoding/json writes it (Elapsed in nanoseconds),
	// read only by this cache; written last: a directory without it is incomplete.
	resultFile = "result.json"
)

// loadAvg is the machine's 1-minute load average, or -1 where /proc/loadavg is not.
func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return -1
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return -1
	}
	return v
}

// BaselineKey names a spec's centralised run in the cache: the spec as run (steps
// and data path included), the content of its text, the GEMM provider (library
// version and kernels: providers round differently) and the compute threads (0:
// every core).
func BaselineKey(sp *spec.Spec, threads int) (string, error) {
	h := sha256.New()
	// How many forwards a stage keeps in flight changes a sync run's schedule, not its
	// arithmetic: the centralised run is the same. In an async run it sets the weight
	// versions every forward and backward runs on: another run.
	same := *sp
	if !sp.Pipeline.Async() {
		same.Pipeline.InFlight = 0
	}
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
// threads (0: every core), recording that a bench in mode trained it.
func RunBaseline(ctx context.Context, sp *spec.Spec, threads int, mode, cacheDir string, log *slog.Logger, onStep func(metrics.Step)) (*Baseline, error) {
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
	made := BaselineMade{Trained: time.Now().UTC(), Mode: mode, Threads: threads, Cores: runtime.NumCPU(), LoadBefore: loadAvg()}
	compute.SetWorkers(threads)
	defer compute.SetWorkers(0)
	res, err := train.Run(ctx, train.Options{Spec: sp, OutDir: dir, Log: log.With("run", "baseline"), OnStep: onStep, Trace: tr.Add})
	if err != nil {
		return nil, fmt.Errorf("wan: baseline: %w", err)
	}
	if err := writeTrace(filepath.Join(dir, traceFile), tr); err != nil {
		return nil, err
	}
	made.LoadAfter = loadAvg()
	mb, err := json.MarshalIndent(made, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, madeFile), mb, 0o644); err != nil {
		return nil, fmt.Errorf("wan: baseline: %w", err)
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
	if mb, err := os.ReadFile(filepath.Join(dir, madeFile)); err == nil {
		_ = json.Unmarshal(mb, &b.Made) // a record that does not read is as none: the report says it is unknown
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
