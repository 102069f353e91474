package worker

import (
	"errors"
	"fmt"
	"time"

	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/status"
	"github.com/pipeswarm/pipeswarm/node/wire"
)

func (w *Worker) report(r wire.Report) {
	r.Run, r.Stage, r.Replica, r.Peer = w.plan.ID, w.idx, w.rep, w.host.ID().String()
	if w.plan.Join != nil {
		r.Join = w.plan.Join.Nonce
	}
	w.out.control(w.launcher, wire.Msg{Type: wire.MsgReport, Run: w.plan.ID, Report: &r})
}

// tokensWindow is how many recent steps tokens/s is measured over.
const tokensWindow = 10

// baseView is what the status page shows of the stage before it has taken a step.
func (w *Worker) baseView() status.Run {
	return status.Run{Run: fmt.Sprintf("%016x", w.plan.ID), Name: w.sp.Name, Stage: w.idx, Stages: w.sp.Pipeline.Stages,
		Replica: w.rep, Replicas: w.sp.Pipeline.Replicas, State: status.RunAccepted, Steps: w.sp.Train.Steps}
}

// publish makes what the loop knows of the stage's progress visible to the status
// page. Only the loop calls it.
func (w *Worker) publish() {
	r := w.baseView()
	r.State = status.RunRunning
	r.Started = w.started0
	r.Step = w.doneStep
	r.Loss, r.ValLoss, r.LossCurve = w.lastLoss, w.valLoss, w.curve.Points()
	if n := len(w.stepTimes); n > 1 {
		if dt := w.stepTimes[n-1].Sub(w.stepTimes[0]).Seconds(); dt > 0 {
			r.TokensPerS = float64(w.sp.TokensPerStep()*(n-1)) / dt
		}
	}
	r.ComputeS = w.ledger.Total[core.Computing].Seconds()
	r.Updated = time.Now()
	w.view.Store(&r)
}

// FinalView is how the stage ended, for the status page; call it once done is
// closed (it reads err).
func (w *Worker) FinalView() status.Run {
	r := w.StatusView()
	switch {
	case w.err == nil:
		r.State = status.RunFinished
	case errors.Is(w.err, ErrIdle):
		r.State, r.Error = status.RunIdle, w.err.Error()
	default:
		r.State, r.Error = status.RunStopped, w.err.Error()
	}
	r.Updated = time.Now()
	return r
}

// StatusView is the stage as the status page shows it: as last published, with its
// byte counts as of now.
func (w *Worker) StatusView() status.Run {
	r := w.baseView()
	if v := w.view.Load(); v != nil {
		r = *v
	}
	r.BytesIn = w.recvd.total()
	r.BytesOut = w.sent.total()
	return r
}
