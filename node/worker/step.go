package worker

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"

	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/stage"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/codec"
)

func (w *Worker) loop() error {
	if err := w.loadData(); err != nil {
		return err
	}
	if w.plan.Join != nil {
		if err := w.rejoin(); err != nil {
			return err
		}
	}
	w.lastSync = w.clock.Now()
	w.started0 = w.lastSync
	w.publish()
	if w.group != nil {
		go w.connectReplicas() // early, so the first outer step does not pay for the dials
	}
	w.ledger.Window.Lo, w.ledger.Window.Hi = wire.TimelineSteps(w.sp.Train.Steps)
	if err := w.handle(core.Start{}); err != nil {
		return err
	}
	w.ledger.Mark(w.clock.Since(w.started0), w.core.Waiting(), w.core.Step())
	// A run whose launcher is gone has no one to report to or to finish it: it stops
	// (keeping its checkpoint) unless the launcher can be reached again soon.
	// A neighbour's node going away stops this stage at once (the core decides whether
	// it still needs it); one that stays connected but silent is found by the core's
	// deadline, fed by ticks.
	watch := &network.NotifyBundle{DisconnectedF: func(n network.Network, c network.Conn) {
		p := c.RemotePeer()
		if p2p.Linked(n, p) {
			return
		}
		if p == w.launcher {
			go w.post(launcherLost{})
		}
		for s := range w.sp.Pipeline.Stages {
			if s != w.idx && w.peerOf(s) == p {
				go w.neighbourGone(s, p)
			}
		}
	}}
	w.host.Network().Notify(watch)
	defer w.host.Network().StopNotify(watch)
	ticks := w.clock.NewTicker(tickEvery)
	defer ticks.Stop()
	for !w.core.Finished() {
		select {
		case <-ticks.C():
			if err := w.handle(core.Tick{Now: w.clock.Since(w.started0), RTT: w.neighbourRTT(), Outer: w.outerAllow}); err != nil {
				return w.fail(err)
			}
		case <-w.ctx.Done():
			cause := context.Cause(w.ctx)
			<-w.idle // the job in progress finishes before the parameters are read
			if !w.stepped {
				return cause
			}
			// Keep what was trained: a stopped node loses only its in-flight work.
			if err := w.checkpoint(); err != nil {
				return errors.Join(cause, err)
			}
			return cause
		case e := <-w.events:
			var err error
			switch e := e.(type) {
			case frameIn:
				err = w.accept(e.f)
			case computeDone:
				if e.err != nil {
					return w.fail(e.err)
				}
				w.lossSum += e.loss
				err = w.handle(core.Done{})
			case reduceDone:
				err = w.reduced(e)
			case stopReq:
				w.stopping(e.cause)
			case cellMoved:
				w.moved(e)
			case launcherOrder:
				e.reply <- w.order(e)
			case launcherLost:
				if w.reaching.CompareAndSwap(false, true) { // one attempt at a time
					steps := max(1, w.core.Step())
					grace := max(5*time.Second, 3*w.clock.Since(w.started0)/time.Duration(steps))
					go func() {
						defer w.reaching.Store(false)
						w.reachLauncher(grace)
					}()
				}
			case core.Event:
				err = w.handle(e)
				if errors.Is(err, core.ErrStale) { // a norm resent or late
					w.log.Debug("stale event dropped", "err", err)
					err = nil
				}
			default:
				err = fmt.Errorf("worker: unknown event %T", e)
			}
			if err != nil {
				return w.fail(err)
			}
			w.ledger.Mark(w.clock.Since(w.started0), w.core.Waiting(), w.core.Step())
		}
	}
	w.cancel(nil) // stops the compute goroutine, which is idle: the core asks for nothing more
	<-w.idle
	if err := w.checkpoint(); err != nil {
		return err
	}
	w.report(wire.Report{Kind: wire.ReportDone, Checkpoint: w.checkpointPath(), Step: w.stepSentAt, BytesFwd: w.sent.act.Load(), BytesBwd: w.sent.grad.Load(),
		Time: w.stageTime()})
	w.log.Info("run finished", "checkpoint", w.checkpointPath(), "bytes_fwd", w.sent.act.Load(), "bytes_bwd", w.sent.grad.Load(), "bytes_eval", w.sent.eval.Load())
	return nil
}

// fail stops the stage on err and, once its compute has stopped, keeps what it
// trained: a stage stopped by an error (a neighbour gone, say) keeps its checkpoint as
// one stopped by its node does.
func (w *Worker) fail(err error) error {
	w.cancel(err)
	<-w.idle
	if w.stepped && !errors.Is(err, ErrCheckpointWrite) { // one that failed is not tried again
		if cerr := w.checkpoint(); cerr != nil {
			return errors.Join(err, cerr)
		}
	}
	return err
}

func (w *Worker) stageTime() *wire.StageTime {
	t := wire.NewStageTime(&w.ledger)
	t.Start = w.started0.UnixNano()
	return t
}

// accept files a frame that passed its checks and tells the core it is there. A
// duplicate or late frame (a resend, a neighbour behind) is dropped.
func (w *Worker) accept(f *p2p.Frame) error {
	k := [2]int{int(f.Step), int(f.Micro)}
	var m map[[2]int]*p2p.Frame
	var e core.Event
	switch f.Kind {
	case p2p.KindActivation:
		m, e = w.acts, core.ActivationIn{Step: k[0], Micro: k[1]}
	case p2p.KindGradient:
		m, e = w.grads, core.GradientIn{Step: k[0], Micro: k[1]}
	case p2p.KindEval:
		m, e = w.evals, core.EvalIn{Step: k[0], Batch: k[1]}
	default:
		return fmt.Errorf("frame of kind %d", f.Kind)
	}
	if _, dup := m[k]; dup {
		w.log.Debug("duplicate frame dropped", "kind", f.Kind, "step", k[0], "item", k[1])
		return nil
	}
	m[k] = f
	err := w.handle(e)
	if errors.Is(err, core.ErrStale) {
		delete(m, k)
		w.log.Debug("stale frame dropped", "err", err)
		return nil
	}
	return err
}

// handle feeds the core an event and carries out its actions. An event the core finds
// stale is returned as such (wrapping core.ErrStale) with nothing done.
func (w *Worker) handle(e core.Event) error {
	acts, err := w.core.Handle(e)
	if err != nil {
		return err
	}
	for _, a := range acts {
		if err := w.do(a); err != nil {
			return err
		}
	}
	if w.core.Stepping() && w.handSince.IsZero() && w.handStep != w.core.Step() {
		w.handSince = w.clock.Now()
	}
	return nil
}

// do carries out one action of the core. It is long because it is the table of every
// action the core can ask for, one case each, read in one place; the cases that grew
// past a few lines call methods of their own.
func (w *Worker) do(a core.Action) error {
	cfg := w.stage.Config
	switch a := a.(type) {
	case core.Forward:
		io := w.slotIO[a.Slot]
		var x []float32
		if w.stage.First {
			w.sampler.Next(io.tokens, io.targets)
			if w.cutSampler != nil && a.Micro == w.sp.Pipeline.MicroBatches-1 {
				st, err := w.sampler.AppendState(nil)
				if err != nil {
					return err
				}
				w.cutSampler[a.Step] = st
			}
		} else {
			f := w.take(w.acts, a.Step, a.Micro)
			copy(io.tokens, f.Tokens)
			copy(io.targets, f.Targets)
			x = w.inB.Decode(f.Data, io.tokens)
		}
		tp := w.tapes[a.Slot]
		scale := 1 / float32(w.sp.Pipeline.MicroBatches)
		w.submit(func() any {
			loaded := w.loadPast(a.Age)
			out := w.stage.Forward(tp, io.tokens, x)
			if loaded {
				copy(w.stage.Params, w.curParams)
			}
			if w.stage.Last {
				loss := w.stage.Loss(tp, io.targets, scale)
				if math.IsNaN(loss) || math.IsInf(loss, 0) {
					return computeDone{err: w.diverged(a.Step, fmt.Sprintf("the loss of micro-batch %d is %g", a.Micro, loss))}
				}
				return computeDone{loss: loss}
			}
			return computeDone{err: w.sendFinite(w.peerOf(w.idx+1), p2p.ProtoActivation, w.frame(p2p.KindActivation, a.Step, a.Micro, tp.B, tp.T, w.outB, out, io))}
		})
	case core.Backward:
		tp := w.tapes[a.Slot]
		var g []float32
		if !w.stage.Last {
			g = w.outB.DecodeGrad(w.take(w.grads, a.Step, a.Micro).Data, tp.B*tp.T)
		}
		w.submit(func() any {
			loaded := w.loadPast(a.Age)
			dx := w.stage.Backward(tp, g)
			if loaded {
				copy(w.stage.Params, w.curParams)
			}
			if a.Send {
				return computeDone{err: w.sendFinite(w.peerOf(w.idx-1), p2p.ProtoGradient, w.frame(p2p.KindGradient, a.Step, a.Micro, tp.B, tp.T, w.inB, dx, slotIO{}))}
			}
			return computeDone{}
		})
	case core.ShareNorm:
		// Compute is idle: the core asked for no job.
		ss := w.unit.GradSumSquares()
		if math.IsNaN(ss) || math.IsInf(ss, 0) {
			return w.diverged(a.Step, fmt.Sprintf("its gradients' sum of squares is %g", ss))
		}
		for i := range w.sp.Pipeline.Stages {
			if i != w.idx {
				w.out.control(w.peerOf(i), wire.Msg{Type: wire.MsgNorm, Run: w.plan.ID, Norm: &wire.Norm{Step: a.Step, Stage: w.idx, SumSq: ss}})
			}
		}
		return w.handle(core.NormIn{Step: a.Step, Stage: w.idx, SumSq: ss})
	case core.Optimize:
		if !w.handSince.IsZero() {
			w.handWaited += w.clock.Since(w.handSince)
			w.handSteps++
			w.handSince, w.handStep = time.Time{}, a.Step
		}
		w.stepped = true
		lr := w.sched.At(a.Step - 1)
		w.lastNorm = a.Norm
		clip := w.sp.Train.GradClip
		if a.Own {
			// No norm exchanged; reporting this stage's own would misname it.
			w.lastNorm = 0
			clip := train.AsyncClip(w.sp)
			w.submit(func() any {
				w.unit.Update(math.Sqrt(w.unit.GradSumSquares()), clip, lr)
				w.stage.ZeroGrads()
				w.doneStep = a.Step
				return computeDone{}
			})
			return nil
		}
		w.submit(func() any {
			w.unit.Update(a.Norm, clip, lr)
			w.stage.ZeroGrads()
			w.doneStep = a.Step // read by the loop after this job's result, or once compute has stopped
			return computeDone{}
		})
	case core.EvalForward:
		seq := cfg.SeqLen
		b := min(train.EvalBatch, w.windows-a.Batch*train.EvalBatch)
		io := slotIO{make([]int32, b*seq), make([]int32, b*seq)}
		var x []float32
		if w.stage.First {
			for i := range b {
				data.ValWindow(w.val, seq, a.Batch*train.EvalBatch+i, io.tokens[i*seq:(i+1)*seq], io.targets[i*seq:(i+1)*seq])
			}
		} else {
			f := w.take(w.evals, a.Step, a.Batch)
			io = slotIO{f.Tokens, f.Targets}
			x = w.inB.Decode(f.Data, io.tokens)
		}
		w.submit(func() any {
			tp := w.eval.Tapes(b)[0]
			out := w.stage.Forward(tp, io.tokens, x)
			if w.stage.Last {
				loss := w.stage.Loss(tp, io.targets, 1) * float64(b)
				if math.IsNaN(loss) || math.IsInf(loss, 0) {
					return computeDone{err: w.diverged(a.Step, fmt.Sprintf("the validation loss of batch %d is %g", a.Batch, loss))}
				}
				return computeDone{loss: loss}
			}
			return computeDone{err: w.sendFinite(w.peerOf(w.idx+1), p2p.ProtoActivation, w.frame(p2p.KindEval, a.Step, a.Batch, b, seq, w.outB, out, io))}
		})
	case core.StepDone:
		if w.stage.Last {
			// Summed and divided as the single-process trainer does, so the figures match.
			loss := w.lossSum / float64(w.sp.Pipeline.MicroBatches)
			w.report(wire.Report{Kind: wire.ReportStep, Step: a.Step, Loss: loss, GradNorm: w.lastNorm,
				LR: float64(w.sched.At(a.Step - 1))})
			if !math.IsNaN(loss) && !math.IsInf(loss, 0) { // JSON has no NaN; the report says what went wrong
				w.lastLoss = loss
				w.curve.Add(a.Step, loss)
			}
		}
		w.lossSum = 0
		if err := w.stepTaken(a.Step); err != nil {
			return err
		}
		// The step's frames are all sent: the next stage had its activations and the
		// previous one its gradients before the step's norms were exchanged.
		w.stepSent, w.stepSentAt = [2]int64{w.sent.act.Load(), w.sent.grad.Load()}, a.Step
		w.stepTimes = append(w.stepTimes, w.clock.Now())
		if len(w.stepTimes) > tokensWindow+1 {
			w.stepTimes = w.stepTimes[1:]
		}
		w.publish()
		if w.stopCause != nil && a.Step >= w.stopAt {
			w.log.Info("step finished; stopping", "step", a.Step)
			w.cancel(w.stopCause)
		}
	case core.Checkpoint:
		// Every stage checkpoints the same steps, so a crash loses at most the steps
		// since; the last step's checkpoint is written when the run finishes.
		return w.checkpoint()
	case core.StartReduce:
		w.startReduce(a)
	case core.ApplyOuter:
		return w.applyOuter(a)
	case core.OuterDone:
		w.finishOuter(a.Step)
	case core.EvalDone:
		if w.stage.Last {
			v := w.lossSum / float64(w.windows)
			w.report(wire.Report{Kind: wire.ReportEval, Step: a.Step, ValLoss: v})
			if !math.IsNaN(v) && !math.IsInf(v, 0) {
				w.valLoss = v
				w.publish()
			}
		}
		w.lossSum = 0
	case core.Finished:
	case core.Stalled:
		return w.stalled(a)
	default:
		return fmt.Errorf("unknown action %T", a)
	}
	return nil
}

// loadPast makes the stage compute on its weights of age updates ago (an async
// run's past version; 0: the current ones, nothing done), keeping the current ones
// in curParams for the caller to put back. It runs in the compute job.
func (w *Worker) loadPast(age int) bool {
	if age == 0 {
		return false
	}
	copy(w.curParams, w.stage.Params)
	copy(w.stage.Params, w.unit.Past(age))
	return true
}

func (w *Worker) submit(job func() any) {
	select {
	case w.jobs <- job:
	case <-w.ctx.Done():
	}
}

func (w *Worker) take(m map[[2]int]*p2p.Frame, step, i int) *p2p.Frame {
	k := [2]int{step, i}
	f := m[k]
	delete(m, k)
	return f
}

// frame builds the frame that carries x (a stage's output, or the gradient of its
// input when kind is KindGradient) across boundary b: compressed into the run's
// subspace and encoded with its codec for that direction. The frame owns its data.
func (w *Worker) frame(kind p2p.Kind, step, micro, batch, t int, b *stage.Boundary, x []float32, io slotIO) *p2p.Frame {
	fwd, bwd := b.Codecs()
	var data []float32
	c := fwd
	if kind == p2p.KindGradient {
		data, c = b.EncodeGrad(x, batch*t), bwd
	} else {
		data = b.Encode(x, io.tokens)
	}
	f := &p2p.Frame{Kind: kind, Run: w.plan.ID, Step: uint32(step), Micro: uint32(micro),
		Shape: []uint32{uint32(batch), uint32(t), uint32(b.Width())}, Codec: c, Data: append([]float32(nil), data...)}
	if io.tokens != nil {
		f.Tokens = append([]int32(nil), io.tokens...)
		f.Targets = append([]int32(nil), io.targets...)
	}
	return f
}

// sendFinite queues f for to, unless a value of it would arrive non-finite: then
// this stage has diverged, and it says so instead of sending (a neighbour would
// rightly count a non-finite frame as a violation).
func (w *Worker) sendFinite(to peer.ID, proto protocol.ID, f *p2p.Frame) error {
	if i := f.Codec.FirstNonFinite(f.Data); i >= 0 {
		return w.diverged(int(f.Step), fmt.Sprintf("the %v values for micro-batch %d it was to send are not finite in %v (value %d is %g); nothing sent",
			f.Kind, f.Micro, f.Codec, i, f.Data[i]))
	}
	w.out.send(to, proto, f)
	return nil
}

// diverged is the error of a stage whose own computation went non-finite at step.
// It is not a peer's fault: the run stops, and says why.
func (w *Worker) diverged(step int, what string) error {
	return fmt.Errorf("%w at step %d on %s: %s; try a lower train.lr", wire.ErrDiverged, step, wire.CellName(w.sp, w.self), what)
}

// expect is what a valid incoming frame of kind looks like for this stage.
func (w *Worker) expect(kind p2p.Kind, micro int) p2p.Expect {
	cfg := w.stage.Config
	b := w.sp.Train.BatchSize / w.sp.Pipeline.MicroBatches
	if kind == p2p.KindEval {
		b = max(0, min(train.EvalBatch, w.windows-micro*train.EvalBatch))
	}
	// Activations come over the boundary with the previous stage, gradients over the
	// one with the next; from() has already refused a frame from anyone else.
	bd := w.inB
	if kind == p2p.KindGradient {
		bd = w.outB
	}
	var width int
	var c codec.Spec
	if bd != nil {
		fwd, bwd := bd.Codecs()
		width, c = bd.Width(), fwd
		if kind == p2p.KindGradient {
			c = bwd
		}
	}
	return p2p.Expect{Run: w.plan.ID, Kind: kind, Shape: []uint32{uint32(b), uint32(cfg.SeqLen), uint32(width)},
		Tokens: kind != p2p.KindGradient, Vocab: cfg.Vocab, Codec: c}
}

// from says which peer may send frames of kind to this stage.
func (w *Worker) from(kind p2p.Kind) (peer.ID, bool) {
	if kind == p2p.KindGradient {
		if w.stage.Last {
			return "", false
		}
		return w.peerOf(w.idx + 1), true
	}
	if w.stage.First {
		return "", false
	}
	return w.peerOf(w.idx - 1), true
}

// redialWithin bounds the one attempt to reach a neighbour whose last connection
// closed before it counts as down.
const redialWithin = 2 * time.Second

// neighbourGone tells the core that stage s's node p is down, unless it answers at
// once over a new connection: a node killed and started again at its address (a
// pause's resume) leaves its peers QUIC connections to the old process, which are
// reset only when they next carry something, perhaps in the resumed run.
func (w *Worker) neighbourGone(s int, p peer.ID) {
	ctx, cancel := context.WithTimeout(w.ctx, redialWithin)
	defer cancel()
	if w.host.Redial(ctx, p) == nil && roundTrip(ctx, w.host.Host, p) == nil {
		w.log.Info("a neighbour's connection closed; reconnected", "stage", s, "node", p)
		return
	}
	w.post(core.PeerDown{Stage: s})
}
