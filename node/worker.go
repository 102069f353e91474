package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/optim"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/codec"
	"github.com/pipeswarm/pipeswarm/shard"
)

// worker trains one stage of one run. Its loop goroutine owns the core and every
// field below except those the compute goroutine is handed inside a job.
type worker struct {
	host     *p2p.Host
	log      *slog.Logger
	plan     *Plan
	sp       *spec.Spec
	idx      int // this stage
	self     assign.Assignment
	launcher peer.ID
	dir      string // run directory for the stage checkpoint

	stage  *shard.Stage
	inB    *train.Boundary // with the previous stage (nil on stage 0)
	outB   *train.Boundary // with the next stage (nil on the last)
	opt    *optim.AdamW
	sched  optim.Cosine
	core   *core.Core
	tapes  []*shard.Tape // per slot
	slotIO []slotIO      // tokens and targets of the micro-batch in each slot
	eval   *train.Evaluator

	sampler *data.Sampler // stage 0
	val     []byte        // stage 0: validation split
	evalN   int           // validation batches
	windows int

	acts, grads, evals map[[2]int]*p2p.Frame // inputs waiting for the core to schedule them
	lossSum            float64               // this step's micro-batch losses, then its evaluation's
	lastNorm           float64

	events chan any
	jobs   chan func() any
	out    *outbox
	sent   sentBytes

	ctx       context.Context
	cancel    context.CancelCauseFunc
	startOnce sync.Once
	started   chan struct{} // closed when the loop starts
	idle      chan struct{} // closed when the compute goroutine has returned
	stepped   bool          // an optimiser step has been taken: there is something to keep
	done      chan struct{} // closed when the loop has returned and the outbox drained
	err       error
}

type slotIO struct{ tokens, targets []int32 }

// Events the loop takes besides core events.
type (
	frameIn     struct{ f *p2p.Frame }
	computeDone struct {
		loss float64 // forward on the last stage: this micro-batch's loss
		err  error
	}
)

func newWorker(ctx context.Context, h *p2p.Host, log *slog.Logger, plan *Plan, sp *spec.Spec, idx int, runDir string) (*worker, error) {
	cfg := train.ModelConfig(sp)
	self := plan.Stages[idx]
	st, err := shard.NewStage(cfg, self.Range, idx == 0, idx == len(plan.Stages)-1)
	if err != nil {
		return nil, err
	}
	st.Init(sp.Seed)
	sub, err := train.RunSubspace(sp)
	if err != nil {
		return nil, err
	}
	if sub != nil {
		if err := st.SetSubspace(sub, sp.Compression.DenseTail); err != nil {
			return nil, err
		}
	}
	var inB, outB *train.Boundary
	if idx > 0 {
		if inB, err = train.NewBoundary(sp, sub); err != nil {
			return nil, err
		}
	}
	if idx < len(plan.Stages)-1 {
		if outB, err = train.NewBoundary(sp, sub); err != nil {
			return nil, err
		}
	}
	opt, err := optim.NewAdamW(len(st.Params), train.AdamWConfig(sp, st))
	if err != nil {
		return nil, err
	}
	launcher, err := peer.Decode(plan.Launcher)
	if err != nil {
		return nil, fmt.Errorf("plan: launcher %q: %w", plan.Launcher, err)
	}
	w := &worker{host: h, log: log.With("run", fmt.Sprintf("%016x", plan.ID), "stage", idx), plan: plan, sp: sp, idx: idx,
		self: self, launcher: launcher, dir: runDir, stage: st, inB: inB, outB: outB, opt: opt,
		sched: optim.Cosine{Peak: float32(sp.Train.LR), Min: float32(sp.Train.MinLR), Warmup: sp.Train.Warmup, Total: sp.Train.Steps},
		acts:  map[[2]int]*p2p.Frame{}, grads: map[[2]int]*p2p.Frame{}, evals: map[[2]int]*p2p.Frame{},
		events: make(chan any, 1024), jobs: make(chan func() any), started: make(chan struct{}), idle: make(chan struct{}), done: make(chan struct{})}

	// Every stage needs the number of validation batches; stage 0 also the text.
	text, name, err := train.Corpus(sp.Data.Path)
	if err != nil {
		return nil, err
	}
	trainText, val := data.Split(text, sp.Data.ValFraction)
	w.windows = data.ValWindows(val, cfg.SeqLen)
	w.evalN = (w.windows + train.EvalBatch - 1) / train.EvalBatch
	if idx == 0 {
		if w.sampler, err = data.NewSampler(trainText, cfg.SeqLen, sp.Seed, 0); err != nil {
			return nil, err
		}
		w.val = val
		w.log.Info("data", "corpus", name, "train_bytes", len(trainText), "val_windows", w.windows)
	}
	cc := core.Config{Stage: idx, Stages: len(plan.Stages), MicroBatches: sp.Pipeline.MicroBatches,
		Steps: sp.Train.Steps, EvalInterval: sp.EvalInterval, EvalBatches: w.evalN}
	if w.core, err = core.New(cc); err != nil {
		return nil, err
	}
	mb := sp.Train.BatchSize / sp.Pipeline.MicroBatches
	for range cc.Slots() {
		w.tapes = append(w.tapes, st.NewTape(mb, cfg.SeqLen))
		w.slotIO = append(w.slotIO, slotIO{make([]int32, mb*cfg.SeqLen), make([]int32, mb*cfg.SeqLen)})
	}
	w.eval = train.NewEvaluator([]*shard.Stage{st}, val)
	w.eval.Reuse(w.tapes[:1])
	w.ctx, w.cancel = context.WithCancelCause(ctx)
	w.out = newOutbox(h, w.log, &w.sent, func(err error) { w.cancel(err) })
	return w, nil
}

// peerOf is the peer holding stage i.
func (w *worker) peerOf(i int) peer.ID {
	id, _ := peer.Decode(w.plan.Stages[i].Peer) // validated when the plan was accepted
	return id
}

// start runs the worker until the run finishes or fails; wait for done.
func (w *worker) start() {
	close(w.started)
	go w.compute()
	go func() {
		defer close(w.done)
		w.err = w.loop()
		if w.err != nil {
			w.log.Error("run stopped", "err", w.err)
			w.report(Report{Kind: ReportError, Error: w.err.Error(), Checkpoint: w.checkpointPath()})
		}
		w.out.close()
	}()
}

// compute runs jobs one at a time and posts their results as events.
func (w *worker) compute() {
	defer close(w.idle)
	for {
		select {
		case job := <-w.jobs:
			res := job()
			select {
			case w.events <- res:
			case <-w.ctx.Done():
				return
			}
		case <-w.ctx.Done():
			return
		}
	}
}

func (w *worker) post(e any) {
	select {
	case w.events <- e:
	case <-w.ctx.Done():
	}
}

func (w *worker) loop() error {
	if err := w.handle(core.Start{}); err != nil {
		return err
	}
	for !w.core.Finished() {
		select {
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
					return e.err
				}
				w.lossSum += e.loss
				err = w.handle(core.Done{})
			default:
				err = w.handle(e)
			}
			if err != nil {
				return err
			}
		}
	}
	w.cancel(nil) // stops the compute goroutine, which is idle: the core asks for nothing more
	<-w.idle
	if err := w.checkpoint(); err != nil {
		return err
	}
	w.report(Report{Kind: ReportDone, Checkpoint: w.checkpointPath(), BytesFwd: w.sent.act.Load(), BytesBwd: w.sent.grad.Load()})
	w.log.Info("run finished", "checkpoint", w.checkpointPath(), "bytes_fwd", w.sent.act.Load(), "bytes_bwd", w.sent.grad.Load(), "bytes_eval", w.sent.eval.Load())
	return nil
}

// accept files a frame that passed its checks and tells the core it is there.
func (w *worker) accept(f *p2p.Frame) error {
	k := [2]int{int(f.Step), int(f.Micro)}
	switch f.Kind {
	case p2p.KindActivation:
		w.acts[k] = f
		return w.handle(core.ActivationIn{Step: k[0], Micro: k[1]})
	case p2p.KindGradient:
		w.grads[k] = f
		return w.handle(core.GradientIn{Step: k[0], Micro: k[1]})
	case p2p.KindEval:
		w.evals[k] = f
		return w.handle(core.EvalIn{Step: k[0], Batch: k[1]})
	}
	return fmt.Errorf("frame of kind %d", f.Kind)
}

func (w *worker) handle(e any) error {
	acts, err := w.core.Handle(e)
	if err != nil {
		return err
	}
	for _, a := range acts {
		if err := w.do(a); err != nil {
			return err
		}
	}
	return nil
}

func (w *worker) do(a any) error {
	cfg := w.stage.Config
	switch a := a.(type) {
	case core.Forward:
		io := w.slotIO[a.Slot]
		var x []float32
		if w.stage.First {
			w.sampler.Next(io.tokens, io.targets)
		} else {
			f := w.take(w.acts, a.Step, a.Micro)
			copy(io.tokens, f.Tokens)
			copy(io.targets, f.Targets)
			x = w.inB.Decode(f.Data, io.tokens)
		}
		tp := w.tapes[a.Slot]
		scale := 1 / float32(w.sp.Pipeline.MicroBatches)
		w.submit(func() any {
			out := w.stage.Forward(tp, io.tokens, x)
			if w.stage.Last {
				return computeDone{loss: w.stage.Loss(tp, io.targets, scale)}
			}
			w.out.send(w.peerOf(w.idx+1), p2p.ProtoActivation, w.frame(p2p.KindActivation, a.Step, a.Micro, tp.B, tp.T, w.outB, out, io))
			return computeDone{}
		})
	case core.Backward:
		tp := w.tapes[a.Slot]
		var g []float32
		if !w.stage.Last {
			g = w.outB.DecodeGrad(w.take(w.grads, a.Step, a.Micro).Data, tp.B*tp.T)
		}
		w.submit(func() any {
			dx := w.stage.Backward(tp, g)
			if a.Send {
				w.out.send(w.peerOf(w.idx-1), p2p.ProtoGradient, w.frame(p2p.KindGradient, a.Step, a.Micro, tp.B, tp.T, w.inB, dx, slotIO{}))
			}
			return computeDone{}
		})
	case core.ShareNorm:
		// Compute is idle: the core asked for no job.
		w.stage.ProjectGrads() // a no-op without a subspace; norms are of what the optimiser sees
		ss := optim.SumSquares(w.stage.Grads)
		for i := range w.plan.Stages {
			if i != w.idx {
				w.out.control(w.peerOf(i), ctlMsg{Type: msgNorm, Run: w.plan.ID, Norm: &normMsg{Step: a.Step, Stage: w.idx, SumSq: ss}})
			}
		}
		return w.handle(core.NormIn{Step: a.Step, Stage: w.idx, SumSq: ss})
	case core.Optimize:
		w.stepped = true
		lr := w.sched.At(a.Step - 1)
		w.lastNorm = a.Norm
		clip := w.sp.Train.GradClip
		w.submit(func() any {
			if f := optim.ClipFactor(a.Norm, clip); f != 1 {
				optim.Scale(w.stage.Grads, f)
			}
			w.opt.Step(w.stage.Params, w.stage.Grads, lr)
			w.stage.ProjectParams()
			w.stage.ZeroGrads()
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
				return computeDone{loss: w.stage.Loss(tp, io.targets, 1) * float64(b)}
			}
			w.out.send(w.peerOf(w.idx+1), p2p.ProtoActivation, w.frame(p2p.KindEval, a.Step, a.Batch, b, seq, w.outB, out, io))
			return computeDone{}
		})
	case core.StepDone:
		if w.stage.Last {
			// Summed and divided as the single-process trainer does, so the figures match.
			loss := w.lossSum / float64(w.sp.Pipeline.MicroBatches)
			w.report(Report{Kind: ReportStep, Step: a.Step, Loss: loss, GradNorm: w.lastNorm,
				LR: float64(w.sched.At(a.Step - 1))})
		}
		w.lossSum = 0
		if w.stage.First && w.sp.EvalInterval > 0 && a.Step%w.sp.EvalInterval == 0 && a.Step != w.sp.Train.Steps {
			if err := w.checkpoint(); err != nil {
				return err
			}
		}
	case core.EvalDone:
		if w.stage.Last {
			w.report(Report{Kind: ReportEval, Step: a.Step, ValLoss: w.lossSum / float64(w.windows)})
		}
		w.lossSum = 0
	case core.Finished:
	default:
		return fmt.Errorf("unknown action %T", a)
	}
	return nil
}

func (w *worker) submit(job func() any) {
	select {
	case w.jobs <- job:
	case <-w.ctx.Done():
	}
}

func (w *worker) take(m map[[2]int]*p2p.Frame, step, i int) *p2p.Frame {
	k := [2]int{step, i}
	f := m[k]
	delete(m, k)
	return f
}

// frame builds the frame that carries x (a stage's output, or the gradient of its
// input when kind is KindGradient) across boundary b: compressed into the run's
// subspace and encoded with its codec for that direction. The frame owns its data.
func (w *worker) frame(kind p2p.Kind, step, micro, batch, t int, b *train.Boundary, x []float32, io slotIO) *p2p.Frame {
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

// expect is what a valid incoming frame of kind looks like for this stage.
func (w *worker) expect(kind p2p.Kind, micro int) p2p.Expect {
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
func (w *worker) from(kind p2p.Kind) (peer.ID, bool) {
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

func (w *worker) checkpointPath() string {
	return filepath.Join(w.dir, fmt.Sprintf("stage-%d.safetensors", w.idx))
}

// checkpoint writes the stage's tensors (global layer names), the spec and the step.
// It runs only while the compute goroutine is idle or stopped.
func (w *worker) checkpoint() error {
	if err := os.MkdirAll(w.dir, 0o755); err != nil {
		return err
	}
	meta := map[string]string{train.MetaSpec: w.sp.String(), train.MetaStep: strconv.Itoa(w.core.Step())}
	return shard.SaveCheckpoint(w.checkpointPath(), meta, w.stage)
}

func (w *worker) report(r Report) {
	r.Run, r.Stage, r.Peer = w.plan.ID, w.idx, w.host.ID().String()
	if math.IsNaN(r.Loss) || math.IsInf(r.Loss, 0) {
		r.Kind, r.Error = ReportError, fmt.Sprintf("loss is %g at step %d", r.Loss, r.Step)
	}
	w.out.control(w.launcher, ctlMsg{Type: msgReport, Run: w.plan.ID, Report: &r})
}
