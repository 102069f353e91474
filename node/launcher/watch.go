package launcher

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/node/membership"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p/clock"
)

// runNodes is what watch does to a run's nodes, as membership decides. Each method
// returns at once (its calls go on on goroutines of their own) except join; answers
// that come later are posted as events, which post drops once watch has returned.
type runNodes interface {
	abort(reason string)
	idle(a membership.Idle)
	drop(d membership.Drop)
	askOffer(q membership.AskOffer, post func(membership.Event))
	// join carries out a rejoin, from the watch loop, returning its nonce.
	join(j membership.SignJoin) (uint64, error)
	checkpoint(step int, post func(membership.Event))
	recorded(step int)
	stopAt(r, step int, reason string)
	// up reports whether the node of cell (stage, replica) is connected.
	up(stage, replica int) bool
	// newcomers are the nodes that might take a cell.
	newcomers() []membership.Candidate
}

// watch turns a run's reports into metrics until it ends, as a membership.Run decides
// (see that package for how a run goes on with broken, lagging, stopping and
// rejoining replica pipelines); it does what the Run asks: calls to the nodes, rows
// written, the loss plot at the end.
func watch(ctx context.Context, o Options, log *slog.Logger, plan *wire.Plan, reports <-chan wire.Report, lost <-chan peer.ID, nodes runNodes) (*Result, error) {
	sp := o.Spec
	o.Clock = clock.Or(o.Clock)
	w := &watcher{o: o, log: log, plan: plan, nodes: nodes, answers: make(chan membership.Event, 64), quit: make(chan struct{})}
	defer close(w.quit)
	if err := w.open(); err != nil {
		return nil, err
	}
	defer w.mw.Close()
	cfg := membership.Config{Stages: sp.Pipeline.Stages, Replicas: sp.Pipeline.Replicas, Steps: sp.Train.Steps, EvalInterval: sp.EvalInterval,
		TokensPerStep: int64(sp.TokensPerStep()), InnerSteps: sp.DiLoCo.InnerSteps, CheckpointInterval: sp.CheckpointInterval,
		CheckpointEvery: time.Duration(sp.CheckpointSeconds) * time.Second, StaffTimeout: time.Duration(sp.Pipeline.StaffTimeout) * time.Second,
		Rejoinable: sp.Pipeline.Replicas > 1 && sp.DiLoCo.Fragments == 1, Trail: train.Trail(sp)}
	for _, a := range plan.Stages {
		cfg.Cells = append(cfg.Cells, membership.Cell{Stage: a.Stage, Replica: a.Replica, Peer: a.Peer, Need: a.Need})
	}
	if w.kept != nil {
		cfg.Resumed, cfg.FromStep, cfg.Tokens = true, plan.Resume.Step, w.kept.tokens
		cfg.Elapsed = time.Duration(w.kept.elapsedS * float64(time.Second))
		cfg.Unevaluated = w.again
	}
	run, err := membership.New(cfg, o.Clock.Now())
	if err != nil {
		return nil, err
	}
	// A run that ends with a step's evaluation still to come records the step without
	// it: every stage holds that step's checkpoint (stages stop right after a step), and
	// a resumed run evaluates it again first (core.Config.EvalFrom) and fills it in.
	defer func() {
		for _, s := range run.Unevaluated() {
			if err := w.mw.Write(s); err != nil {
				log.Warn("a step's row was not recorded", "step", s.Step, "err", err)
			}
		}
	}()
	w.run, w.res = run, newResult(plan.ID, cfg.Stages, cfg.Replicas)
	w.res.FromStep = cfg.FromStep // what stages say as they end is counted from it
	// However the run ends, its figures are known.
	defer w.tally()
	check := o.Clock.NewTicker(time.Second)
	defer check.Stop()
	// A node's reports are queued before it has their replies, hence before its
	// connection can close: a lost node waits here until the reports queued when it was
	// lost are taken, so that its last ones (the step it stopped after) count first.
	type lostNode struct {
		id    peer.ID
		after int // reports still to take before it
	}
	var gone []lostNode
	for {
		var e membership.Event
		w.cur = wire.Report{}
		if len(gone) > 0 && gone[0].after <= 0 {
			e, gone = membership.PeerLost{Peer: gone[0].id.String()}, gone[1:]
			if over, err := w.handle(e); over {
				return w.res, err
			}
			continue
		}
		select {
		case <-ctx.Done():
			e = membership.Interrupted{}
		case e = <-w.answers:
		case id := <-lost:
			gone = append(gone, lostNode{id, len(reports)})
			continue
		case <-check.C():
			if cfg.Rejoinable {
				if over, err := w.handle(membership.NewcomersHeard{Candidates: nodes.newcomers()}); over {
					return w.res, err
				}
			}
			e = membership.Tick{}
		case r := <-reports:
			for i := range gone {
				gone[i].after--
			}
			if e = w.event(r); e == nil {
				continue
			}
			w.cur = r
		}
		if over, err := w.handle(e); over {
			if errors.Is(err, errInterrupted) {
				err = ctx.Err()
			}
			return w.res, err
		}
	}
}

var errInterrupted = errors.New("interrupted")

// watcher is watch's state: what it writes, and what it is handling.
type watcher struct {
	o       Options
	log     *slog.Logger
	plan    *wire.Plan
	nodes   runNodes
	run     *membership.Run
	res     *Result
	mw      *metrics.Writer
	kept    *keptRows
	again   []metrics.Step // kept rows whose evaluation the resumed run runs again
	history []metrics.Step // replica 0's rows, for the loss plot
	cur     wire.Report    // the report being handled
	answers chan membership.Event
	quit    chan struct{}
}

// open writes the run's spec and starts its metrics.jsonl: a resumed run keeps the
// rows of the steps it continues from, and only those.
func (w *watcher) open() error {
	out, sp := w.o.OutDir, w.o.Spec
	if err := os.WriteFile(filepath.Join(out, train.SpecFile), []byte(sp.String()), 0o644); err != nil {
		return fmt.Errorf("launch: %w", err)
	}
	if w.plan.Resume != nil {
		var err error
		if w.kept, err = readKeptRows(filepath.Join(out, train.MetricsFile), w.plan.Resume.Step); err != nil {
			return err
		}
	}
	mw, err := metrics.Create(filepath.Join(out, train.MetricsFile))
	if err != nil {
		return err
	}
	w.mw = mw
	if w.kept != nil {
		for _, row := range w.kept.rows {
			if st, ok := evalRow(row, w.plan.Resume.Step, sp); ok {
				w.again = append(w.again, *st) // written with its validation loss, evaluated again
				continue
			}
			if err := mw.WriteRaw(row); err != nil {
				mw.Close()
				return err
			}
		}
		for _, s := range w.kept.steps {
			if (s.Replica == nil || *s.Replica == 0) && !slices.ContainsFunc(w.again, func(a metrics.Step) bool { return a.Step == s.Step }) {
				w.history = append(w.history, s)
			}
		}
	}
	return nil
}

// post hands the watch loop an answer that came later, unless it has returned.
func (w *watcher) post(e membership.Event) {
	select {
	case w.answers <- e:
	case <-w.quit:
	}
}

// event is report r as the Run takes it; nil for none.
func (w *watcher) event(r wire.Report) membership.Event {
	f := membership.From{Stage: r.Stage, Replica: r.Replica, Peer: r.Peer, Join: r.Join}
	switch r.Kind {
	case wire.ReportStep:
		return membership.StepTaken{From: f, Step: r.Step, Loss: r.Loss, LR: r.LR, GradNorm: r.GradNorm}
	case wire.ReportEval:
		return membership.Evaluated{From: f, Step: r.Step, ValLoss: r.ValLoss}
	case wire.ReportOuter:
		if r.Outer == nil {
			return nil
		}
		e := membership.OuterTaken{From: f, Step: r.Step, OuterStep: r.Outer.OuterStep, Hash: r.Outer.Hash, SyncBytes: r.Outer.SyncBytes,
			SyncS: r.Outer.SyncS, Contributors: r.Outer.Contributors, Fetched: r.Outer.Fetched}
		for _, m := range r.Outer.Missing {
			e.Missing = append(e.Missing, membership.Missing{Replica: m, Up: w.nodes.up(r.Stage, m)})
		}
		return e
	case wire.ReportDone:
		return membership.StageDone{From: f}
	case wire.ReportStopping:
		return membership.Stopping{From: f, Step: r.Step}
	case wire.ReportIdle, wire.ReportError:
		return membership.StageStopped{From: f, Failed: r.Kind == wire.ReportError, Error: r.Error, Diverged: r.Diverged, CheckpointFailed: r.CheckpointFailed}
	}
	return nil
}

// handle gives the Run e and does what it asks, in order; over says the run has
// ended, with err its error.
func (w *watcher) handle(e membership.Event) (over bool, err error) {
	for _, a := range w.run.Handle(w.o.Clock.Now(), e) {
		if over, err := w.do(a); over {
			return true, err
		}
	}
	return false, nil
}

func (w *watcher) do(a membership.Action) (over bool, err error) {
	switch a := a.(type) {
	case membership.Log:
		w.log.Log(context.Background(), a.Level, a.Msg, a.Args...)
	case membership.Abort:
		w.nodes.abort(a.Reason)
	case membership.Idle:
		w.nodes.idle(a)
	case membership.Drop:
		w.nodes.drop(a)
	case membership.AskOffer:
		w.nodes.askOffer(a, w.post)
	case membership.SignJoin:
		nonce, err := w.nodes.join(a)
		return w.handle(membership.JoinDone{Replica: a.Replica, Nonce: nonce, Err: err})
	case membership.OrderCheckpoint:
		w.nodes.checkpoint(a.Step, w.post)
	case membership.TellRecorded:
		w.nodes.recorded(a.Step)
	case membership.StopAt:
		w.nodes.stopAt(a.Replica, a.Step, a.Reason)
	case membership.WriteStep:
		if err := w.mw.Write(a.Row); err != nil {
			return true, err
		}
		if w.o.OnStep != nil {
			w.o.OnStep(a.Row)
		}
		if a.Row.Replica == nil || *a.Row.Replica == 0 {
			w.history = append(w.history, a.Row) // the plot follows replica 0, which also carries validation
		}
	case membership.WriteOuter:
		if err := w.mw.WriteOuter(a.Row); err != nil {
			return true, err
		}
	case membership.OuterComplete:
		if w.o.OnOuter != nil {
			w.o.OnOuter(a.Rows)
		}
	case membership.KeepEnd:
		if r := w.cur; r.Stage == a.Stage && r.Replica == a.Replica {
			if r.Kind == wire.ReportDone && r.Time != nil {
				t := *r.Time
				t.Stage, t.Replica = r.Stage, r.Replica
				w.res.Times = append(w.res.Times, t)
			}
			w.res.stageEnded(r)
		}
	case membership.Finish:
		w.plot()
		return true, w.finish(a)
	}
	return false, nil
}

func (w *watcher) finish(a membership.Finish) error {
	switch a.Outcome {
	case membership.RunFailed:
		return fmt.Errorf("%w: %s", ErrRunFailed, a.Why)
	case membership.RunDown:
		return fmt.Errorf("%w: %w: %s", ErrRunFailed, ErrStageDown, a.Why)
	case membership.RunDiverged:
		return fmt.Errorf("%w: %w", ErrRunFailed, &divergedErr{a.Why})
	case membership.RunInterrupted:
		return errInterrupted
	}
	return nil
}

func (w *watcher) plot() {
	if len(w.history) > 0 {
		if err := metrics.PlotLoss(filepath.Join(w.o.OutDir, train.PlotFile), w.o.Spec.Name, w.history); err != nil {
			w.log.Warn("no loss plot", "err", err)
		}
	}
}

// tally copies the Run's figures into the result.
func (w *watcher) tally() {
	t, res := w.run.Tally(w.o.Clock.Now()), w.res
	res.FromStep, res.Steps, res.Loss, res.ValLoss = t.FromStep, t.Steps, t.Loss, t.ValLoss
	res.StepsRun, res.Tokens, res.TokensRun, res.OuterSteps = t.StepsRun, t.Tokens, t.TokensRun, t.OuterSteps
	res.SyncBytes, res.Broken, res.Rejoined, res.Repaired = t.SyncBytes, t.Broken, t.Rejoined, t.Repaired
	res.Elapsed, res.TimeRun = t.Elapsed, t.TimeRun
}
