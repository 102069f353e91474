package worker

import (
	"errors"
	"fmt"
	"time"

	"github.com/pipeswarm/pipeswarm/node/ckpt"
	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/wire"
)

// ErrStopped is the cause of a stage the launcher stopped after a step: another
// stage's node of its pipeline was stopping.
var ErrStopped = errors.New("stopped by the launcher")

// stopAfter stops the stage once step is done (at once if it is), keeping its
// checkpoint of that step.
func (w *Worker) stopAfter(step int, cause error) error {
	w.log.Info("stopping after a step, as the launcher says", "step", step, "reason", cause)
	if step <= w.ckStep {
		if step < w.ckStep {
			w.log.Warn("told to stop after a step already done; stopping now", "step", step, "done", w.ckStep)
		}
		w.cancel(cause)
		return nil
	}
	w.stopCause, w.stopAt = cause, step
	w.clock.AfterFunc(stopBackstop, func() { w.cancel(cause) })
	return nil
}

// order carries out what the launcher says of checkpoints and stopping.
func (w *Worker) order(e launcherOrder) error {
	switch e.kind {
	case wire.MsgCheckpoint:
		if err := w.handle(core.CheckpointAt{Step: e.step}); err != nil {
			w.log.Warn("checkpoint ordered too late", "err", err)
			return err
		}
		w.log.Debug("checkpoint ordered", "step", e.step)
	case wire.MsgRecorded:
		if n := ckpt.Prune(w.dir, ckpt.Base(w.idx, w.rep, w.sp.Pipeline.Replicas), e.step); n > 0 {
			w.log.Debug("older checkpoints removed: the launcher has recorded the run up to a later one", "step", e.step, "removed", n)
		}
	case wire.MsgStopAt:
		if w.stopCause != nil {
			return nil // stopping already, of its own accord
		}
		cause := fmt.Errorf("%w after step %d: %s", ErrStopped, e.step, e.reason)
		if w.sp.Pipeline.Replicas > 1 {
			cause = fmt.Errorf("%w: replica pipeline %d: %w", ErrIdle, w.rep, cause) // the run goes on without it
		}
		return w.stopAfter(e.step, cause)
	}
	return nil
}

// stepTaken records what a checkpoint of step needs besides the parameters and the
// optimiser state, as they are at the step's end.
func (w *Worker) stepTaken(step int) error {
	w.ckStep = step
	if st, ok := w.cutSampler[step]; ok {
		w.ckSampler = append(w.ckSampler[:0], st...)
		delete(w.cutSampler, step)
	} else if w.sampler != nil {
		st, err := w.sampler.AppendState(w.ckSampler[:0])
		if err != nil {
			return err
		}
		w.ckSampler = st
	}
	w.unit.Mark()
	return nil
}

// Stop stops the run with cause, letting the loop finish a step in hand first.
// A backstop cancels it regardless, within the time the daemon waits for its runs.
func (w *Worker) Stop(cause error) {
	select {
	case <-w.started:
		select {
		case w.events <- stopReq{cause}:
			w.clock.AfterFunc(stopBackstop, func() { w.cancel(cause) })
			return
		default:
		}
	default:
	}
	w.cancel(cause)
}

// tickEvery is how often the core is told the time: the resolution of its deadlines.
const tickEvery = 100 * time.Millisecond

// ErrStalled stops a stage that cannot go on: a neighbour silent past the deadline
// measured for it, or gone.
var ErrStalled = errors.New("stalled")

// neighbourRTT is the longest round trip to another stage of this pipeline that libp2p
// has measured (identify and ping keep the estimates), 0 if none yet.
func (w *Worker) neighbourRTT() time.Duration {
	var rtt time.Duration
	for s := range w.sp.Pipeline.Stages {
		if s != w.idx {
			rtt = max(rtt, w.host.Peerstore().LatencyEWMA(w.peerOf(s)))
		}
	}
	return rtt
}

// stalled turns the core's verdict into the run's error, naming the stage and the
// node it waited for.
func (w *Worker) stalled(a core.Stalled) error {
	p := w.peerOf(a.Stage)
	var err error
	if a.Down {
		err = fmt.Errorf("%w: stage %d's node %s is unreachable (this stage was at step %d, waiting for %s)", ErrStalled, a.Stage, p, a.Step, a.Wait)
	} else {
		what := map[core.Wait]string{core.WaitActivation: "no activation", core.WaitGradient: "no gradient", core.WaitNorm: "no gradient norm", core.WaitBubble: "no gradient norm"}[a.Wait]
		if what == "" {
			what = "nothing"
		}
		err = fmt.Errorf("%w: stage %d (node %s) sent %s for step %d in %s (deadline %s, from the steps measured here)",
			ErrStalled, a.Stage, p, what, a.Step, a.Waited.Round(time.Millisecond), a.Deadline.Round(time.Millisecond))
	}
	if w.sp.Pipeline.Replicas > 1 {
		// The replica pipeline is broken, the run is not.
		err = fmt.Errorf("%w: replica pipeline %d: %w", ErrIdle, w.rep, err)
	}
	return err
}

// stopBackstop bounds how long a stopping stage may take to finish its step.
const stopBackstop = 8 * time.Second

// stopping decides, in the loop, when a stage asked to stop does: at once, or, if the
// step in progress is the others' to finish (core.Stepping: its norm is shared, or
// without clipping its forwards are all out; another stage may already have stepped),
// once the step is done or after a grace of four times the mean wait from then to the
// optimiser step, plus a second, at most 6 s: stages stopped together then keep
// checkpoints of one step.
func (w *Worker) stopping(cause error) {
	if w.core.Finished() {
		w.cancel(cause)
		return
	}
	// The launcher stops the other stages after the same step, so that all of them
	// hold its checkpoint: this one's step in hand once it is the others' to finish
	// (they may have stepped it), else the last one done (none can step past it
	// without this stage).
	at := w.ckStep
	if w.core.Stepping() {
		at = w.core.Step()
	}
	w.report(wire.Report{Kind: wire.ReportStopping, Step: at, Error: cause.Error()})
	if !w.core.Stepping() {
		w.stopCause = cause
		w.cancel(cause)
		return
	}
	grace := time.Second
	if w.handSteps > 0 {
		grace += 4 * w.handWaited / time.Duration(w.handSteps)
	}
	grace = min(grace, 6*time.Second)
	w.stopCause, w.stopAt = cause, w.core.Step()
	w.log.Info("stopping after the step in hand", "step", w.stopAt, "grace", grace.Round(time.Millisecond))
	w.clock.AfterFunc(grace, func() { w.cancel(cause) })
}
