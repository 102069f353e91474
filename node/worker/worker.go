// Package worker trains one stage of one run on a node: the executor around node/core.
//
// What a stage does next is decided by node/core, a deterministic state machine; a
// Worker does the I/O around it. It owns one loop goroutine that feeds the core
// events (frames from the network, finished computations, peers' gradient norms) and
// carries out its actions, and one compute goroutine so the network never waits on a
// matmul. Tensors travel on direct libp2p streams (p2p.ProtoActivation,
// p2p.ProtoGradient) through an outbox per peer. The worker writes its stage's
// checkpoints (node/ckpt), resumes from them, and rejoins a running run by fetching
// its stage's state from the live replicas. The daemon creates workers and routes
// frames and control messages to them.
package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/stage"
	"github.com/pipeswarm/pipeswarm/node/status"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/optim"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/clock"
	"github.com/pipeswarm/pipeswarm/p2p/corpus"
	"github.com/pipeswarm/pipeswarm/p2p/reduce"
	"github.com/pipeswarm/pipeswarm/p2p/traffic"
	"github.com/pipeswarm/pipeswarm/shard"
)

// Worker trains one stage of one run. Its loop goroutine owns the core and every
// field below except those the compute goroutine is handed inside a job.
type Worker struct {
	host     *p2p.Host
	env      Env
	clock    clock.Clock // see Env.Clock
	log      *slog.Logger
	plan     *wire.Plan
	sp       *spec.Spec
	idx      int // this stage
	rep      int // this replica pipeline
	self     assign.Assignment
	launcher peer.ID
	dir      string      // run directory for the stage checkpoint
	grid     [][]peer.ID // [replica][stage]; the loop's alone once it runs
	// replicas is this stage's column of grid, [replica], for goroutines other than the
	// loop (the replica dials): the loop publishes a fresh copy when a cell moves.
	replicas atomic.Pointer[[]peer.ID]

	// unit is the stage's training state; stage, inB and outB are its Stage, In and
	// Out, named here for the many lines that use them.
	unit   *stage.Unit
	stage  *shard.Stage
	inB    *stage.Boundary // with the previous stage (nil on stage 0)
	outB   *stage.Boundary // with the next stage (nil on the last)
	sched  optim.Cosine
	core   *core.Core
	tapes  []*shard.Tape // per slot
	slotIO []slotIO      // tokens and targets of the micro-batch in each slot
	eval   *train.Evaluator

	sampler *data.Sampler[int32] // stage 0
	val     []int32              // stage 0 of replica 0: validation split
	evalN   int                  // validation batches (0 on replicas other than 0: they do not evaluate)
	windows int

	// DiLoCo, with replicas: this replica's outer state for the stage, the stage's
	// all-reduce group, and what the last sync took.
	outer     *stage.Outer // the unit's
	group     *reduce.Group
	syncStart time.Time
	lastSync  time.Time
	reduces   map[int]*syncDone // all-reduces begun after a step (at most two), until applied
	outerRep  *wire.OuterReport // what the outer step in progress has applied
	started0  time.Time         // when training began, for the mean time between syncs
	reaching  atomic.Bool       // a reachLauncher is under way
	syncs     int               // outer steps taken
	// outerAllow is how long a neighbour's outer step may hold up what it sends: the
	// replica wait of the last all-reduce here plus four times what it took.
	outerAllow time.Duration
	syncTook   time.Duration // the last outer step's all-reduce
	served     servedState

	// ledger is where this stage's time went (computing, waiting for what), with the
	// timeline of a few early steps, reported when the run finishes.
	ledger core.Ledger

	acts, grads, evals map[[2]int]*p2p.Frame // inputs waiting for the core to schedule them
	lossSum            float64               // this step's micro-batch losses, then its evaluation's
	lastNorm           float64

	events chan any
	jobs   chan func() any
	out    *outbox
	sent   sentBytes // tensor frames sent, by kind
	// stepSent is what sent counted of training frames when step stepSentAt was
	// taken: a stage stopped mid-step has sent part of the next, which is no step's
	// traffic. Its reports at the end give both, so the bytes are per step taken.
	stepSent   [2]int64
	stepSentAt int
	recvd      sentBytes // tensor frames received and accepted for this run, by kind

	// What the status page shows, kept by the loop and published to view as a new
	// value after every step: readers never see the loop's own fields.
	curve     status.Curve
	lastLoss  float64
	valLoss   float64
	stepTimes []time.Time // when the last few steps finished, for tokens/s
	view      atomic.Pointer[status.Run]

	ctx       context.Context
	cancel    context.CancelCauseFunc
	startOnce sync.Once
	started   chan struct{} // closed when the loop starts
	idle      chan struct{} // closed when the compute goroutine has returned
	stepped   bool          // an optimiser step has been taken: there is something to keep
	doneStep  int           // the last step whose optimiser step has run

	// What a checkpoint needs of the last step done besides the parameters and the
	// optimiser state: taken at StepDone, because by the time a stopped stage writes
	// its checkpoint the first stage may have sampled the next step's micro-batches and
	// the codecs carried residuals into them.
	ckStep    int
	ckSampler []byte
	// An async run's first stage samples micro-batches of later updates before an
	// update ends: where its sampler stood after each update's last micro-batch,
	// until that update is done (the cut a checkpoint keeps, core/asynccore.go).
	cutSampler map[int][]byte
	// async: the current weights, kept while a forward or backward runs on a past
	// version (core.Forward.Age).
	curParams     []float32
	resumeSampler []byte // a resumed run's sampler position, applied when the data is loaded

	// Stopping: a stage asked to stop while its step is in hand (core.Stepping)
	// finishes that step, so that stages stopped together end on the same step.
	stopCause error
	stopAt    int
	// handSince is when the step in progress became the other stages' to finish
	// (core.Stepping), handStep the last step whose wait from then to its optimiser
	// step is in handWaited (over handSteps steps).
	handSince  time.Time
	handStep   int
	handWaited time.Duration
	handSteps  int
	done       chan struct{} // closed when the loop has returned and the outbox drained
	err        error
}

type slotIO struct{ tokens, targets []int32 }

// Events the loop takes besides core events.
type (
	frameIn     struct{ f *p2p.Frame }
	computeDone struct {
		loss float64 // forward on the last stage: this micro-batch's loss
		err  error
	}
	// launcherLost: the connection to the run's launcher closed.
	launcherLost struct{}
	// launcherOrder: the launcher orders a checkpoint at step (wire.MsgCheckpoint), says
	// every row up to step is recorded (wire.MsgRecorded), or stops this stage after step
	// (wire.MsgStopAt); the loop answers on reply.
	launcherOrder struct {
		kind   string
		step   int
		reason string
		reply  chan error
	}
	// stopReq: the node is stopping; cause is the run's error once it has stopped.
	stopReq struct{ cause error }
	// reduceDone: the all-reduces of an outer step finished (or the replica fell
	// behind and fetched the global state instead).
	reduceDone struct {
		e       *syncDone
		results []*reduce.Result
		fetched *fetchedState
		err     error
	}
)

// syncDone is an outer step begun after step: its fragments and contributions, and
// once its all-reduces are done, their results.
type syncDone struct {
	step       int
	overlapped bool // applied after the next step (Streaming DiLoCo)
	frags      []int
	ys         [][]float32
	results    []*reduce.Result
	fetched    *fetchedState
	err        error
}

// Env is what a worker borrows from its daemon.
type Env struct {
	Host   *p2p.Host
	Log    *slog.Logger
	Reduce *reduce.Service
	Fetch  *corpus.Fetcher
	Corpus string // local copy of run text, or ""
	// FaultStallSync > 0 hangs this stage mid all-reduce after that step (testing).
	FaultStallSync int
	Meters         *traffic.Meters // the daemon's: frames and bytes per protocol
	// Clock times the stage: the core's ticks, waits, backstops and the time-based
	// checkpoints. nil = clock.Real.
	Clock clock.Clock
}

// New builds the worker of cell (idx, rep) of plan; a resumed plan's state is
// loaded from resumeDir, the run directory of the run it continues.
func New(ctx context.Context, env Env, plan *wire.Plan, sp *spec.Spec, idx, rep int, runDir, resumeDir string) (*Worker, error) {
	h, log := env.Host, env.Log
	cfg := train.ModelConfig(sp)
	S, R := sp.Pipeline.Stages, sp.Pipeline.Replicas
	self, _ := plan.Cell(idx, rep)
	grid := make([][]peer.ID, R)
	for r := range grid {
		grid[r] = make([]peer.ID, S)
	}
	for _, a := range plan.Stages {
		grid[a.Replica][a.Stage], _ = peer.Decode(a.Peer) // validated when the plan was accepted
	}
	sub, err := stage.RunSubspace(sp)
	if err != nil {
		return nil, err
	}
	u, err := stage.New(sp, idx, self.Range, sub)
	if err != nil {
		return nil, err
	}
	st := u.Stage
	launcher, err := peer.Decode(plan.Launcher)
	if err != nil {
		return nil, fmt.Errorf("plan: launcher %q: %w", plan.Launcher, err)
	}
	wlog := log.With("run", fmt.Sprintf("%016x", plan.ID), "stage", idx)
	if R > 1 {
		wlog = wlog.With("replica", rep)
	}
	w := &Worker{host: h, env: env, clock: clock.Or(env.Clock), log: wlog, plan: plan, sp: sp, idx: idx, rep: rep, grid: grid,
		self: self, launcher: launcher, dir: runDir, unit: u, stage: st, inB: u.In, outB: u.Out, outer: u.Outer,
		sched: optim.Cosine{Peak: float32(sp.Train.LR), Min: float32(sp.Train.MinLR), Warmup: sp.Train.Warmup, Total: sp.Train.Steps},
		acts:  map[[2]int]*p2p.Frame{}, grads: map[[2]int]*p2p.Frame{}, evals: map[[2]int]*p2p.Frame{},
		events: make(chan any, 1024), jobs: make(chan func() any), started: make(chan struct{}), idle: make(chan struct{}), done: make(chan struct{})}
	w.publishReplicas()

	// Every stage needs the number of validation batches; stage 0 fetches its text
	// when the run starts (loadData). Only replica 0 evaluates: right after an outer
	// step its weights are every replica's. An evaluation covers the first
	// eval_batches batches of windows, as train's does.
	w.windows = int(plan.Data.ValidationTokens()) / (cfg.SeqLen + 1)
	if sp.EvalBatches > 0 {
		w.windows = min(w.windows, sp.EvalBatches*train.EvalBatch)
	}
	if rep == 0 {
		w.evalN = (w.windows + train.EvalBatch - 1) / train.EvalBatch
	}
	cc := train.StageCore(sp, idx)
	cc.EvalBatches = w.evalN
	// Until a step is measured, a neighbour may take as long as staffing may.
	cc.StartTimeout = time.Duration(sp.Pipeline.StaffTimeout) * time.Second
	if plan.Resume != nil {
		cc.From, cc.EvalFrom = plan.Resume.Step, true
	}
	if plan.Join != nil {
		cc.From, cc.Joined = plan.Join.Step, true
	}
	if R > 1 {
		w.reduces = map[int]*syncDone{}
		peers := make([]peer.ID, R)
		for r := range peers {
			peers[r] = grid[r][idx]
		}
		w.serve(0)
		w.group, err = env.Reduce.Join(reduce.GroupConfig{Run: plan.ID, Group: uint32(idx), Peers: peers, Self: rep,
			Codec: w.outer.Codec, MaxValues: len(st.Params), State: w.served.get,
			FaultStallRound: uint64(env.FaultStallSync) * uint64(sp.DiLoCo.Fragments)})
		if err != nil {
			return nil, err
		}
	}
	if sp.Pipeline.Async() {
		// The stage keeps the past weight versions the schedule's delays reach back to,
		// whatever train.delay: a resumed run runs the forwards in flight at its
		// checkpoint again on them. A joining stage is set up as at a run's start (its
		// update rule's state comes with the rest in rejoin); it refills its pipeline
		// from the join on the weights it fetches (core.Config.Joined).
		a := train.AsyncSchedule(sp)
		err = u.SetAsync(sp, a.MaxDelay(idx), a.Delay(idx))
		w.curParams, w.cutSampler = make([]float32, len(st.Params)), map[int][]byte{}
	}
	if plan.Resume != nil && err == nil {
		err = w.resumeFrom(resumeDir, plan.Resume.Step)
	}
	if err == nil {
		w.core, err = core.New(cc)
	}
	if err != nil {
		if w.group != nil {
			_ = w.group.Close()
		}
		return nil, err
	}
	mb := sp.Train.BatchSize / sp.Pipeline.MicroBatches
	for range cc.Slots() {
		w.tapes = append(w.tapes, st.NewTape(mb, cfg.SeqLen))
		w.slotIO = append(w.slotIO, slotIO{make([]int32, mb*cfg.SeqLen), make([]int32, mb*cfg.SeqLen)})
	}
	w.eval = train.NewEvaluator[byte]([]*shard.Stage{st}, nil, sp.EvalBatches)
	if !sp.Pipeline.Async() { // an async stage evaluates with forwards in flight: tapes of its own
		w.eval.Reuse(w.tapes[:1])
	}
	w.ctx, w.cancel = context.WithCancelCause(ctx)
	// Until a kind of control message has been answered, as long as staffing may take.
	calls := wire.NewCallClock(time.Duration(sp.Pipeline.StaffTimeout)*time.Second, w.clock)
	w.out = newOutbox(h, w.log, w.clock, &w.sent, env.Meters, calls, func(err error) {
		if R > 1 {
			// A neighbour in this replica pipeline is gone: the pipeline is broken, the
			// run is not.
			err = fmt.Errorf("%w: replica pipeline %d lost a neighbour: %w", ErrIdle, rep, err)
		}
		w.cancel(err)
	})
	// A report the launcher did not take is as telling as its connection closing: the
	// connection may have gone before the launcher did, leaving nothing to close.
	w.out.undelivered = func(to peer.ID) {
		if to == w.launcher {
			go w.post(launcherLost{})
		}
	}
	return w, nil
}

// peerOf is the peer holding stage i of this worker's replica pipeline.
func (w *Worker) peerOf(i int) peer.ID { return w.grid[w.rep][i] }

// What the daemon asks of a worker, from its own goroutines.

// Start starts the stage's loop, once; later calls do nothing. A stage cancelled or
// stopped before it started is started too, so that it winds down and reports.
func (w *Worker) Start() { w.startOnce.Do(w.start) }

// Cancel ends the stage with cause.
func (w *Worker) Cancel(cause error) { w.cancel(cause) }

// Started is closed when the stage's loop starts.
func (w *Worker) Started() <-chan struct{} { return w.started }

// Done is closed when the stage's loop has returned and its outbox drained.
func (w *Worker) Done() <-chan struct{} { return w.done }

// Plan is the run plan the stage was accepted with.
func (w *Worker) Plan() *wire.Plan { return w.plan }

// Spec is the run's spec.
func (w *Worker) Spec() *spec.Spec { return w.sp }

// Launcher is the run's launcher, the only peer that may order the stage about.
func (w *Worker) Launcher() peer.ID { return w.launcher }

// PeerHolds reports whether from holds stage, another stage of this stage's replica
// pipeline.
func (w *Worker) PeerHolds(from peer.ID, stage int) bool {
	return stage >= 0 && stage < w.sp.Pipeline.Stages && stage != w.idx && w.peerOf(stage) == from
}

// Norm hands the stage another stage's gradient sum of squares for step.
func (w *Worker) Norm(step, stage int, sumSq float64) {
	w.post(core.NormIn{Step: step, Stage: stage, SumSq: sumSq})
}

// Order hands the stage a launcher's order (MsgCheckpoint, MsgRecorded, MsgStopAt)
// and waits for the stage to take it.
func (w *Worker) Order(kind string, step int, reason string) error {
	e := launcherOrder{kind: kind, step: step, reason: reason, reply: make(chan error, 1)}
	w.post(e)
	select {
	case err := <-e.reply:
		return err
	case <-w.done:
		return errors.New("the run has stopped here")
	case <-w.clock.After(5 * time.Second):
		return errors.New("the stage did not take the order in 5 s")
	}
}

// MaxFrameBytes is the largest frame the stage expects.
func (w *Worker) MaxFrameBytes() int {
	limit := 0
	for _, k := range []p2p.Kind{p2p.KindActivation, p2p.KindGradient, p2p.KindEval} {
		limit = max(limit, w.expect(k, 0).MaxBytes())
	}
	return limit
}

// Deliver hands the stage a frame of size bytes on the wire from peer from, if it is
// one the stage expects from that peer.
func (w *Worker) Deliver(from peer.ID, f *p2p.Frame, size int64) error {
	if want, ok := w.from(f.Kind); !ok || want != from {
		return fmt.Errorf("%w: frame of kind %d from %s, which is not this stage's neighbour", p2p.ErrBadFrame, f.Kind, from)
	}
	if err := f.Check(w.expect(f.Kind, int(f.Micro))); err != nil {
		return err
	}
	w.recvd.add(f.Kind, size)
	w.post(frameIn{f})
	return nil
}

// loadData brings the text this stage reads: stage 0 its replica's training shard
// and, on replica 0, the validation split. Each comes from the node's local copy if
// that hashes the same, else from the cache or the launcher over libp2p, verified.
func (w *Worker) loadData() error {
	if !w.stage.First {
		return nil
	}
	d := w.plan.Data
	var local [][]byte // the local copy cut as the launcher cut it: [train shards..., val]
	if w.env.Corpus != "" && !d.Prepared() {
		text, err := data.Load(w.env.Corpus)
		if err != nil {
			w.log.Warn("local corpus unusable; fetching from the launcher", "path", w.env.Corpus, "err", err)
		} else {
			tr, val := data.Split(text, w.sp.Data.ValFraction)
			for r := range w.sp.Pipeline.Replicas {
				local = append(local, data.Shard(tr, r, w.sp.Pipeline.Replicas))
			}
			local = append(local, val)
		}
	}
	get := func(b corpus.Blob, i int, what string) ([]byte, error) {
		if i >= 0 && i < len(local) && corpus.BlobOf(local[i]) == b {
			w.log.Info("data from the local corpus", "part", what, "sha256", b.Hash[:12], "bytes", b.Size)
			return local[i], nil
		}
		t0 := w.clock.Now()
		buf, err := w.env.Fetch.Fetch(w.ctx, []peer.ID{w.launcher}, b, nil)
		if err != nil {
			return nil, fmt.Errorf("fetching the %s (%s) from the launcher: %w", what, b, err)
		}
		w.log.Info("data fetched and verified", "part", what, "sha256", b.Hash[:12], "bytes", b.Size, "took", w.clock.Since(t0).Round(time.Millisecond))
		return buf, nil
	}
	var val []int32
	if d.Prepared() {
		// The replica's own shard files, one after another, as train reads them; read
		// from the cached files, window by window, so the node holds no copy of them.
		var paths, sums []string
		for k, b := range d.Shards[w.rep] {
			if _, err := get(b, -1, fmt.Sprintf("training shard %d of replica %d", k, w.rep)); err != nil {
				return err
			}
			paths = append(paths, filepath.Join(w.env.Fetch.CacheDir, b.Hash))
			sums = append(sums, b.Hash)
		}
		view, err := data.OpenShardView(paths, sums, w.sp.Model.Vocab)
		if err != nil {
			return fmt.Errorf("replica %d's training shards: %w", w.rep, err)
		}
		if w.sampler, err = data.NewViewSampler(view, w.stage.Config.SeqLen, w.sp.Seed, w.rep); err != nil {
			return err
		}
		if w.rep == 0 {
			for k, b := range d.ValShards {
				buf, err := get(b, -1, fmt.Sprintf("validation shard %d", k))
				if err != nil {
					return err
				}
				if val, err = data.AppendShard(val, buf, w.sp.Model.Vocab); err != nil {
					return fmt.Errorf("validation shard %d (%s): %w", k, b, err)
				}
			}
		}
	} else {
		buf, err := get(d.Train[w.rep], w.rep, fmt.Sprintf("training shard %d", w.rep))
		if err != nil {
			return err
		}
		if w.sampler, err = data.NewSampler(data.Widen(buf), w.stage.Config.SeqLen, w.sp.Seed, w.rep); err != nil {
			return err
		}
		if w.rep == 0 {
			if buf, err = get(d.Val, w.sp.Pipeline.Replicas, "validation split"); err != nil {
				return err
			}
			val = data.Widen(buf)
		}
	}
	if w.resumeSampler != nil {
		if err := w.sampler.SetState(w.resumeSampler); err != nil {
			return fmt.Errorf("resuming the data sampler: %w", err)
		}
		w.ckSampler = w.resumeSampler
	}
	if w.rep == 0 {
		w.val = val
		w.eval = train.NewEvaluator([]*shard.Stage{w.stage}, w.val, w.sp.EvalBatches)
		if !w.sp.Pipeline.Async() {
			w.eval.Reuse(w.tapes[:1])
		}
	}
	return nil
}

// start runs the worker until the run finishes or fails; wait for done.
func (w *Worker) start() {
	close(w.started)
	go w.compute()
	go func() {
		defer close(w.done)
		w.err = w.loop()
		switch {
		case errors.Is(w.err, ErrLauncherGone):
			// Nobody to report to; the checkpoint is kept for a resumed run.
		case errors.Is(w.err, ErrIdle):
			// The rest of the run goes on without this replica pipeline; nobody should
			// wait for this stage in an all-reduce.
			w.log.Warn("idle: this replica pipeline cannot go on", "reason", w.err)
			if w.group != nil {
				w.group.Leave()
			}
			w.report(wire.Report{Kind: wire.ReportIdle, Error: w.err.Error(), Checkpoint: w.checkpointHeld(), Step: w.stepSentAt, BytesFwd: w.stepSent[0], BytesBwd: w.stepSent[1]})
		case w.err != nil:
			w.log.Error("run stopped", "err", w.err)
			w.report(wire.Report{Kind: wire.ReportError, Error: w.err.Error(), Diverged: errors.Is(w.err, wire.ErrDiverged),
				CheckpointFailed: errors.Is(w.err, ErrCheckpointWrite), Checkpoint: w.checkpointHeld(),
				Step: w.stepSentAt, BytesFwd: w.stepSent[0], BytesBwd: w.stepSent[1]})
		}
		w.out.close()
		if w.group != nil {
			_ = w.group.Close()
		}
	}()
}

// compute runs jobs one at a time and posts their results as events.
func (w *Worker) compute() {
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

// reachLauncher tries to reconnect to a launcher whose connection dropped for grace
// (three times the mean time a step has taken here, and at least 5 s, a few dial
// attempts); if it cannot, it stops the run.
func (w *Worker) reachLauncher(grace time.Duration) {
	deadline := w.clock.Now().Add(grace)
	for pause := 250 * time.Millisecond; ; pause = min(2*pause, 2*time.Second) {
		ctx, cancel := context.WithTimeout(w.ctx, pause)
		err := w.host.Redial(ctx, w.launcher)
		if err == nil {
			// Connect takes any connection it has for one that works: one to a launcher
			// gone without a word (its machine off, its link dead, over QUIC) stays
			// open until it idles out. A round trip says it is there.
			err = roundTrip(ctx, w.host.Host, w.launcher)
		}
		cancel()
		if err == nil {
			w.log.Info("launcher reachable again", "launcher", w.launcher)
			return
		}
		if w.ctx.Err() != nil {
			return
		}
		if w.clock.Now().After(deadline) {
			w.log.Warn("launcher gone; stopping the run and keeping the checkpoint", "launcher", w.launcher, "waited", grace.Round(time.Millisecond), "err", err)
			w.cancel(fmt.Errorf("%w: %s unreachable for %s", ErrLauncherGone, w.launcher, grace.Round(time.Millisecond)))
			return
		}
		select {
		case <-w.clock.After(pause):
		case <-w.ctx.Done():
			return
		}
	}
}

// roundTrip pings p once: nil if it answered before ctx ended.
func roundTrip(ctx context.Context, h host.Host, p peer.ID) error {
	res, ok := <-ping.Ping(p2p.AllowRelayed(ctx, "ping"), h, p)
	if !ok {
		return fmt.Errorf("no answer to a ping: %w", context.Cause(ctx))
	}
	return res.Error
}

// Replace takes note that cell a, of another replica pipeline, is held by a new node
// now: the stage's all-reduce gives it the place of the node gone (the same stage),
// and the loop dials it with the other replicas.
func (w *Worker) Replace(a *assign.Assignment) error {
	if a == nil || a.Replica < 0 || a.Replica >= len(w.grid) || a.Replica == w.rep || a.Stage < 0 || a.Stage >= len(w.grid[0]) {
		return errors.New("replace: no cell of another replica pipeline")
	}
	id, err := peer.Decode(a.Peer)
	if err != nil {
		return fmt.Errorf("replace: %w", err)
	}
	if a.Stage == w.idx && w.group != nil {
		if err := w.group.Replace(a.Replica, id); err != nil {
			return fmt.Errorf("replace: %w", err)
		}
	}
	w.post(cellMoved{stage: a.Stage, replica: a.Replica, id: id})
	return nil
}

// Drop takes cell a, this stage's cell in a replica pipeline the launcher found
// broken, out of the stage's all-reduce: a round waiting for it goes on without it.
// A cell that has passed to another node since is left alone.
func (w *Worker) Drop(a *assign.Assignment, reason string) error {
	if a == nil || a.Replica < 0 || a.Replica >= len(w.grid) || a.Replica == w.rep || a.Stage != w.idx {
		return errors.New("drop: not a cell of this stage in another replica pipeline")
	}
	id, err := peer.Decode(a.Peer)
	if err != nil {
		return fmt.Errorf("drop: %w", err)
	}
	if w.group == nil {
		return nil
	}
	if w.group.Drop(a.Replica, id, fmt.Errorf("the launcher took replica pipeline %d out: %s", a.Replica, reason)) {
		w.log.Info("a broken replica pipeline is dropped from the all-reduce", "broken_replica", a.Replica, "node", id, "reason", reason)
	}
	return nil
}

// moved is the loop's: it writes cell e into the grid and, if it is of this stage,
// publishes the stage's new column for the replica dials.
func (w *Worker) moved(e cellMoved) {
	w.grid[e.replica][e.stage] = e.id
	if e.stage == w.idx {
		w.publishReplicas()
	}
}

func (w *Worker) publishReplicas() {
	col := make([]peer.ID, len(w.grid))
	for r, row := range w.grid {
		col[r] = row[w.idx]
	}
	w.replicas.Store(&col)
}

// cellMoved is replace's news for the loop, which alone writes the grid.
type cellMoved struct {
	stage, replica int
	id             peer.ID
}

func (w *Worker) post(e any) {
	select {
	case w.events <- e:
	case <-w.ctx.Done():
	}
}

// Errors that stop a stage for the run's sake, not for a fault of its own.
var (
	// ErrIdle stops a stage whose replica pipeline is broken (a neighbour is gone): it
	// keeps its state and says so; the run goes on with the pipelines still whole.
	ErrIdle = errors.New("idle")
	// ErrLauncherGone stops a run whose launcher cannot be reached any more.
	ErrLauncherGone = errors.New("launcher gone")
)
