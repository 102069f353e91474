package launcher

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/membership"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
)

const gridSpec = `name: grid
seed: 1
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 2, replicas: 3}
train: {batch_size: 4, steps: 4, lr: 0.003}
diloco: {inner_steps: 2}
`

// gridPlan is a plan of 2 stages × 3 replicas on made-up peers.
func gridPlan(t *testing.T) (*spec.Spec, *wire.Plan) {
	t.Helper()
	sp, err := spec.Parse([]byte(gridSpec), "grid.yaml")
	if err != nil {
		t.Fatal(err)
	}
	plan := &wire.Plan{ID: 7}
	for r := range 3 {
		for s := range 2 {
			k, err := p2p.GenerateKey()
			if err != nil {
				t.Fatal(err)
			}
			id, _ := p2p.PeerID(k)
			plan.Stages = append(plan.Stages, assign.Assignment{Stage: s, Replica: r, Peer: id.String()})
		}
	}
	return sp, plan
}

type watchRun struct {
	reports chan wire.Report
	lost    chan peer.ID
	aborted []string
	idled   []int
	down    map[[2]int]bool
	log     *slog.Logger
	// offers: every node asked has a free slot; rejoin answers a rejoin.
	offers bool
	rejoin func(r, step int) (uint64, error)
	stops  []stopAt
}

type stopAt struct{ r, step int }

// watchRun is the run's nodes, as watch sees them.
func (w *watchRun) abort(why string)                       { w.aborted = append(w.aborted, why) }
func (w *watchRun) idle(a membership.Idle)                 { w.idled = append(w.idled, a.Replica) }
func (w *watchRun) drop(membership.Drop)                   {}
func (w *watchRun) checkpoint(int, func(membership.Event)) {}
func (w *watchRun) recorded(int)                           {}
func (w *watchRun) stopAt(r, step int, _ string)           { w.stops = append(w.stops, stopAt{r, step}) }
func (w *watchRun) up(s, r int) bool                       { return !w.down[[2]int{s, r}] }
func (w *watchRun) newcomers() []membership.Candidate      { return nil }
func (w *watchRun) askOffer(q membership.AskOffer, post func(membership.Event)) {
	if w.offers {
		go post(membership.OfferAnswered{Replica: q.Replica, Peer: q.Peer, Answered: true, MaxStages: 1, Memory: 1 << 40})
	}
}
func (w *watchRun) join(j membership.SignJoin) (uint64, error) {
	if w.rejoin == nil {
		return 0, errors.New("no rejoin here")
	}
	return w.rejoin(j.Replica, j.Step)
}

func (w *watchRun) run(t *testing.T, sp *spec.Spec, plan *wire.Plan) (*Result, error) {
	t.Helper()
	o := Options{Spec: sp, OutDir: t.TempDir()}
	log := w.log
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return watch(context.Background(), o, log, plan, w.reports, w.lost, w)
}

func newWatchRun() *watchRun {
	return &watchRun{reports: make(chan wire.Report, 100), lost: make(chan peer.ID, 10), down: map[[2]int]bool{}}
}

func (w *watchRun) report(plan *wire.Plan, r wire.Report) {
	a, _ := plan.Cell(r.Stage, r.Replica)
	r.Run, r.Peer = plan.ID, a.Peer
	w.reports <- r
}

// train reports steps from..to of replica pipeline r (its last stage's), with
// replica 0's validation losses where they are due.
func (w *watchRun) train(sp *spec.Spec, plan *wire.Plan, r, from, to int, join uint64) {
	last := sp.Pipeline.Stages - 1
	for step := from; step <= to; step++ {
		w.report(plan, wire.Report{Stage: last, Replica: r, Join: join, Kind: wire.ReportStep, Step: step, Loss: 3})
		if r == 0 && (step == sp.Train.Steps || (sp.EvalInterval > 0 && step%sp.EvalInterval == 0)) {
			w.report(plan, wire.Report{Stage: last, Replica: r, Kind: wire.ReportEval, Step: step, ValLoss: 3.5})
		}
	}
}

func TestLaunchFailsLoudlyWhenReplicasReportDifferentWeights(t *testing.T) {
	sp, plan := gridPlan(t)
	w := newWatchRun()
	w.report(plan, wire.Report{Stage: 1, Replica: 0, Kind: wire.ReportOuter, Step: 2, Outer: &wire.OuterReport{OuterStep: 1, Hash: "aaaa"}})
	w.report(plan, wire.Report{Stage: 1, Replica: 2, Kind: wire.ReportOuter, Step: 2, Outer: &wire.OuterReport{OuterStep: 1, Hash: "aaaa"}})
	w.report(plan, wire.Report{Stage: 1, Replica: 1, Kind: wire.ReportOuter, Step: 2, Outer: &wire.OuterReport{OuterStep: 1, Hash: "bbbb"}})
	_, err := w.run(t, sp, plan)
	if !errors.Is(err, ErrRunFailed) || !strings.Contains(err.Error(), "diverged") || !strings.Contains(err.Error(), "bbbb") {
		t.Fatalf("error %v, want a failure saying the replicas diverged, naming the hashes", err)
	}
	if len(w.aborted) != 1 {
		t.Errorf("aborted %d times, want once", len(w.aborted))
	}
}

func TestALostReplicaBreaksOnlyItsPipelineAndItsPartnerIsIdled(t *testing.T) {
	sp, plan := gridPlan(t)
	w := newWatchRun()
	// Stage 1 of replica 2 is gone after step 2: stage 1's others say so.
	w.down[[2]int{1, 2}] = true
	w.train(sp, plan, 2, 1, 2, 0)
	w.report(plan, wire.Report{Stage: 1, Replica: 0, Kind: wire.ReportOuter, Step: 2, Outer: &wire.OuterReport{Hash: "h", Missing: []int{2}}})
	for r := range 2 {
		w.train(sp, plan, r, 1, 4, 0)
		for s := range 2 {
			w.report(plan, wire.Report{Stage: s, Replica: r, Kind: wire.ReportDone})
		}
	}
	res, err := w.run(t, sp, plan)
	if err != nil {
		t.Fatal(err)
	}
	if len(w.idled) != 1 || w.idled[0] != 2 || len(res.Broken) != 1 || res.Broken[0] != 2 {
		t.Errorf("idled %v, broken %v; want replica 2 alone", w.idled, res.Broken)
	}
}

func TestAStalledReplicaLagsAndIsLetGoWhenTheOthersFinish(t *testing.T) {
	sp, plan := gridPlan(t)
	w := newWatchRun()
	// Stage 0 of replica 1 missed an outer step but is still connected: it lags, the
	// run does not wait for it, and when the others are done it is told to stop.
	w.train(sp, plan, 1, 1, 2, 0)
	w.report(plan, wire.Report{Stage: 0, Replica: 0, Kind: wire.ReportOuter, Step: 2, Outer: &wire.OuterReport{Hash: "h", Missing: []int{1}}})
	for _, r := range []int{0, 2} {
		w.train(sp, plan, r, 1, 4, 0)
		for s := range 2 {
			w.report(plan, wire.Report{Stage: s, Replica: r, Kind: wire.ReportDone})
		}
	}
	res, err := w.run(t, sp, plan)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Broken) != 1 || res.Broken[0] != 1 || len(w.idled) != 1 {
		t.Errorf("broken %v, idled %v; want replica 1 let go at the end", res.Broken, w.idled)
	}
}

func TestLosingTheLastWholePipelineFailsTheRun(t *testing.T) {
	sp, plan := gridPlan(t)
	w := newWatchRun()
	for r := range 3 {
		w.report(plan, wire.Report{Stage: 0, Replica: r, Kind: wire.ReportIdle, Error: "idle: lost a neighbour"})
	}
	_, err := w.run(t, sp, plan)
	if !errors.Is(err, ErrRunFailed) {
		t.Fatalf("error %v, want ErrRunFailed once no replica pipeline is whole", err)
	}
}

// logSignal is a slog handler that passes each message to a channel.
type logSignal struct{ msgs chan string }

func (l logSignal) Enabled(context.Context, slog.Level) bool { return true }
func (l logSignal) Handle(_ context.Context, r slog.Record) error {
	select {
	case l.msgs <- r.Message:
	default:
	}
	return nil
}
func (l logSignal) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l logSignal) WithGroup(string) slog.Handler      { return l }

func TestABrokenPipelineRejoinsAtTheNextOuterStepWhenItsNodesAreBack(t *testing.T) {
	sp, err := spec.Parse([]byte(strings.Replace(gridSpec, "steps: 4", "steps: 8", 1)), "grid.yaml")
	if err != nil {
		t.Fatal(err)
	}
	_, plan := gridPlan(t)
	w := newWatchRun()
	msgs := make(chan string, 100)
	w.log = slog.New(logSignal{msgs})
	type joinCall struct{ r, step int }
	joins := make(chan joinCall, 4)
	w.offers = true
	w.rejoin = func(r, step int) (uint64, error) {
		joins <- joinCall{r, step}
		return 99, nil
	}
	results := make(chan error, 1)
	var res *Result
	go func() {
		var err error
		res, err = w.run(t, sp, plan)
		results <- err
	}()
	w.report(plan, wire.Report{Stage: 1, Replica: 2, Kind: wire.ReportIdle, Error: "idle: lost a neighbour"})
	for m := range msgs {
		if strings.Contains(m, "rejoins at the next outer step") {
			break
		}
	}
	// The outer step after step 2, taken by both stages of the two whole pipelines.
	for s := range 2 {
		for r := range 2 {
			w.report(plan, wire.Report{Stage: s, Replica: r, Kind: wire.ReportOuter, Step: 2, Outer: &wire.OuterReport{Hash: "h"}})
		}
	}
	if j := <-joins; j != (joinCall{2, 2}) {
		t.Fatalf("rejoin %+v, want replica 2 after step 2", j)
	}
	// A late report of the pipeline's first incarnation is ignored; the rejoined one
	// must finish like the others.
	w.report(plan, wire.Report{Stage: 0, Replica: 2, Kind: wire.ReportError, Error: "stalled: old news"})
	for r := range 3 {
		if r == 2 {
			w.train(sp, plan, r, 3, 8, 99)
		} else {
			w.train(sp, plan, r, 1, 8, 0)
		}
		for s := range 2 {
			rep := wire.Report{Stage: s, Replica: r, Kind: wire.ReportDone}
			if r == 2 {
				rep.Join = 99
			}
			w.report(plan, rep)
		}
	}
	if err := <-results; err != nil {
		t.Fatal(err)
	}
	if len(res.Rejoined) != 1 || res.Rejoined[0] != 2 || len(res.Broken) != 1 {
		t.Errorf("rejoined %v, broken %v; want replica 2 broken once and rejoined", res.Rejoined, res.Broken)
	}
}

// A stage that diverged stops the whole run, replicas or not: every replica trains
// the same way. The run's error is the stage's own words.
func TestADivergedStageStopsAReplicatedRunWithItsMessage(t *testing.T) {
	sp, plan := gridPlan(t)
	w := newWatchRun()
	msg := "diverged at step 3 on stage 1 of replica 2: the loss of micro-batch 0 is NaN; try a lower train.lr"
	w.report(plan, wire.Report{Stage: 1, Replica: 2, Kind: wire.ReportError, Step: 3, Error: msg, Diverged: true})
	_, err := w.run(t, sp, plan)
	if !errors.Is(err, ErrRunFailed) || !errors.Is(err, wire.ErrDiverged) || !strings.Contains(err.Error(), msg) {
		t.Fatalf("error %v, want the run failed with %q", err, msg)
	}
	if len(w.aborted) != 1 || w.aborted[0] != msg || len(w.idled) != 0 {
		t.Errorf("aborted %q, idled %v; want the run aborted with the message, no pipeline idled", w.aborted, w.idled)
	}
}

// A run whose replica pipeline trained nothing, or that recorded no validation loss,
// did not do what it was for: it fails, saying which and why, rather than succeed
// with nothing to show.
func TestARunWithAPipelineThatTrainedNothingOrNoValidationLossFails(t *testing.T) {
	sp, plan := gridPlan(t)
	w := newWatchRun()
	w.report(plan, wire.Report{Stage: 0, Replica: 0, Kind: wire.ReportError, Error: "sending step 1 micro-batch 0: stream reset (remote)"})
	for _, r := range []int{1, 2} {
		w.train(sp, plan, r, 1, 4, 0)
		for s := range 2 {
			w.report(plan, wire.Report{Stage: s, Replica: r, Kind: wire.ReportDone})
		}
	}
	_, err := w.run(t, sp, plan)
	if !errors.Is(err, ErrRunFailed) || !strings.Contains(err.Error(), "replica pipeline 0 trained no step of 4") || !strings.Contains(err.Error(), "stream reset") {
		t.Fatalf("replica 0 broke before its first step: %v; want a failure naming it and why", err)
	}

	// Every pipeline trains, but replica 0 breaks before its evaluation.
	w = newWatchRun()
	w.train(sp, plan, 0, 1, 3, 0)
	w.report(plan, wire.Report{Stage: 1, Replica: 0, Kind: wire.ReportError, Error: "disk on fire"})
	for _, r := range []int{1, 2} {
		w.train(sp, plan, r, 1, 4, 0)
		for s := range 2 {
			w.report(plan, wire.Report{Stage: s, Replica: r, Kind: wire.ReportDone})
		}
	}
	_, err = w.run(t, sp, plan)
	if !errors.Is(err, ErrRunFailed) || !strings.Contains(err.Error(), "no validation loss") || !strings.Contains(err.Error(), "disk on fire") {
		t.Fatalf("no validation loss: %v; want a failure saying so", err)
	}
}

// A node stopping says after which step; the launcher stops the rest of its pipeline
// after the same step, and takes the pipeline out only once every stage has stopped.
// With one replica the run then pauses (ErrStageDown) saying which node stopped.
func TestAStoppingNodeStopsItsPipelineAfterTheSameStep(t *testing.T) {
	sp, err := spec.Parse([]byte("name: one\nmodel: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 32}\npipeline: {stages: 2}\ntrain: {batch_size: 4, steps: 40, lr: 0.003}\n"), "one.yaml")
	if err != nil {
		t.Fatal(err)
	}
	plan := &wire.Plan{ID: 9}
	for s := range 2 {
		k, _ := p2p.GenerateKey()
		id, _ := p2p.PeerID(k)
		plan.Stages = append(plan.Stages, assign.Assignment{Stage: s, Peer: id.String()})
	}
	w := newWatchRun()
	w.train(sp, plan, 0, 1, 12, 0)
	w.report(plan, wire.Report{Stage: 1, Kind: wire.ReportStopping, Step: 13, Error: "node shutting down"})
	w.train(sp, plan, 0, 13, 13, 0)
	w.report(plan, wire.Report{Stage: 1, Kind: wire.ReportError, Error: "node shutting down"})
	w.report(plan, wire.Report{Stage: 0, Kind: wire.ReportError, Error: "stopped by the launcher after step 13"})
	o := Options{Spec: sp, OutDir: t.TempDir()}
	res, err := watch(context.Background(), o, slog.New(slog.NewTextHandler(io.Discard, nil)), plan, w.reports, w.lost, w)
	if !errors.Is(err, ErrStageDown) || !strings.Contains(err.Error(), "is stopping; every stage of its pipeline stops after step 13") {
		t.Fatalf("error %v, want the run down for the stopping node, after step 13", err)
	}
	if len(w.stops) != 1 || w.stops[0] != (stopAt{0, 13}) {
		t.Errorf("told %v, want replica pipeline 0 to stop after step 13", w.stops)
	}
	if res.Steps != 13 {
		t.Errorf("recorded through step %d, want 13: the step the stages stop after is recorded", res.Steps)
	}
}

// A pipeline stopped right after an evaluated step, before its evaluation: the step's
// row is recorded without the validation loss, so a resumed run may continue from it;
// the resumed run evaluates it again first and the row gets its validation loss, once.
// pipePlan is a run of one pipeline of 2 stages, 4 steps, evaluated every 2, on
// made-up peers, and a watch of it that writes to out.
func pipePlan(t *testing.T, out string) (*wire.Plan, func(*watchRun, *wire.Plan) error) {
	t.Helper()
	sp, err := spec.Parse([]byte("name: evalstop\nseed: 1\neval_interval: 2\nmodel: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 32}\n"+
		"pipeline: {stages: 2}\ntrain: {batch_size: 4, steps: 4, lr: 0.003}\n"), "evalstop.yaml")
	if err != nil {
		t.Fatal(err)
	}
	plan := &wire.Plan{ID: 9}
	for s := range 2 {
		k, err := p2p.GenerateKey()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := p2p.PeerID(k)
		plan.Stages = append(plan.Stages, assign.Assignment{Stage: s, Peer: id.String()})
	}
	return plan, func(w *watchRun, plan *wire.Plan) error {
		_, err := watch(context.Background(), Options{Spec: sp, OutDir: out}, slog.New(slog.NewTextHandler(io.Discard, nil)), plan, w.reports, w.lost, w)
		return err
	}
}

func TestRunStoppedBeforeAStepsEvaluationResumesFromThatStep(t *testing.T) {
	out := t.TempDir()
	plan, run := pipePlan(t, out)

	w := newWatchRun()
	for step := 1; step <= 2; step++ {
		w.report(plan, wire.Report{Stage: 1, Kind: wire.ReportStep, Step: step, Loss: float64(step)})
	}
	w.report(plan, wire.Report{Stage: 0, Kind: wire.ReportStopping, Step: 2, Error: "node shutting down"})
	for s := range 2 {
		w.report(plan, wire.Report{Stage: s, Kind: wire.ReportError, Error: "node shutting down"})
	}
	if err := run(w, plan); !errors.Is(err, ErrRunFailed) {
		t.Fatalf("the stopped run's watch returned %v, want ErrRunFailed", err)
	}
	metricsPath := filepath.Join(out, train.MetricsFile)
	if got := recordedThrough(metricsPath); got != 2 {
		t.Fatalf("recorded through step %d after the stop, want 2", got)
	}

	resumed := *plan
	resumed.Resume = &wire.ResumePlan{Run: plan.ID, Step: 2}
	w = newWatchRun()
	w.report(&resumed, wire.Report{Stage: 1, Kind: wire.ReportEval, Step: 2, ValLoss: 2.5})
	for step := 3; step <= 4; step++ {
		w.report(&resumed, wire.Report{Stage: 1, Kind: wire.ReportStep, Step: step, Loss: float64(step)})
	}
	w.report(&resumed, wire.Report{Stage: 1, Kind: wire.ReportEval, Step: 4, ValLoss: 4.5})
	for s := range 2 {
		w.report(&resumed, wire.Report{Stage: s, Kind: wire.ReportDone})
	}
	if err := run(w, &resumed); err != nil {
		t.Fatal(err)
	}
	rows, err := metrics.ReadFile(metricsPath)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range rows {
		v := "-"
		if r.ValLoss != nil {
			v = fmt.Sprint(*r.ValLoss)
		}
		got = append(got, fmt.Sprintf("%d:%g:%s", r.Step, r.Loss, v))
	}
	if want := []string{"1:1:-", "2:2:2.5", "3:3:-", "4:4:4.5"}; !slices.Equal(got, want) {
		t.Errorf("metrics rows (step:loss:val) %v, want %v", got, want)
	}
}

// Every node stopping at once: each stage's reports (its last step) are queued before
// its connection closes, and the launcher takes them before it counts the node as
// gone, so the step the pipeline stopped after is recorded, whatever the order the
// launcher happens to see the two in.
func TestStoppedNodesLastReportsCountBeforeTheirDisconnect(t *testing.T) {
	for range 20 {
		out := t.TempDir()
		plan, run := pipePlan(t, out)
		w := newWatchRun()
		w.report(plan, wire.Report{Stage: 1, Kind: wire.ReportStep, Step: 1, Loss: 1})
		w.report(plan, wire.Report{Stage: 0, Kind: wire.ReportStopping, Step: 1, Error: "node shutting down"})
		w.report(plan, wire.Report{Stage: 0, Kind: wire.ReportError, Error: "node shutting down"})
		w.report(plan, wire.Report{Stage: 1, Kind: wire.ReportError, Error: "node shutting down"})
		for _, a := range plan.Stages {
			id, _ := peer.Decode(a.Peer)
			w.lost <- id
		}
		if err := run(w, plan); !errors.Is(err, ErrRunFailed) || !strings.Contains(err.Error(), "is stopping") {
			t.Fatalf("the stopped run's watch returned %v, want ErrRunFailed saying a node is stopping", err)
		}
		if got := recordedThrough(filepath.Join(out, train.MetricsFile)); got != 1 {
			t.Fatalf("recorded through step %d, want 1", got)
		}
	}
}
