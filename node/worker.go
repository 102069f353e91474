package node

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/bits"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/status"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/optim"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/codec"
	"github.com/pipeswarm/pipeswarm/p2p/corpus"
	"github.com/pipeswarm/pipeswarm/p2p/reduce"
	"github.com/pipeswarm/pipeswarm/p2p/traffic"
	"github.com/pipeswarm/pipeswarm/shard"
)

// worker trains one stage of one run. Its loop goroutine owns the core and every
// field below except those the compute goroutine is handed inside a job.
type worker struct {
	host     *p2p.Host
	env      workerEnv
	log      *slog.Logger
	plan     *Plan
	sp       *spec.Spec
	idx      int // this stage
	rep      int // this replica pipeline
	self     assign.Assignment
	launcher peer.ID
	dir      string      // run directory for the stage checkpoint
	grid     [][]peer.ID // [replica][stage]

	stage  *shard.Stage
	inB    *train.Boundary // with the previous stage (nil on stage 0)
	outB   *train.Boundary // with the next stage (nil on the last)
	opt    *optim.AdamW
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
	outer     *train.Outer
	group     *reduce.Group
	syncStart time.Time
	lastSync  time.Time
	pend      *syncDone    // overlapped outer step to apply after the next step
	waiting   bool         // the core waits in Sync{syncStep} for pend's all-reduce
	syncStep  int          // the step whose outer-step work is in progress
	partial   *OuterReport // what was applied before a blocking outer step at the same step
	started0  time.Time    // when training began, for the mean time between syncs
	reaching  atomic.Bool  // a reachLauncher is under way
	syncs     int          // outer steps taken
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
	ck        core.Checkpoints
	stepped   bool // an optimiser step has been taken: there is something to keep
	doneStep  int  // the last step whose optimiser step has run

	// What a checkpoint needs of the last step done besides the parameters and the
	// optimiser state: taken at StepDone, because by the time a stopped stage writes
	// its checkpoint the first stage may have sampled the next step's micro-batches and
	// the codecs carried residuals into them.
	ckStep        int
	ckSampler     []byte
	ckIn, ckOut   []float32 // the boundaries' error-feedback residuals
	resumeSampler []byte    // a resumed run's sampler position, applied when the data is loaded

	// Stopping: a stage asked to stop while its step is in hand (its norm shared)
	// finishes that step, so that stages stopped together end on the same step.
	stopCause  error
	stopAt     int
	normSent   time.Time     // when this step's norm was shared
	normWaited time.Duration // total time from sharing the norm to stepping
	normSteps  int
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
	// launcherOrder: the launcher orders a checkpoint at step (msgCheckpoint), says
	// every row up to step is recorded (msgRecorded), or stops this stage after step
	// (msgStopAt); the loop answers on reply.
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
// once its all-reduces are done (done), their results.
type syncDone struct {
	step       int
	overlapped bool // applied after the next step (Streaming DiLoCo)
	frags      []int
	ys         [][]float32
	done       bool
	results    []*reduce.Result
	fetched    *fetchedState
	err        error
}

// workerEnv is what a worker borrows from its daemon.
type workerEnv struct {
	host   *p2p.Host
	log    *slog.Logger
	reduce *reduce.Service
	fetch  *corpus.Fetcher
	corpus string // local copy of run text, or ""
	// faultStallSync > 0 hangs this stage mid all-reduce after that step (testing).
	faultStallSync int
	meters         *traffic.Meters // the daemon's: frames and bytes per protocol
}

type fetchedState struct {
	round uint64
	vecs  [][]float32
}

// servedState is the stage's global weights and outer momentum as of the last outer
// step, and this replica's AdamW moments then, copied for the all-reduce group to
// serve to a replica that fell behind or joins.
// The previous outer step's state is kept too: a replica pipeline rejoining at an
// outer step asks for that one, which the others may have moved past while it started.
type servedState struct {
	mu    sync.Mutex
	slots [2]servedSlot
	cur   int
}

type servedSlot struct {
	round uint64
	vecs  [][]float32
	set   bool
}

func (s *servedState) set(round uint64, vecs ...[]float32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	next := &s.slots[1-s.cur]
	if len(next.vecs) != len(vecs) {
		next.vecs = make([][]float32, len(vecs))
		for i, v := range vecs {
			next.vecs[i] = make([]float32, len(v))
		}
	}
	for i, v := range vecs {
		copy(next.vecs[i], v)
	}
	next.round, next.set = round, true
	s.cur = 1 - s.cur
}

// get returns the state as of round want if held (want 0, or not held: the latest).
func (s *servedState) get(want uint64) (uint64, [][]float32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sl := &s.slots[s.cur]
	if p := &s.slots[1-s.cur]; want != 0 && p.set && p.round == want {
		sl = p
	}
	out := make([][]float32, len(sl.vecs))
	for i, v := range sl.vecs {
		out[i] = append([]float32(nil), v...)
	}
	return sl.round, out
}

// newWorker builds the worker of cell (idx, rep) of plan; a resumed plan's state is
// loaded from resumeDir, the run directory of the run it continues.
func newWorker(ctx context.Context, env workerEnv, plan *Plan, sp *spec.Spec, idx, rep int, runDir, resumeDir string) (*worker, error) {
	h, log := env.host, env.log
	cfg := train.ModelConfig(sp)
	S, R := sp.Pipeline.Stages, sp.Pipeline.Replicas
	self, _ := plan.cell(idx, rep)
	grid := make([][]peer.ID, R)
	for r := range grid {
		grid[r] = make([]peer.ID, S)
	}
	for _, a := range plan.Stages {
		grid[a.Replica][a.Stage], _ = peer.Decode(a.Peer) // validated when the plan was accepted
	}
	be, err := train.Backend(sp)
	if err != nil {
		return nil, err
	}
	st, err := shard.NewStage(cfg, self.Range, idx == 0, idx == S-1, shard.WithBackend(be), shard.WithRecompute(sp.Model.Recompute))
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
	if idx < S-1 {
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
	wlog := log.With("run", fmt.Sprintf("%016x", plan.ID), "stage", idx)
	if R > 1 {
		wlog = wlog.With("replica", rep)
	}
	w := &worker{host: h, env: env, log: wlog, plan: plan, sp: sp, idx: idx, rep: rep, grid: grid,
		self: self, launcher: launcher, dir: runDir, stage: st, inB: inB, outB: outB, opt: opt,
		sched: optim.Cosine{Peak: float32(sp.Train.LR), Min: float32(sp.Train.MinLR), Warmup: sp.Train.Warmup, Total: sp.Train.Steps},
		acts:  map[[2]int]*p2p.Frame{}, grads: map[[2]int]*p2p.Frame{}, evals: map[[2]int]*p2p.Frame{},
		events: make(chan any, 1024), jobs: make(chan func() any), started: make(chan struct{}), idle: make(chan struct{}), done: make(chan struct{})}

	// Every stage needs the number of validation batches; stage 0 fetches its text
	// when the run starts (loadData). Only replica 0 evaluates: right after an outer
	// step its weights are every replica's. An evaluation covers the first
	// eval_batches batches of windows, as train's does.
	w.ck = core.Checkpoints{Interval: sp.CheckpointInterval, Last: sp.Train.Steps}
	w.windows = int(plan.Data.valTokens()) / (cfg.SeqLen + 1)
	if sp.EvalBatches > 0 {
		w.windows = min(w.windows, sp.EvalBatches*train.EvalBatch)
	}
	if rep == 0 {
		w.evalN = (w.windows + train.EvalBatch - 1) / train.EvalBatch
	}
	cc := core.Config{Stage: idx, Stages: S, MicroBatches: sp.Pipeline.MicroBatches, MaxInFlight: sp.Pipeline.InFlight,
		Steps: sp.Train.Steps, EvalInterval: sp.EvalInterval, EvalBatches: w.evalN,
		// Until a step is measured, a neighbour may take as long as staffing may.
		StartTimeout: time.Duration(sp.Pipeline.StaffTimeout) * time.Second}
	if plan.Resume != nil {
		cc.From, cc.EvalFrom = plan.Resume.Step, true
	}
	if plan.Join != nil {
		cc.From = plan.Join.Step
	}
	if R > 1 {
		d, steps := sp.DiLoCo, sp.Train.Steps
		cc.OuterDue = func(step int) bool { return d.SyncAt(step, steps) }
		if w.outer, err = train.NewOuter(sp, st); err != nil {
			return nil, err
		}
		peers := make([]peer.ID, R)
		for r := range peers {
			peers[r] = grid[r][idx]
		}
		w.serve(0)
		w.group, err = env.reduce.Join(reduce.GroupConfig{Run: plan.ID, Group: uint32(idx), Peers: peers, Self: rep,
			Codec: w.outer.Codec, MaxValues: len(st.Params), State: w.served.get,
			FaultStallRound: uint64(env.faultStallSync) * uint64(sp.DiLoCo.Fragments)})
		if err != nil {
			return nil, err
		}
	}
	if plan.Resume != nil {
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
	w.eval.Reuse(w.tapes[:1])
	w.ctx, w.cancel = context.WithCancelCause(ctx)
	// Until a kind of control message has been answered, as long as staffing may take.
	calls := newCallClock(time.Duration(sp.Pipeline.StaffTimeout) * time.Second)
	w.out = newOutbox(h, w.log, &w.sent, env.meters, calls, func(err error) {
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
func (w *worker) peerOf(i int) peer.ID { return w.grid[w.rep][i] }

// loadData brings the text this stage reads: stage 0 its replica's training shard
// and, on replica 0, the validation split. Each comes from the node's local copy if
// that hashes the same, else from the cache or the launcher over libp2p, verified.
func (w *worker) loadData() error {
	if !w.stage.First {
		return nil
	}
	d := w.plan.Data
	var local [][]byte // the local copy cut as the launcher cut it: [train shards..., val]
	if w.env.corpus != "" && !d.Prepared() {
		text, err := data.Load(w.env.corpus)
		if err != nil {
			w.log.Warn("local corpus unusable; fetching from the launcher", "path", w.env.corpus, "err", err)
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
		t0 := time.Now()
		buf, err := w.env.fetch.Fetch(w.ctx, []peer.ID{w.launcher}, b, nil)
		if err != nil {
			return nil, fmt.Errorf("fetching the %s (%s) from the launcher: %w", what, b, err)
		}
		w.log.Info("data fetched and verified", "part", what, "sha256", b.Hash[:12], "bytes", b.Size, "took", time.Since(t0).Round(time.Millisecond))
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
			paths = append(paths, filepath.Join(w.env.fetch.CacheDir, b.Hash))
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
		w.eval.Reuse(w.tapes[:1])
	}
	return nil
}

// start runs the worker until the run finishes or fails; wait for done.
func (w *worker) start() {
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
			w.report(Report{Kind: ReportIdle, Error: w.err.Error(), Checkpoint: w.checkpointHeld(), Step: w.stepSentAt, BytesFwd: w.stepSent[0], BytesBwd: w.stepSent[1]})
		case w.err != nil:
			w.log.Error("run stopped", "err", w.err)
			w.report(Report{Kind: ReportError, Error: w.err.Error(), Diverged: errors.Is(w.err, ErrDiverged),
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

// reachLauncher tries to reconnect to a launcher whose connection dropped for grace
// (three times the mean time a step has taken here, and at least 5 s, a few dial
// attempts); if it cannot, it stops the run.
func (w *worker) reachLauncher(grace time.Duration) {
	deadline := time.Now().Add(grace)
	for pause := 250 * time.Millisecond; ; pause = min(2*pause, 2*time.Second) {
		ctx, cancel := context.WithTimeout(w.ctx, pause)
		err := w.host.Host.Connect(p2p.AllowRelayed(ctx, "launcher"), peer.AddrInfo{ID: w.launcher})
		cancel()
		if err == nil {
			w.log.Info("launcher reachable again", "launcher", w.launcher)
			return
		}
		if w.ctx.Err() != nil {
			return
		}
		if time.Now().After(deadline) {
			w.log.Warn("launcher gone; stopping the run and keeping the checkpoint", "launcher", w.launcher, "waited", grace.Round(time.Millisecond), "err", err)
			w.cancel(fmt.Errorf("%w: %s unreachable for %s", ErrLauncherGone, w.launcher, grace.Round(time.Millisecond)))
			return
		}
		select {
		case <-time.After(pause):
		case <-w.ctx.Done():
			return
		}
	}
}

// replace takes note that cell a, of another replica pipeline, is held by a new node
// now: the stage's all-reduce gives it the place of the node gone (the same stage),
// and the loop dials it with the other replicas.
func (w *worker) replace(a *assign.Assignment) error {
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

// drop takes cell a, this stage's cell in a replica pipeline the launcher found
// broken, out of the stage's all-reduce: a round waiting for it goes on without it.
// A cell that has passed to another node since is left alone.
func (w *worker) drop(a *assign.Assignment, reason string) error {
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

// cellMoved is replace's news for the loop, which alone writes the grid.
type cellMoved struct {
	stage, replica int
	id             peer.ID
}

func (w *worker) post(e any) {
	select {
	case w.events <- e:
	case <-w.ctx.Done():
	}
}

func (w *worker) loop() error {
	if err := w.loadData(); err != nil {
		return err
	}
	if w.plan.Join != nil {
		if err := w.rejoin(); err != nil {
			return err
		}
	}
	w.lastSync = time.Now()
	w.started0 = w.lastSync
	w.publish()
	if w.group != nil {
		go w.connectReplicas() // early, so the first outer step does not pay for the dials
	}
	w.ledger.Window.Lo, w.ledger.Window.Hi = TimelineSteps(w.sp.Train.Steps)
	if err := w.handle(core.Start{}); err != nil {
		return err
	}
	w.ledger.Mark(time.Since(w.started0), w.core.Waiting(), w.core.Step())
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
				go w.post(core.PeerDown{Stage: s})
			}
		}
	}}
	w.host.Network().Notify(watch)
	defer w.host.Network().StopNotify(watch)
	ticks := time.NewTicker(tickEvery)
	defer ticks.Stop()
	for !w.core.Finished() {
		select {
		case <-ticks.C:
			if err := w.handle(core.Tick{Now: time.Since(w.started0), RTT: w.neighbourRTT(), Outer: w.outerAllow}); err != nil {
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
				w.grid[e.replica][e.stage] = e.id
			case launcherOrder:
				e.reply <- w.order(e)
			case launcherLost:
				if w.reaching.CompareAndSwap(false, true) { // one attempt at a time
					steps := max(1, w.core.Step())
					grace := max(5*time.Second, 3*time.Since(w.started0)/time.Duration(steps))
					go func() {
						defer w.reaching.Store(false)
						w.reachLauncher(grace)
					}()
				}
			default:
				err = w.handle(e)
				if errors.Is(err, core.ErrStale) { // a norm resent or late
					w.log.Debug("stale event dropped", "err", err)
					err = nil
				}
			}
			if err != nil {
				return w.fail(err)
			}
			w.ledger.Mark(time.Since(w.started0), w.core.Waiting(), w.core.Step())
		}
	}
	w.cancel(nil) // stops the compute goroutine, which is idle: the core asks for nothing more
	<-w.idle
	if err := w.checkpoint(); err != nil {
		return err
	}
	w.report(Report{Kind: ReportDone, Checkpoint: w.checkpointPath(), Step: w.stepSentAt, BytesFwd: w.sent.act.Load(), BytesBwd: w.sent.grad.Load(),
		Time: w.stageTime()})
	w.log.Info("run finished", "checkpoint", w.checkpointPath(), "bytes_fwd", w.sent.act.Load(), "bytes_bwd", w.sent.grad.Load(), "bytes_eval", w.sent.eval.Load())
	return nil
}

// fail stops the stage on err and, once its compute has stopped, keeps what it
// trained: a stage stopped by an error (a neighbour gone, say) keeps its checkpoint as
// one stopped by its node does.
func (w *worker) fail(err error) error {
	w.cancel(err)
	<-w.idle
	if w.stepped && !errors.Is(err, ErrCheckpointWrite) { // one that failed is not tried again
		if cerr := w.checkpoint(); cerr != nil {
			return errors.Join(err, cerr)
		}
	}
	return err
}

func (w *worker) stageTime() *StageTime {
	t := NewStageTime(&w.ledger)
	t.Start = w.started0.UnixNano()
	return t
}

// accept files a frame that passed its checks and tells the core it is there. A
// duplicate or late frame (a resend, a neighbour behind) is dropped.
func (w *worker) accept(f *p2p.Frame) error {
	k := [2]int{int(f.Step), int(f.Micro)}
	var m map[[2]int]*p2p.Frame
	var e any
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
			dx := w.stage.Backward(tp, g)
			if a.Send {
				return computeDone{err: w.sendFinite(w.peerOf(w.idx-1), p2p.ProtoGradient, w.frame(p2p.KindGradient, a.Step, a.Micro, tp.B, tp.T, w.inB, dx, slotIO{}))}
			}
			return computeDone{}
		})
	case core.ShareNorm:
		w.normSent = time.Now()
		// Compute is idle: the core asked for no job.
		w.stage.ProjectGrads() // a no-op without a subspace; norms are of what the optimiser sees
		ss := optim.SumSquares(w.stage.Grads)
		if math.IsNaN(ss) || math.IsInf(ss, 0) {
			return w.diverged(a.Step, fmt.Sprintf("its gradients' sum of squares is %g", ss))
		}
		for i := range w.sp.Pipeline.Stages {
			if i != w.idx {
				w.out.control(w.peerOf(i), ctlMsg{Type: msgNorm, Run: w.plan.ID, Norm: &normMsg{Step: a.Step, Stage: w.idx, SumSq: ss}})
			}
		}
		return w.handle(core.NormIn{Step: a.Step, Stage: w.idx, SumSq: ss})
	case core.Optimize:
		w.normWaited += time.Since(w.normSent)
		w.normSteps++
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
			w.report(Report{Kind: ReportStep, Step: a.Step, Loss: loss, GradNorm: w.lastNorm,
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
		w.stepTimes = append(w.stepTimes, time.Now())
		if len(w.stepTimes) > tokensWindow+1 {
			w.stepTimes = w.stepTimes[1:]
		}
		w.publish()
		// Every stage checkpoints the same steps, so a crash loses at most the steps
		// since; the last step's checkpoint is written when the run finishes.
		if w.ck.Due(a.Step) {
			if err := w.checkpoint(); err != nil {
				return err
			}
		}
		if w.stopCause != nil && a.Step >= w.stopAt {
			w.log.Info("step finished; stopping", "step", a.Step)
			w.cancel(w.stopCause)
		}
	case core.Sync:
		return w.beginSync(a.Step)
	case core.EvalDone:
		if w.stage.Last {
			v := w.lossSum / float64(w.windows)
			w.report(Report{Kind: ReportEval, Step: a.Step, ValLoss: v})
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

// beginSync does the outer-step work after step, with compute idle: first it applies
// the overlapped outer steps begun after the step before (waiting for their
// all-reduce if it is still going), then it takes the contributions of every fragment
// due now and all-reduces them on another goroutine, so the loop keeps taking frames.
// Overlapped (Streaming DiLoCo, not the last step), those are applied after the next
// step and the core goes on at once; otherwise synced applies them when they are done.
func (w *worker) beginSync(step int) error {
	w.syncStep = step
	if w.pend != nil && !w.pend.done {
		w.waiting = true // reduced resumes here when w.pend's all-reduce is done
		return nil
	}
	rep := &OuterReport{Contributors: w.sp.Pipeline.Replicas}
	applied := false
	if p := w.pend; p != nil {
		w.pend = nil
		if err := w.apply(p, rep, true); err != nil {
			return err
		}
		applied = true
	}
	d := w.sp.DiLoCo
	overlap := d.Overlapped() && step != w.sp.Train.Steps
	e := &syncDone{step: step, overlapped: overlap}
	for f := range d.Fragments {
		if d.Due(f, step, w.sp.Train.Steps) {
			e.frags = append(e.frags, f)
			// Fragments are disjoint parts of the Outer's scratch, untouched until applied.
			if overlap {
				e.ys = append(e.ys, w.outer.Begin(f, w.stage.Params))
			} else {
				e.ys = append(e.ys, w.outer.Contribution(f, w.stage.Params))
			}
		}
	}
	if len(e.frags) > 0 {
		w.syncStart = time.Now()
		w.runReduce(e)
		if !overlap {
			w.partial = nil
			if applied {
				w.partial = rep
			}
			return nil // synced finishes the step
		}
		w.pend = e
	}
	if applied {
		w.finishOuter(step, rep)
	}
	return w.handle(core.Synced{Step: step})
}

// runReduce all-reduces e's contributions on its own goroutine and posts e back.
func (w *worker) runReduce(e *syncDone) {
	d := w.sp.DiLoCo
	// A replica still computing its inner steps is waited for up to three times what
	// this one took since its last sync, or on average between syncs, whichever is
	// longer: replicas share the same work per step, so one slower than that is stalled
	// or dead. It is left behind and fetches the result if it comes back.
	span := w.syncStart.Sub(w.lastSync)
	mean := w.syncStart.Sub(w.started0) / time.Duration(w.syncs+1)
	arrive := 3 * max(span, mean)
	w.outerAllow = arrive + 4*w.syncTook + time.Second
	go func() {
		w.connectReplicas()
		var results []*reduce.Result
		var fetched *fetchedState
		var err error
		for i, f := range e.frags {
			round := uint64(e.step)*uint64(d.Fragments) + uint64(f)
			var res *reduce.Result
			res, err = w.group.AllReduce(w.ctx, round, e.ys[i], arrive)
			if errors.Is(err, reduce.ErrBehind) {
				w.log.Warn("fell behind the other replicas; fetching the stage's global state", "step", e.step)
				if fetched, err = w.fetchState(round, arrive); err == nil {
					break
				}
			}
			if err != nil {
				err = fmt.Errorf("outer step after step %d: %w", e.step, err)
				break
			}
			results = append(results, res)
		}
		w.post(reduceDone{e: e, results: results, fetched: fetched, err: err})
	}()
}

// reduced takes a finished all-reduce: an overlapped one waits to be applied after
// the next step (or is applied now if that step is already waiting for it).
func (w *worker) reduced(r reduceDone) error {
	e := r.e
	e.results, e.fetched, e.err, e.done = r.results, r.fetched, r.err, true
	if !e.overlapped {
		return w.synced(e)
	}
	if w.waiting {
		w.waiting = false
		return w.beginSync(w.syncStep)
	}
	return nil
}

// fetchState downloads the stage's global weights and outer momentum from a live
// replica once they include round: the others may still be finishing it when this
// one learns it was left out. It tries for as long as a replica is waited for.
func (w *worker) fetchState(round uint64, wait time.Duration) (*fetchedState, error) {
	deadline := time.Now().Add(wait)
	for pause := 50 * time.Millisecond; ; pause = min(2*pause, time.Second) {
		r, vecs, err := w.group.FetchState(w.ctx)
		switch {
		case err == nil && r >= round:
			return &fetchedState{round: r, vecs: vecs}, nil
		case err == nil:
			err = fmt.Errorf("the replicas' state is of round %d, before round %d", r, round)
		}
		if time.Now().After(deadline) || w.ctx.Err() != nil {
			return nil, fmt.Errorf("behind the other replicas, and fetching their state failed: %w", err)
		}
		select {
		case <-time.After(pause):
		case <-w.ctx.Done():
		}
	}
}

// connectReplicas makes sure this stage is connected to the other replicas of its
// stage: the all-reduce only speaks on connections that exist, so that a member
// whose connection dies is given up at once instead of redialled mid-round.
//
// The dials go in parallel, each given two seconds and ten of the peer's round trips
// (a handshake takes a few): a replica that is gone must not hold up the outer step
// longer than the all-reduce would wait for it.
func (w *worker) connectReplicas() {
	var wg sync.WaitGroup
	for r, row := range w.grid {
		id := row[w.idx]
		if r == w.rep || p2p.Linked(w.host.Network(), id) {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(p2p.AllowRelayed(w.ctx, "replica"), 2*time.Second+10*w.host.Peerstore().LatencyEWMA(id))
			defer cancel()
			if err := w.host.Host.Connect(ctx, peer.AddrInfo{ID: id}); err != nil {
				w.log.Warn("cannot reach a replica of this stage", "replica", r, "peer", id, "err", err)
			}
		}()
	}
	wg.Wait()
}

// synced applies a blocking outer step's all-reduce results, reports them (with
// whatever overlapped steps were applied before them at the same step), and lets the
// core go on.
func (w *worker) synced(e *syncDone) error {
	rep := w.partial
	w.partial = nil
	if rep == nil {
		rep = &OuterReport{Contributors: w.sp.Pipeline.Replicas}
	}
	if err := w.apply(e, rep, false); err != nil {
		return err
	}
	w.finishOuter(e.step, rep)
	return w.handle(core.Synced{Step: e.step})
}

// apply applies a finished all-reduce (or the global state fetched instead) to the
// stage and adds it to rep.
func (w *worker) apply(e *syncDone, rep *OuterReport, overlapped bool) error {
	if e.err != nil {
		return e.err
	}
	rep.SyncS = max(rep.SyncS, time.Since(w.syncStart).Seconds())
	w.syncTook = time.Since(w.syncStart)
	if e.fetched != nil {
		if len(e.fetched.vecs) < 2 || len(e.fetched.vecs[0]) != len(w.outer.Global) || len(e.fetched.vecs[1]) != len(w.outer.Momentum()) {
			return fmt.Errorf("fetched stage state has the wrong shape")
		}
		copy(w.outer.Global, e.fetched.vecs[0])
		copy(w.outer.Momentum(), e.fetched.vecs[1])
		copy(w.stage.Params, w.outer.Global)
		rep.Fetched = true
		return nil
	}
	for i, f := range e.frags {
		res := e.results[i]
		w.outer.Apply(f, e.ys[i], res.Own, res.Avg, w.stage, overlapped)
		rep.SyncBytes += res.Sent
		for _, m := range res.Missing {
			if !slices.Contains(rep.Missing, m) {
				rep.Missing = append(rep.Missing, m)
			}
		}
		for _, c := range res.Chunks {
			rep.Contributors = min(rep.Contributors, bits.OnesCount64(c.Contributors))
		}
	}
	slices.Sort(rep.Missing)
	return nil
}

// finishOuter records an outer step applied after step: the state served to replicas
// that fall behind, the log line and the report to the launcher.
func (w *worker) finishOuter(step int, rep *OuterReport) {
	w.outer.Rounds++
	rep.OuterStep, rep.Hash = w.outer.Rounds, w.outer.Hash()
	w.serve(uint64(step)*uint64(w.sp.DiLoCo.Fragments) + uint64(w.sp.DiLoCo.Fragments-1))
	w.lastSync = time.Now()
	w.syncs++
	w.log.Info("outer step", "step", step, "outer_step", rep.OuterStep, "sync_bytes", rep.SyncBytes,
		"sync_s", fmt.Sprintf("%.3f", rep.SyncS), "weights_hash", rep.Hash, "contributors", rep.Contributors, "missing", rep.Missing, "fetched", rep.Fetched)
	w.report(Report{Kind: ReportOuter, Step: step, Outer: rep})
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

// sendFinite queues f for to, unless a value of it would arrive non-finite: then
// this stage has diverged, and it says so instead of sending (a neighbour would
// rightly count a non-finite frame as a violation).
func (w *worker) sendFinite(to peer.ID, proto protocol.ID, f *p2p.Frame) error {
	if i := f.Codec.FirstNonFinite(f.Data); i >= 0 {
		return w.diverged(int(f.Step), fmt.Sprintf("the %v values for micro-batch %d it was to send are not finite in %v (value %d is %g); nothing sent",
			f.Kind, f.Micro, f.Codec, i, f.Data[i]))
	}
	w.out.send(to, proto, f)
	return nil
}

// diverged is the error of a stage whose own computation went non-finite at step.
// It is not a peer's fault: the run stops, and says why.
func (w *worker) diverged(step int, what string) error {
	return fmt.Errorf("%w at step %d on %s: %s; try a lower train.lr", ErrDiverged, step, cellName(w.sp, w.self), what)
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
	return pairAt(w.dir, stageBase(w.idx, w.rep, w.sp.Pipeline.Replicas)).weights
}

// checkpointHeld is checkpointPath if a checkpoint is there, "" otherwise (a stage
// stopped before it wrote one).
func (w *worker) checkpointHeld() string {
	if _, err := os.Stat(w.checkpointPath()); err != nil {
		return ""
	}
	return w.checkpointPath()
}

// checkpoint writes the stage's tensors (global layer names), the spec and the step.
// It runs only while the compute goroutine is idle or stopped.
func (w *worker) checkpoint() error {
	if err := w.writeCheckpoint(); err != nil {
		return fmt.Errorf("%w at step %d in %s: %w", ErrCheckpointWrite, w.doneStep, w.dir, err)
	}
	// A long run keeps its launcher record fresh: a node restarted days into it
	// still dials its launcher (see relaunchWindow).
	now := time.Now()
	_ = os.Chtimes(filepath.Join(w.dir, launcherFile), now, now)
	return nil
}

// ErrCheckpointWrite is wrapped by the error of a stage whose checkpoint could not be
// written (a full disk, an I/O error): the run stops with that reason, as waiting
// for the node would not help.
var ErrCheckpointWrite = errors.New("could not write its checkpoint")

func (w *worker) writeCheckpoint() error {
	if err := os.MkdirAll(w.dir, 0o755); err != nil {
		return err
	}
	base := stageBase(w.idx, w.rep, w.sp.Pipeline.Replicas)
	pair := pairAt(w.dir, base)
	meta := map[string]string{train.MetaSpec: w.sp.String(), train.MetaStep: strconv.Itoa(w.doneStep),
		metaStage: strconv.Itoa(w.idx), metaReplica: strconv.Itoa(w.rep)}
	// Whole only if no optimiser step has run since the step's end was recorded (a
	// stage stopped between its optimiser step and its outer step is not).
	whole := w.doneStep == w.ckStep
	if whole {
		meta[metaResumable] = "1"
	}
	if d := w.plan.Data; d != nil && d.TokenizerSHA256 != "" {
		meta[metaTokenizer] = d.TokenizerSHA256
	}
	if err := rotate(w.dir, base, w.doneStep, whole); err != nil {
		return err
	}
	if err := shard.SaveCheckpoint(pair.weights, meta, w.stage); err != nil {
		return err
	}
	// The optimiser state, so that nothing of it is lost: AdamW's moments and step, and
	// with replicas the global weights, outer momentum and error-feedback residual.
	m, v := w.opt.Moments()
	ts := []shard.Named{{Name: "adam_m", Data: m}, {Name: "adam_v", Data: v}}
	meta["adam_step"] = strconv.Itoa(w.opt.StepCount())
	if w.outer != nil {
		ts = append(ts, shard.Named{Name: "global", Data: w.outer.Global}, shard.Named{Name: "outer_momentum", Data: w.outer.Momentum()})
		if r := w.outer.Residual(); r != nil {
			ts = append(ts, shard.Named{Name: "ef_residual", Data: r})
		}
		meta["outer_steps"] = strconv.Itoa(w.outer.Rounds)
	}
	// Where the data stream was and what the lossy boundary codecs carried over at the
	// step's end.
	if w.ckSampler != nil {
		meta["sampler"] = hex.EncodeToString(w.ckSampler)
	}
	for _, b := range []struct {
		name string
		r    []float32
	}{{"in_ef_residual", w.ckIn}, {"out_ef_residual", w.ckOut}} {
		if b.r != nil {
			ts = append(ts, shard.Named{Name: b.name, Data: b.r})
		}
	}
	return shard.SaveTensors(pair.state, meta, ts)
}

// ErrStopped is the cause of a stage the launcher stopped after a step: another
// stage's node of its pipeline was stopping.
var ErrStopped = errors.New("stopped by the launcher")

// stopAfter stops the stage once step is done (at once if it is), keeping its
// checkpoint of that step.
func (w *worker) stopAfter(step int, cause error) error {
	w.log.Info("stopping after a step, as the launcher says", "step", step, "reason", cause)
	if step <= w.ckStep {
		if step < w.ckStep {
			w.log.Warn("told to stop after a step already done; stopping now", "step", step, "done", w.ckStep)
		}
		w.cancel(cause)
		return nil
	}
	w.stopCause, w.stopAt = cause, step
	time.AfterFunc(stopBackstop, func() { w.cancel(cause) })
	return nil
}

// order carries out what the launcher says of checkpoints and stopping.
func (w *worker) order(e launcherOrder) error {
	switch e.kind {
	case msgCheckpoint:
		if err := w.ck.Order(e.step, w.ckStep); err != nil {
			w.log.Warn("checkpoint ordered too late", "err", err)
			return err
		}
		w.log.Debug("checkpoint ordered", "step", e.step)
	case msgRecorded:
		if n := prune(w.dir, stageBase(w.idx, w.rep, w.sp.Pipeline.Replicas), e.step); n > 0 {
			w.log.Debug("older checkpoints removed: the launcher has recorded the run up to a later one", "step", e.step, "removed", n)
		}
	case msgStopAt:
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
func (w *worker) stepTaken(step int) error {
	w.ckStep = step
	if w.sampler != nil {
		st, err := w.sampler.AppendState(w.ckSampler[:0])
		if err != nil {
			return err
		}
		w.ckSampler = st
	}
	keep := func(dst []float32, b *train.Boundary) []float32 {
		if b == nil || b.Residual() == nil {
			return nil
		}
		return append(dst[:0], b.Residual()...)
	}
	w.ckIn, w.ckOut = keep(w.ckIn, w.inB), keep(w.ckOut, w.outB)
	return nil
}

// stop stops the run with cause, letting the loop finish a step in hand first.
// A backstop cancels it regardless, within the time the daemon waits for its runs.
func (w *worker) stop(cause error) {
	select {
	case <-w.started:
		select {
		case w.events <- stopReq{cause}:
			time.AfterFunc(stopBackstop, func() { w.cancel(cause) })
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
func (w *worker) neighbourRTT() time.Duration {
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
func (w *worker) stalled(a core.Stalled) error {
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

// stopping decides, in the loop, when a stage asked to stop does: at once, or, if it
// has shared this step's norm (every other stage may already have stepped), once the
// step is done or after a grace of four times the mean wait for the norms, plus a
// second, at most 6 s: stages stopped together then keep checkpoints of one step.
func (w *worker) stopping(cause error) {
	if w.core.Finished() {
		w.cancel(cause)
		return
	}
	// The launcher stops the other stages after the same step, so that all of them
	// hold its checkpoint: this one's step in hand once its norm is shared (the others
	// may have stepped it), else the last one done (none can step past it without
	// this stage).
	at := w.ckStep
	if w.core.Stepping() {
		at = w.core.Step()
	}
	w.report(Report{Kind: ReportStopping, Step: at, Error: cause.Error()})
	if !w.core.Stepping() {
		w.stopCause = cause
		w.cancel(cause)
		return
	}
	grace := time.Second
	if w.normSteps > 0 {
		grace += 4 * w.normWaited / time.Duration(w.normSteps)
	}
	grace = min(grace, 6*time.Second)
	w.stopCause, w.stopAt = cause, w.core.Step()
	w.log.Info("stopping after the step in hand", "step", w.stopAt, "grace", grace.Round(time.Millisecond))
	time.AfterFunc(grace, func() { w.cancel(cause) })
}

func (w *worker) report(r Report) {
	r.Run, r.Stage, r.Replica, r.Peer = w.plan.ID, w.idx, w.rep, w.host.ID().String()
	if w.plan.Join != nil {
		r.Join = w.plan.Join.Nonce
	}
	w.out.control(w.launcher, ctlMsg{Type: msgReport, Run: w.plan.ID, Report: &r})
}

// tokensWindow is how many recent steps tokens/s is measured over.
const tokensWindow = 10

// baseView is what the status page shows of the stage before it has taken a step.
func (w *worker) baseView() status.Run {
	return status.Run{Run: fmt.Sprintf("%016x", w.plan.ID), Name: w.sp.Name, Stage: w.idx, Stages: w.sp.Pipeline.Stages,
		Replica: w.rep, Replicas: w.sp.Pipeline.Replicas, State: status.RunAccepted, Steps: w.sp.Train.Steps}
}

// publish makes what the loop knows of the stage's progress visible to the status
// page. Only the loop calls it.
func (w *worker) publish() {
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

// finalView is how the stage ended, for the status page; call it once done is
// closed (it reads err).
func (w *worker) finalView() status.Run {
	r := w.statusView()
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

// statusView is the stage as the status page shows it: as last published, with its
// byte counts as of now.
func (w *worker) statusView() status.Run {
	r := w.baseView()
	if v := w.view.Load(); v != nil {
		r = *v
	}
	r.BytesIn = w.recvd.total()
	r.BytesOut = w.sent.total()
	return r
}
