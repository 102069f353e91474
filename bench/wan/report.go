package wan

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/pipeswarm/pipeswarm/bench"
	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
)

// Report is what `bench wan` writes to report.json (and, as tables, report.md).
type Report struct {
	Mode         string      `json:"mode"`
	Profile      string      `json:"profile"`
	ProfileLink  LinkProfile `json:"profile_link"`
	LinkOverride []string    `json:"link_overrides,omitempty"`
	Spec         string      `json:"spec"`
	Steps        int         `json:"steps"`
	// Schedule is the pipeline's: sync, or async with its in-flight bound and delay
	// handling (steps then count updates).
	Schedule     string  `json:"schedule"`
	Stages       int     `json:"pipeline_stages"`
	Replicas     int     `json:"replicas"`
	ComputeScale float64 `json:"compute_scale"`
	Threads      int     `json:"threads_per_node,omitempty"`
	Cores        int     `json:"cores"`  // of the machine that ran the bench
	Config       string  `json:"config"` // the effective run spec, YAML
	// Caveats are what limits how far the figures can be taken: links off their
	// profile, a reused baseline, a target that fell back, nodes sharing cores.
	Caveats []string `json:"caveats,omitempty"`

	Links []LinkFigures `json:"links"`

	Tokens             int64    `json:"tokens"`
	WallS              float64  `json:"wall_s"`
	TokensPerS         float64  `json:"tokens_per_s"`
	LoopbackTokensPerS float64  `json:"loopback_tokens_per_s,omitempty"` // meter: the same swarm on an ideal network
	LoopbackFraction   float64  `json:"loopback_fraction,omitempty"`
	TargetValLoss      float64  `json:"target_val_loss"`
	TimeToTargetS      *float64 `json:"time_to_target_s"` // nil: not reached
	StepsToTarget      *int     `json:"steps_to_target"`
	FinalValLoss       float64  `json:"final_val_loss"`
	// BytesPerTokenFwd/Bwd add every boundary's training frames, per token trained by
	// one replica pipeline.
	BytesPerTokenFwd float64         `json:"bytes_per_token_fwd"`
	BytesPerTokenBwd float64         `json:"bytes_per_token_bwd"`
	Boundaries       []BoundaryBytes `json:"boundaries"`
	Sync             []SyncFigures   `json:"sync,omitempty"`
	StageTimes       []StageFigures  `json:"stages"`
	LossGap          []GapPoint      `json:"loss_gap"`
	// MeasuredStepS is the swarm's median step time; MeterStepS (sim, --check-meter)
	// the meter's prediction of it from a centralised run on the nodes' threads, and
	// MeterError their relative difference.
	MeasuredStepS float64         `json:"measured_step_s"`
	MeterStepS    float64         `json:"meter_step_s,omitempty"`
	MeterError    float64         `json:"meter_error,omitempty"` // validation loss against the baseline at equal tokens
	Baseline      BaselineFigures `json:"baseline"`
	// Penalties (sim) is what each node's host and the launcher's counted against
	// their peers: protocol violations and bans.
	Penalties      []NodePenalties `json:"penalties,omitempty"`
	Notes          []string        `json:"notes,omitempty"`
	Churn          *ChurnFigures   `json:"churn,omitempty"`
	Timeline       []TimelineSpan  `json:"timeline,omitempty"`
	history, bhist []metrics.Step  // for the plots
}

// LinkProfile is a profile's default link.
type LinkProfile struct {
	Mbps     float64 `json:"mbps"`
	OneWayMs float64 `json:"one_way_ms"`
	Loss     float64 `json:"loss"`
}

// LinkFigures is one measured path against what its profile says.
type LinkFigures struct {
	From          string  `json:"from"`
	To            string  `json:"to"`
	ProfileMbps   float64 `json:"profile_mbps"`
	MeasuredMbps  float64 `json:"measured_mbps"` // from → to
	ReverseMbps   float64 `json:"measured_mbps_reverse"`
	ProfileRTTMs  float64 `json:"profile_rtt_ms"` // twice the one-way latency
	MeasuredRTTMs float64 `json:"measured_rtt_ms"`
}

// BoundaryBytes is one stage boundary's training traffic per token.
type BoundaryBytes struct {
	Boundary int     `json:"boundary"` // stage i → i+1
	Fwd      float64 `json:"bytes_per_token_fwd"`
	Bwd      float64 `json:"bytes_per_token_bwd"`
}

// SyncFigures is a stage's outer steps.
type SyncFigures struct {
	Stage           int     `json:"stage"`
	OuterSteps      int     `json:"outer_steps"`
	BytesPerOuter   float64 `json:"bytes_per_outer_step"` // sent by one replica, both phases
	SecondsPerOuter float64 `json:"seconds_per_outer_step"`
}

// StageFigures is where one stage's (of one replica's) wall time went.
type StageFigures struct {
	Stage       int     `json:"stage"`
	Replica     int     `json:"replica"`
	Utilisation float64 `json:"utilisation"` // compute / wall
	ComputeS    float64 `json:"compute_s"`
	ActivationS float64 `json:"wait_activation_s"`
	GradientS   float64 `json:"wait_gradient_s"`
	NormS       float64 `json:"wait_norm_s"`
	// BubbleS is the pipeline's drain: waiting for the earlier stages' backward
	// passes (their norms come when those end), not for the norm exchange.
	BubbleS float64 `json:"wait_bubble_s"`
	SyncS   float64 `json:"wait_sync_s"`
	WallS   float64 `json:"wall_s"`
}

// GapPoint compares validation losses at one evaluation (equal tokens).
type GapPoint struct {
	Step     int     `json:"step"`
	Tokens   int64   `json:"tokens"`
	Swarm    float64 `json:"swarm_val_loss"`
	Baseline float64 `json:"baseline_val_loss"`
	Gap      float64 `json:"gap"` // swarm − baseline
}

// BaselineFigures is the centralised run's.
type BaselineFigures struct {
	WallS         float64  `json:"wall_s"`
	TokensPerS    float64  `json:"tokens_per_s"`
	TimeToTargetS *float64 `json:"time_to_target_s"`
	StepsToTarget *int     `json:"steps_to_target"`
	FinalValLoss  float64  `json:"final_val_loss"`
	Dir           string   `json:"dir"`
	Reused        bool     `json:"reused"` // from the cache: trained by an earlier bench
	// Made is when, by a bench in which mode, and under what load it was trained
	// (absent for a baseline cached before that was recorded).
	Made *BaselineMade `json:"made,omitempty"`
}

// NodePenalties is what one node (by the cell whose link it has, or "launcher")
// counted against its peers during the run.
type NodePenalties struct {
	Node       string `json:"node"`
	Violations int    `json:"violations"` // protocol violations recorded
	Bans       int    `json:"bans"`       // bans imposed
}

func nodePenalties(name string, st p2p.PenaltyStats) NodePenalties {
	return NodePenalties{Node: name, Violations: st.Offences, Bans: st.Bans}
}

// TimelineSpan is one interval of a stage's timeline (for timeline.png).
type TimelineSpan struct {
	Stage, Replica int
	What           string // compute, activation, gradient, norm, sync, send
	Start, End     float64
}

// outcome is what a swarm run yields, whatever emulated its network.
type outcome struct {
	steps     []metrics.Step // with the swarm's elapsed_s
	outers    []metrics.Outer
	wall      time.Duration
	tokens    int64
	fwd, bwd  []int64 // per boundary, replica 0
	syncs     []SyncFigures
	times     []wire.StageTime
	sends     map[[2]int][]core.Span // (stage, replica) → link busy (meter)
	links     []LinkFigures
	loopback  float64 // tokens/s on an ideal network (meter)
	penalties []NodePenalties
	notes     []string
	churn     *ChurnFigures
}

// scheduleOf names sp's pipeline schedule for the report.
func scheduleOf(sp *spec.Spec) string {
	p := sp.Pipeline
	if !p.Async() {
		return spec.ScheduleSync
	}
	inFlight := p.InFlight
	if inFlight == 0 {
		inFlight = p.Stages
	}
	return fmt.Sprintf("%s (stage 0 keeps %d forwards in flight, train.delay %s)", spec.ScheduleAsync, inFlight, sp.Train.Delay)
}

// build assembles the report of one swarm run against its baseline.
func build(o Options, sp *spec.Spec, b *Baseline, out *outcome) *Report {
	scale := o.ComputeScale
	r := &Report{Mode: o.Mode, Profile: o.Profile.Name, Spec: sp.Name, Steps: sp.Train.Steps, Stages: sp.Pipeline.Stages,
		Replicas: sp.Pipeline.Replicas, ComputeScale: scale, Threads: o.Threads, Config: sp.String(), Links: out.links,
		ProfileLink:  LinkProfile{Mbps: o.Profile.BandwidthMbps, OneWayMs: o.Profile.LatencyMs, Loss: o.Profile.Loss},
		LinkOverride: o.Profile.Links, Tokens: out.tokens, WallS: out.wall.Seconds(), Notes: out.notes, Sync: out.syncs,
		Penalties: out.penalties, Churn: out.churn, Schedule: scheduleOf(sp)}
	if r.Mode != ModeMeter {
		r.ComputeScale = 1
	} else {
		r.Threads = 0 // the meter's stages run on the baseline's threads
	}
	if r.WallS > 0 {
		r.TokensPerS = float64(out.tokens) / r.WallS
	}
	if out.loopback > 0 {
		r.LoopbackTokensPerS = out.loopback
		r.LoopbackFraction = r.TokensPerS / out.loopback
	}
	r.history = replica0(out.steps)
	r.bhist = replica0(b.Steps)
	r.TargetValLoss = o.Target
	if r.TargetValLoss == 0 {
		r.TargetValLoss = bench.TargetAt(r.bhist, sp.Train.Steps/2)
	}
	r.StepsToTarget = bench.StepsTo(r.history, r.TargetValLoss)
	if r.StepsToTarget != nil {
		r.TimeToTargetS = elapsedAt(r.history, *r.StepsToTarget)
	}
	r.FinalValLoss = lastVal(r.history)
	if math.IsNaN(r.FinalValLoss) {
		// JSON has no NaN; 0 is no loss a model reaches.
		r.FinalValLoss = 0
		r.Notes = append(r.Notes, "no validation loss: replica pipeline 0, the one that evaluates, was not whole at any evaluation step")
	}
	perRep := float64(sp.Train.Steps) * float64(sp.TokensPerStep())
	for i := range out.fwd {
		bb := BoundaryBytes{Boundary: i, Fwd: float64(out.fwd[i]) / perRep, Bwd: float64(out.bwd[i]) / perRep}
		r.Boundaries = append(r.Boundaries, bb)
		r.BytesPerTokenFwd += bb.Fwd
		r.BytesPerTokenBwd += bb.Bwd
	}
	var epoch int64 // the earliest stage's start: every timeline is shifted to it
	for _, t := range out.times {
		if t.Start > 0 && (epoch == 0 || t.Start < epoch) {
			epoch = t.Start
		}
	}
	for _, t := range out.times {
		shift := 0.0
		if t.Start > 0 {
			shift = float64(t.Start-epoch) / 1e9
		}
		sec := func(w core.Wait) float64 { return t.Seconds[w.String()] }
		r.StageTimes = append(r.StageTimes, StageFigures{Stage: t.Stage, Replica: t.Replica, Utilisation: t.Utilisation(),
			ComputeS: sec(core.Computing), ActivationS: sec(core.WaitActivation), GradientS: sec(core.WaitGradient),
			NormS: sec(core.WaitNorm), BubbleS: sec(core.WaitBubble), SyncS: sec(core.WaitSync), WallS: t.WallS})
		for _, s := range t.Spans {
			r.Timeline = append(r.Timeline, TimelineSpan{Stage: t.Stage, Replica: t.Replica, What: s.Wait.String(), Start: shift + s.Start.Seconds(), End: shift + s.End.Seconds()})
		}
		for _, s := range out.sends[[2]int{t.Stage, t.Replica}] {
			r.Timeline = append(r.Timeline, TimelineSpan{Stage: t.Stage, Replica: t.Replica, What: "send", Start: s.Start.Seconds(), End: s.End.Seconds()})
		}
	}
	slices.SortFunc(r.StageTimes, func(a, b StageFigures) int { return (a.Replica*1000 + a.Stage) - (b.Replica*1000 + b.Stage) })
	bval := map[int]float64{}
	for _, s := range r.bhist {
		if s.ValLoss != nil {
			bval[s.Step] = *s.ValLoss
		}
	}
	for _, s := range r.history {
		if v, ok := bval[s.Step]; ok && s.ValLoss != nil {
			r.LossGap = append(r.LossGap, GapPoint{Step: s.Step, Tokens: s.Tokens, Swarm: *s.ValLoss, Baseline: v, Gap: *s.ValLoss - v})
		}
	}
	bf := &r.Baseline
	bf.Dir = b.Dir
	bf.WallS = b.Result.Elapsed.Seconds() / scale
	if bf.WallS > 0 {
		bf.TokensPerS = float64(b.Result.Tokens) / bf.WallS
	}
	bf.StepsToTarget = bench.StepsTo(r.bhist, r.TargetValLoss)
	if bf.StepsToTarget != nil {
		if t := elapsedAt(r.bhist, *bf.StepsToTarget); t != nil {
			v := *t / scale
			bf.TimeToTargetS = &v
		}
	}
	bf.FinalValLoss = b.Result.ValLoss
	bf.Reused = b.Reused
	if !b.Made.Trained.IsZero() {
		m := b.Made
		bf.Made = &m
	}
	r.Cores = numCPU()
	r.Caveats = caveats(o, sp, b, r, loadAvg())
	return r
}

// numCPU is a variable so that tests can stand in another machine.
var numCPU = runtime.NumCPU

// linkTolerance is how far a measured link may be off its profile before the report
// says so.
const linkTolerance = 0.10

// caveats says what limits the report's figures: links measured off their profile,
// a baseline reused from an earlier bench, a target that fell back to a later
// evaluation, nodes sharing this machine's cores. loadNow is the load average now
// (-1 unknown).
func caveats(o Options, sp *spec.Spec, b *Baseline, r *Report, loadNow float64) []string {
	var out []string
	off := func(got, want float64) bool { return want > 0 && math.Abs(got-want) > linkTolerance*want }
	for _, l := range r.Links {
		if off(l.MeasuredMbps, l.ProfileMbps) || off(l.ReverseMbps, l.ProfileMbps) {
			out = append(out, fmt.Sprintf("link %s ↔ %s measured %.1f / %.1f Mbit/s (→ / ←) against the profile's %g: more than %.0f%% off, so the swarm ran on other links than the profile names",
				l.From, l.To, l.MeasuredMbps, l.ReverseMbps, l.ProfileMbps, 100*linkTolerance))
		}
		if off(l.MeasuredRTTMs, l.ProfileRTTMs) && math.Abs(l.MeasuredRTTMs-l.ProfileRTTMs) > 1 {
			out = append(out, fmt.Sprintf("link %s ↔ %s measured a %.1f ms round trip against the profile's %g ms: more than %.0f%% off",
				l.From, l.To, l.MeasuredRTTMs, l.ProfileRTTMs, 100*linkTolerance))
		}
	}
	if b.Reused {
		when := "at an unknown time, by an earlier bench"
		if m := b.Made; !m.Trained.IsZero() {
			when = fmt.Sprintf("at %s by a %s-mode bench, on %d core(s) with a load average of %s", m.Trained.UTC().Format("2006-01-02 15:04 UTC"),
				m.Mode, m.Cores, loadText(m.LoadBefore))
			if m.Mode != o.Mode {
				when += fmt.Sprintf(" (this bench is %s mode)", o.Mode)
			}
		}
		out = append(out, fmt.Sprintf("the centralised run is reused from %s, trained %s; the load average now is %s. Its wall time and tokens/s are of that moment: remove the directory to train it again",
			b.Dir, when, loadText(loadNow)))
	}
	if o.Target == 0 {
		half := sp.Train.Steps / 2
		if at := targetStep(r.bhist, half); at > half {
			final := ""
			if at == sp.Train.Steps {
				final = " (its final evaluation)"
			}
			out = append(out, fmt.Sprintf("the target validation loss %.4f is the centralised run's at step %d%s: it evaluated nothing at or before step %d, half of the %d steps (eval_interval %d), so time to target is nearly the whole run; set eval_interval to at most %d, or give --target",
				r.TargetValLoss, at, final, half, sp.Train.Steps, sp.EvalInterval, max(1, half)))
		}
	}
	if nodes := sp.Pipeline.Stages * sp.Pipeline.Replicas; o.Mode != ModeMeter && nodes*max(1, o.Threads) > r.Cores {
		out = append(out, fmt.Sprintf("%d nodes with %d compute thread(s) each shared this machine's %d core(s): utilisation and tokens/s reflect that sharing, not %d machines (meter mode times each stage as if on a machine of its own)",
			nodes, max(1, o.Threads), r.Cores, nodes))
	}
	return out
}

// targetStep is the step whose validation loss TargetAt(h, step) takes, 0 if none.
func targetStep(h []metrics.Step, step int) int {
	at := 0
	for _, s := range h {
		if s.ValLoss == nil {
			continue
		}
		if s.Step > step {
			if at == 0 {
				at = s.Step
			}
			break
		}
		at = s.Step
	}
	return at
}

func loadText(v float64) string {
	if v < 0 {
		return "unknown"
	}
	return fmt.Sprintf("%.2f", v)
}

// replica0 keeps the rows of replica 0 (validation rides on them).
func replica0(steps []metrics.Step) []metrics.Step {
	var out []metrics.Step
	for _, s := range steps {
		if s.Replica == nil || *s.Replica == 0 {
			out = append(out, s)
		}
	}
	return out
}

func elapsedAt(h []metrics.Step, step int) *float64 {
	for _, s := range h {
		if s.Step == step {
			v := s.ElapsedS
			return &v
		}
	}
	return nil
}

func lastVal(h []metrics.Step) float64 {
	for i := len(h) - 1; i >= 0; i-- {
		if h[i].ValLoss != nil {
			return *h[i].ValLoss
		}
	}
	return math.NaN()
}

// Write puts report.json, report.md, loss.png and timeline.png into dir.
func (r *Report) Write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("wan: %w", err)
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := writeFile(filepath.Join(dir, "report.json"), js); err != nil {
		return err
	}
	var md strings.Builder
	r.Markdown(&md)
	if err := writeFile(filepath.Join(dir, "report.md"), []byte(md.String())); err != nil {
		return err
	}
	if err := plotLoss(filepath.Join(dir, "loss.png"), r); err != nil {
		return err
	}
	return plotTimeline(filepath.Join(dir, "timeline.png"), r)
}

func writeFile(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return fmt.Errorf("wan: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("wan: %w", err)
	}
	return nil
}

func fsec(p *float64) string {
	if p == nil {
		return "never"
	}
	return fmt.Sprintf("%.1f s", *p)
}

// Markdown writes the report's tables.
func (r *Report) Markdown(w io.Writer) {
	fmt.Fprintf(w, "# bench wan: %s, %s profile, %s mode\n\n", r.Spec, r.Profile, r.Mode)
	fmt.Fprintf(w, "%d steps, %d stage(s) × %d replica(s), %s schedule; profile: %g Mbit/s, %g ms one way, %g%% loss", r.Steps, r.Stages, r.Replicas, r.Schedule,
		r.ProfileLink.Mbps, r.ProfileLink.OneWayMs, 100*r.ProfileLink.Loss)
	if len(r.LinkOverride) > 0 {
		fmt.Fprintf(w, "; overrides %s", strings.Join(r.LinkOverride, ", "))
	}
	fmt.Fprintln(w, ".")
	if len(r.Caveats) > 0 {
		fmt.Fprintln(w, "\n## Caveats")
		fmt.Fprintln(w)
		for _, c := range r.Caveats {
			fmt.Fprintf(w, "- %s.\n", c)
		}
	}
	if r.Mode == ModeMeter {
		fmt.Fprintf(w, "\nMeter mode: the compute and frames are the centralised run's, measured here; network time is virtual and every stage runs as if on a machine of its own, which the sim and netns modes cannot show when every node shares this machine's cores. Compute times are divided by %g (compute scale) for the swarm and the baseline alike.\n", r.ComputeScale)
	}
	if len(r.Links) > 0 {
		fmt.Fprintln(w, "\n## Links (measured before the run)")
		fmt.Fprintln(w, "\n| from | to | profile Mbit/s | measured Mbit/s (→ / ←) | profile RTT ms | measured RTT ms |")
		fmt.Fprintln(w, "|---|---|---|---|---|---|")
		for _, l := range r.Links {
			fmt.Fprintf(w, "| %s | %s | %g | %.1f / %.1f | %g | %.1f |\n", l.From, l.To, l.ProfileMbps, l.MeasuredMbps, l.ReverseMbps, l.ProfileRTTMs, l.MeasuredRTTMs)
		}
	}
	fmt.Fprintln(w, "\n## Against the centralised run")
	fmt.Fprintf(w, "\nTarget validation loss %.4f.\n\n", r.TargetValLoss)
	fmt.Fprintln(w, "| | swarm | centralised |")
	fmt.Fprintln(w, "|---|---|---|")
	fmt.Fprintf(w, "| time to target | %s | %s |\n", fsec(r.TimeToTargetS), fsec(r.Baseline.TimeToTargetS))
	fmt.Fprintf(w, "| wall time | %.1f s | %.1f s |\n", r.WallS, r.Baseline.WallS)
	fmt.Fprintf(w, "| tokens/s | %.0f | %.0f |\n", r.TokensPerS, r.Baseline.TokensPerS)
	fmt.Fprintf(w, "| final validation loss | %.4f | %.4f |\n", r.FinalValLoss, r.Baseline.FinalValLoss)
	if r.LoopbackTokensPerS > 0 {
		fmt.Fprintf(w, "\nOn an ideal network the same swarm makes %.0f tokens/s: this profile keeps %.1f%% of it.\n", r.LoopbackTokensPerS, 100*r.LoopbackFraction)
	}
	if r.TimeToTargetS != nil && r.Baseline.TimeToTargetS != nil && *r.Baseline.TimeToTargetS > 0 {
		fmt.Fprintf(w, "\nTime to target: %.2f× the centralised run's.\n", *r.TimeToTargetS / *r.Baseline.TimeToTargetS)
	}
	if r.MeterStepS > 0 {
		fmt.Fprintf(w, "\nMedian step: %.3f s measured; the meter predicts %.3f s from a centralised run on %d thread(s) (%+.1f%%).\n",
			r.MeasuredStepS, r.MeterStepS, r.Threads, 100*r.MeterError)
	}
	fmt.Fprintln(w, "\n## Bytes per token (one replica pipeline's tokens)")
	fmt.Fprintln(w, "\n| boundary | forward | backward |")
	fmt.Fprintln(w, "|---|---|---|")
	for _, b := range r.Boundaries {
		fmt.Fprintf(w, "| %d→%d | %.1f | %.1f |\n", b.Boundary, b.Boundary+1, b.Fwd, b.Bwd)
	}
	fmt.Fprintf(w, "| all | %.1f | %.1f |\n", r.BytesPerTokenFwd, r.BytesPerTokenBwd)
	if len(r.Sync) > 0 {
		fmt.Fprintln(w, "\n## Outer steps")
		fmt.Fprintln(w, "\n| stage | outer steps | bytes per outer step (one replica) | seconds per outer step |")
		fmt.Fprintln(w, "|---|---|---|---|")
		for _, s := range r.Sync {
			fmt.Fprintf(w, "| %d | %d | %.0f | %.3f |\n", s.Stage, s.OuterSteps, s.BytesPerOuter, s.SecondsPerOuter)
		}
	}
	fmt.Fprintln(w, "\n## Where each stage's time went")
	fmt.Fprintln(w, "\n| stage | replica | utilisation | compute s | waiting for activations s | for gradients s | in the pipeline bubble s | for norms s | for outer syncs s |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|---|")
	for _, s := range r.StageTimes {
		fmt.Fprintf(w, "| %d | %d | %.1f%% | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n", s.Stage, s.Replica, 100*s.Utilisation, s.ComputeS, s.ActivationS, s.GradientS,
			s.BubbleS, s.NormS, s.SyncS)
	}
	fmt.Fprintln(w, "\nThe pipeline bubble is a stage's wait, after its own backward passes, for the earlier stages to finish theirs (their gradient norms come when they do): the pipeline's drain. Waiting for norms is the norm exchange itself.")
	if len(r.LossGap) > 0 {
		fmt.Fprintln(w, "\n## Validation loss at equal tokens")
		fmt.Fprintln(w, "\n| step | tokens | swarm | centralised | gap |")
		fmt.Fprintln(w, "|---|---|---|---|---|")
		for _, g := range r.LossGap {
			fmt.Fprintf(w, "| %d | %d | %.4f | %.4f | %+.4f |\n", g.Step, g.Tokens, g.Swarm, g.Baseline, g.Gap)
		}
	}
	if len(r.Penalties) > 0 {
		var v, b int
		for _, p := range r.Penalties {
			v += p.Violations
			b += p.Bans
		}
		fmt.Fprintln(w, "\n## Penalties (protocol violations each node counted against its peers)")
		fmt.Fprintf(w, "\n%d violation(s), %d ban(s) in all.\n\n", v, b)
		fmt.Fprintln(w, "| node | violations | bans |")
		fmt.Fprintln(w, "|---|---|---|")
		for _, p := range r.Penalties {
			fmt.Fprintf(w, "| %s | %d | %d |\n", p.Node, p.Violations, p.Bans)
		}
	}
	if c := r.Churn; c != nil {
		fmt.Fprintln(w, "\n## Churn")
		fmt.Fprintln(w, "\n| kills | restarts | pipelines broken | rejoined | replica-steps lost | micro-batches recomputed | outer steps taken / due |")
		fmt.Fprintln(w, "|---|---|---|---|---|---|---|")
		fmt.Fprintf(w, "| %d | %d | %v | %v | %d | %d | %d / %d |\n", c.Kills, c.Restarts, c.Broken, c.Rejoined, c.LostReplicaSteps,
			c.RecomputedMicroBatches, c.OuterStepsTaken, c.OuterStepsDue)
	}
	for _, n := range r.Notes {
		fmt.Fprintf(w, "\nNote: %s\n", n)
	}
	fmt.Fprintln(w, "\nloss.png: loss against tokens and wall time; timeline.png: each stage's compute, waits, sends and syncs over a few steps.")
}

// ReadReport reads a report.json from dir.
func ReadReport(dir string) (*Report, error) {
	b, err := os.ReadFile(filepath.Join(dir, "report.json"))
	if err != nil {
		return nil, fmt.Errorf("wan: %w", err)
	}
	r := &Report{}
	if err := json.Unmarshal(b, r); err != nil {
		return nil, fmt.Errorf("wan: %s: %w", dir, err)
	}
	return r, nil
}

// Compare writes one table of several reports; ratios are to the first.
func Compare(w io.Writer, dirs []string, reps []*Report) {
	fmt.Fprintln(w, "| report | spec | mode | profile | tokens/s | % of ideal network | time to target | × first | bytes/token fwd | bwd | final val | min utilisation |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|---|---|---|---|")
	for i, r := range reps {
		ratio := "—"
		if r.TimeToTargetS != nil && reps[0].TimeToTargetS != nil && *reps[0].TimeToTargetS > 0 {
			ratio = fmt.Sprintf("%.2f×", *r.TimeToTargetS / *reps[0].TimeToTargetS)
		}
		ideal := "—"
		if r.LoopbackFraction > 0 {
			ideal = fmt.Sprintf("%.1f%%", 100*r.LoopbackFraction)
		}
		minU := math.Inf(1)
		for _, s := range r.StageTimes {
			minU = min(minU, s.Utilisation)
		}
		if math.IsInf(minU, 1) {
			minU = math.NaN()
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %.0f | %s | %s | %s | %.1f | %.1f | %.4f | %.1f%% |\n", filepath.Base(dirs[i]), r.Spec, r.Mode, r.Profile,
			r.TokensPerS, ideal, fsec(r.TimeToTargetS), ratio, r.BytesPerTokenFwd, r.BytesPerTokenBwd, r.FinalValLoss, 100*minU)
	}
}
