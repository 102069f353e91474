package wan

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/node/wire"
)

// Modes.
const (
	ModeSim   = "sim"
	ModeNetns = "netns"
	ModeMeter = "meter"
)

// Modes lists the modes Run takes.
var Modes = []string{ModeSim, ModeNetns, ModeMeter}

// Options configure Run.
type Options struct {
	Spec    *spec.Spec // overrides applied
	Profile *Profile
	Mode    string // ModeSim (default), ModeNetns or ModeMeter
	OutDir  string
	// Target is the validation loss time-to-target counts to; 0: the baseline's at
	// half its steps.
	Target float64
	// ComputeScale (meter) divides measured compute times, standing in for faster
	// hardware; 0 means 1.
	ComputeScale float64
	// Threads (sim) is each in-process node's compute fan-out; 0 means 1.
	Threads int
	// CacheDir keeps centralised baselines for reuse; "" means the user cache
	// directory's pipeswarm/bench-wan.
	CacheDir string
	// CheckMeter (sim) also predicts the run's step time with the meter, from a
	// centralised run on Threads threads (cached like the baseline), and reports both.
	CheckMeter bool
	// Churn (sim, netns) kills and restarts nodes at given steps.
	Churn []Churn
	// GEMM (netns) is the --gemm the node processes run with; "" means auto. Sim and
	// meter nodes compute with this process's provider (backend.SetGEMM).
	GEMM string
	// Binary (netns) is the pipeswarm executable to run as nodes; "" means this one.
	Binary string
	Log    *slog.Logger
	// OnStep sees progress: phase "baseline" or "swarm", and each step's record.
	OnStep func(phase string, s metrics.Step)
	// OnNote sees one-line progress messages (links measured, swarm staffed, ...).
	OnNote func(string)
}

func (o *Options) defaults() error {
	if o.Spec == nil {
		return errors.New("wan: no spec")
	}
	if o.Profile == nil {
		return errors.New("wan: no profile")
	}
	if o.Mode == "" {
		o.Mode = ModeSim
	}
	if !slices.Contains(Modes, o.Mode) {
		return fmt.Errorf("wan: mode %q: want one of sim, netns, meter", o.Mode)
	}
	if o.ComputeScale == 0 {
		o.ComputeScale = 1
	}
	if !(o.ComputeScale > 0) || math.IsInf(o.ComputeScale, 0) {
		return fmt.Errorf("wan: compute scale %g: want > 0", o.ComputeScale)
	}
	if o.ComputeScale != 1 && o.Mode != ModeMeter {
		return fmt.Errorf("wan: --compute-scale is for meter mode (sim and netns run the real compute)")
	}
	if o.CheckMeter && o.Mode != ModeSim {
		return errors.New("wan: --check-meter is for sim mode")
	}
	if o.Threads == 0 {
		o.Threads = 1
	}
	if o.Threads < 0 {
		return fmt.Errorf("wan: threads %d: want ≥ 1", o.Threads)
	}
	if o.CacheDir == "" {
		d, err := os.UserCacheDir()
		if err != nil {
			d = os.TempDir()
		}
		o.CacheDir = filepath.Join(d, "pipeswarm", "bench-wan")
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.OnStep == nil {
		o.OnStep = func(string, metrics.Step) {}
	}
	if o.OnNote == nil {
		o.OnNote = func(string) {}
	}
	return o.Spec.Validate()
}

// Run trains the centralised baseline (or reuses it), runs the swarm in the chosen
// mode behind the profile's links, and writes the report into OutDir.
func Run(ctx context.Context, o Options) (*Report, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.OutDir, 0o755); err != nil {
		return nil, fmt.Errorf("wan: %w", err)
	}
	b, err := RunBaseline(ctx, o.Spec, 0, o.Mode, o.CacheDir, o.Log, func(s metrics.Step) { o.OnStep("baseline", s) })
	if err != nil {
		return nil, err
	}
	var check *Baseline
	if o.CheckMeter {
		if check, err = RunBaseline(ctx, o.Spec, o.Threads, o.Mode, o.CacheDir, o.Log, func(s metrics.Step) { o.OnStep("meter check", s) }); err != nil {
			return nil, err
		}
	}
	var out *outcome
	switch o.Mode {
	case ModeMeter:
		out, err = runMeter(o, b)
	case ModeSim:
		out, err = runSim(ctx, o)
	case ModeNetns:
		out, err = runNetns(ctx, o)
	}
	if err != nil {
		return nil, err
	}
	r := build(o, o.Spec, b, out)
	r.MeasuredStepS = medianStep(replica0(out.steps), nil)
	if check != nil {
		sc, err := Meter(o.Spec, check.Trace, o.Profile, 1)
		if err != nil {
			return nil, err
		}
		r.MeterStepS = medianStep(replica0(check.Steps), sc.StepEnd)
		if r.MeasuredStepS > 0 {
			r.MeterError = r.MeterStepS/r.MeasuredStepS - 1
		}
	}
	if err := r.Write(o.OutDir); err != nil {
		return nil, err
	}
	return r, nil
}

// runMeter schedules the swarm on virtual time from the baseline's trace, behind the
// profile and on an ideal network.
func runMeter(o Options, b *Baseline) (*outcome, error) {
	sp := o.Spec
	sc, err := Meter(sp, b.Trace, o.Profile, o.ComputeScale)
	if err != nil {
		return nil, err
	}
	ideal, err := Meter(sp, b.Trace, nil, o.ComputeScale)
	if err != nil {
		return nil, err
	}
	out := &outcome{wall: sc.Wall, tokens: b.Result.Tokens, fwd: b.Result.BoundaryFwd, bwd: b.Result.BoundaryBwd,
		sends: map[[2]int][]core.Span{}}
	if ideal.Wall > 0 {
		out.loopback = float64(b.Result.Tokens) / ideal.Wall.Seconds()
	}
	// The swarm computes what the centralised run computed, bit for bit; only the
	// clock differs.
	for _, s := range b.Steps {
		s.ElapsedS = sc.StepEnd[s.Step-1].Seconds()
		if s.ValLoss != nil {
			if t, ok := sc.EvalEnd[s.Step]; ok {
				s.ElapsedS = t.Seconds()
			}
		}
		if sc.Wall > 0 && s.Step > 1 {
			s.TokensPerS = float64(sp.TokensPerStep()*sp.Pipeline.Replicas) / (sc.StepEnd[s.Step-1] - sc.StepEnd[s.Step-2]).Seconds()
		}
		out.steps = append(out.steps, s)
	}
	for r, row := range sc.Ledgers {
		for s, l := range row {
			t := wire.NewStageTime(l)
			t.Stage, t.Replica = s, r
			out.times = append(out.times, *t)
			out.sends[[2]int{s, r}] = sc.Sends[r][s]
		}
	}
	out.syncs = syncFigures(sp, b.Outers, sc.Syncs)
	out.notes = append(out.notes, "the swarm's losses are the centralised run's (the pipeline computes them bit for bit), so the loss gap at equal tokens is zero by construction in meter mode")
	return out, nil
}

// medianStep is the median time a step took, from the steps' elapsed times (or, if
// ends is given, from those), leaving out the first two and any that followed an
// evaluation (which its time includes).
func medianStep(steps []metrics.Step, ends []time.Duration) float64 {
	var ds []float64
	for i := 1; i < len(steps); i++ {
		s, prev := steps[i], steps[i-1]
		if s.Step <= 2 || prev.ValLoss != nil || s.Step != prev.Step+1 {
			continue
		}
		d := s.ElapsedS - prev.ElapsedS
		if ends != nil {
			d = (ends[s.Step-1] - ends[prev.Step-1]).Seconds()
		}
		ds = append(ds, d)
	}
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	return ds[len(ds)/2]
}

// syncFigures sums a run's outer-step rows per stage; times, if given (meter), replace
// the rows' measured ones.
func syncFigures(sp *spec.Spec, outers []metrics.Outer, times []SyncTime) []SyncFigures {
	if sp.Pipeline.Replicas < 2 {
		return nil
	}
	S := sp.Pipeline.Stages
	figs := make([]SyncFigures, S)
	rows := make([]int, S)
	secs := make([]float64, S)
	for _, or := range outers {
		if or.Stage >= S {
			continue
		}
		rows[or.Stage]++
		figs[or.Stage].BytesPerOuter += float64(or.SyncBytes)
		secs[or.Stage] += or.SyncS
		if or.Replica == 0 {
			figs[or.Stage].OuterSteps++
		}
	}
	for s := range figs {
		figs[s].Stage = s
		if rows[s] > 0 {
			figs[s].BytesPerOuter /= float64(rows[s])
			figs[s].SecondsPerOuter = secs[s] / float64(rows[s])
		}
	}
	if times != nil {
		n := make([]int, S)
		sum := make([]time.Duration, S)
		for _, t := range times {
			n[t.Stage]++
			sum[t.Stage] += t.Dur
		}
		for s := range figs {
			if n[s] > 0 {
				figs[s].SecondsPerOuter = (sum[s] / time.Duration(n[s])).Seconds()
			}
		}
	}
	return figs
}

// metricsOf reads a launched run's metrics.
func metricsOf(dir string) ([]metrics.Step, []metrics.Outer, error) {
	f, err := os.Open(filepath.Join(dir, train.MetricsFile))
	if err != nil {
		return nil, nil, fmt.Errorf("wan: %w", err)
	}
	defer f.Close()
	return metrics.ReadRun(f)
}
