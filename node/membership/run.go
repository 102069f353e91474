// Package membership is a launcher's decisions about a run while it goes: which node
// holds each cell (a stage of a replica pipeline), which pipelines are whole, broken,
// lagging, stopping or rejoining, which nodes a broken pipeline's cells pass to, when
// stages checkpoint, what rows metrics.jsonl gets, and when the run has failed or
// finished. It is a deterministic state machine, as node/core is for one stage: no
// I/O, no goroutines, no clock. The launcher feeds a Run the events it sees (reports,
// nodes lost, offers, ticks), each with the time it saw it, and carries out the
// actions the Run returns (calls to nodes, rows written, the end of the run).
//
// With one replica pipeline any failure ends the run. With several, a failed, lost or
// stopped stage breaks its pipeline: its nodes go idle, the whole pipelines drop it
// from their all-reduce at once, and the run goes on while one pipeline is whole. A
// broken pipeline is probed every few seconds; once each of its cells has a node (its
// own back, a newcomer, or the idle survivor of another broken pipeline: two broken
// pipelines make one whole one), it rejoins after the next outer step every stage has
// taken. Every outer step's weight hashes must agree across the replicas of a stage.
package membership

import (
	"fmt"
	"log/slog"
	"maps"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/metrics"
)

// Config is what a Run knows of its run.
type Config struct {
	Stages, Replicas int
	Steps            int   // train.steps
	EvalInterval     int   // 0: the last step alone is evaluated
	TokensPerStep    int64 // tokens one replica pipeline trains per step
	// InnerSteps is DiLoCo's inner steps: with replicas, checkpoints ordered by time
	// fall on outer-step boundaries.
	InnerSteps         int
	CheckpointInterval int           // the count rule, 0 if none
	CheckpointEvery    time.Duration // the time rule, 0 if none
	// Trail is how many steps behind the rows recorded a stage's checkpoints may be: the
	// first stage takes a step after the last has reported it (up to core.Async.Trail
	// updates in an async pipeline, one step in a sync one).
	Trail        int
	StaffTimeout time.Duration // how long a node may take to join at all
	// Rejoinable: broken pipelines are probed and brought back when their cells can be
	// held again.
	Rejoinable bool
	Cells      []Cell // the plan's cells, in the plan's order
	// A resumed run goes on from FromStep, with Tokens trained and Elapsed spent in the
	// rows it keeps.
	Resumed  bool
	FromStep int
	Tokens   int64
	Elapsed  time.Duration
	// Unevaluated are kept rows of replica 0 whose evaluation the resumed run runs
	// again (stages stop right after a step, before its evaluation): each is recorded
	// once its validation loss comes.
	Unevaluated []metrics.Step
}

// Cell is a stage of a replica pipeline and the node holding it.
type Cell struct {
	Stage, Replica int
	Peer           string
	Need           int64 // the memory a node needs to hold it
}

// Tally is the run's figures so far, for its result.
type Tally struct {
	FromStep         int
	Steps            int     // replica pipeline 0's last step
	Loss, ValLoss    float64 // ValLoss is NaN until one is reported
	StepsRun         int     // steps replica 0 took in this part of the run
	Tokens           int64   // trained in the run, every pipeline
	TokensRun        int64   // in this part of the run
	OuterSteps       int
	SyncBytes        [][]int64 // [replica][stage]
	Broken, Rejoined []int     // each time a pipeline broke, rejoined
	Repaired         int       // cells a survivor of another broken pipeline took
	Elapsed, TimeRun time.Duration
}

// StopWait bounds how long a pipeline whose node is stopping waits for all of its
// stages to stop after the same step before it is taken out regardless.
const StopWait = 15 * time.Second

// ProbeEvery is how long a broken pipeline waits between probes of its cells.
const ProbeEvery = 2 * time.Second

// Run is one part of a launched run as the launcher watches it, from its start to the
// action Finish. Handle is its only way in.
type Run struct {
	c      Config
	cells  []Cell
	now    time.Time
	out    []Action
	over   bool
	tally  Tally
	start  time.Time // of the run, earlier than began by the resumed rows' time
	began  time.Time // of this part
	last   []time.Time
	epoch  []uint64 // each pipeline's rejoin nonce
	joined []int    // the outer step after which each pipeline last rejoined

	pending  map[int]*metrics.Step // replica 0's rows waiting for their evaluation
	trained  []int                 // steps each pipeline reported in this part
	done     map[[2]int]bool       // (stage, replica) finished
	broken   map[int]string        // pipeline -> why it is out
	brokeWhy map[int]string        // why each pipeline last broke, kept when it rejoins
	lagging  map[int]bool          // left behind by an outer step, still connected
	stopping map[int]*stopState

	hashes      map[[2]int]string          // (stage, step) -> the first replica's hash
	outers      map[[2]int][]metrics.Outer // (stage, step) -> rows so far
	stageSynced map[[2]int]bool            // (stage, step) every live replica reported
	synced      map[int]int                // step -> stages whose outer step is complete

	// Checkpoints and what is recorded.
	ck           core.CheckpointClock
	common       map[int]bool // steps of orders every cell took
	rowsIn       map[int]bool // replica 0's rows recorded past through
	through      int          // replica 0's rows are all recorded up to here
	latest       map[int]int  // replica > 0 -> its last row recorded
	toldRecorded int

	silence silenceClock

	// Rejoining.
	newcomers []Candidate
	probeAt   map[int]time.Time // when a broken pipeline is probed next
	probes    map[int]*probe    // under way
	moves     map[int]map[int]string
	wantJoin  map[int]bool
	joining   *joinRound
}

type stopState struct {
	step    int
	why     string
	since   time.Time
	stopped map[int]bool
}

// joinRound is the pipelines being brought back after an outer step, one at a time
// (each join changes who is whole for the next), and the outer step's missing
// replicas, judged once they are in.
type joinRound struct {
	step    int
	queue   []int
	current int
	then    *OuterTaken
}

// New starts watching a run at now.
func New(c Config, now time.Time) (*Run, error) {
	S, R := c.Stages, c.Replicas
	if S < 1 || R < 1 || c.Steps < 1 {
		return nil, fmt.Errorf("membership: %d stages, %d replicas, %d steps; want at least 1 of each", S, R, c.Steps)
	}
	seen := map[[2]int]bool{}
	for _, a := range c.Cells {
		if a.Stage < 0 || a.Stage >= S || a.Replica < 0 || a.Replica >= R || seen[[2]int{a.Stage, a.Replica}] {
			return nil, fmt.Errorf("membership: cell (stage %d, replica %d) out of the %d×%d grid or twice", a.Stage, a.Replica, S, R)
		}
		seen[[2]int{a.Stage, a.Replica}] = true
	}
	if len(seen) != S*R {
		return nil, fmt.Errorf("membership: %d cells for %d stages × %d replicas", len(seen), S, R)
	}
	align := 1
	if R > 1 {
		align = max(1, c.InnerSteps)
	}
	r := &Run{c: c, cells: slices.Clone(c.Cells), now: now, start: now, began: now,
		last: make([]time.Time, R), epoch: make([]uint64, R), joined: make([]int, R), trained: make([]int, R),
		pending: map[int]*metrics.Step{}, done: map[[2]int]bool{}, broken: map[int]string{}, brokeWhy: map[int]string{},
		lagging: map[int]bool{}, stopping: map[int]*stopState{}, hashes: map[[2]int]string{},
		outers: map[[2]int][]metrics.Outer{}, stageSynced: map[[2]int]bool{}, synced: map[int]int{},
		ck:     core.CheckpointClock{Every: c.CheckpointEvery, Interval: c.CheckpointInterval, Align: align, Last: c.Steps, Lead: time.Second},
		common: map[int]bool{}, rowsIn: map[int]bool{}, latest: map[int]int{},
		probeAt: map[int]time.Time{}, probes: map[int]*probe{}, moves: map[int]map[int]string{}, wantJoin: map[int]bool{}}
	r.tally = Tally{ValLoss: math.NaN(), SyncBytes: make([][]int64, R)}
	for i := range R {
		r.tally.SyncBytes[i] = make([]int64, S)
		r.last[i] = now
	}
	if c.Resumed {
		// Tokens and elapsed time go on from where the interrupted run left them.
		r.tally.Tokens, r.tally.Steps, r.tally.FromStep = c.Tokens, c.FromStep, c.FromStep
		r.start = now.Add(-c.Elapsed)
		r.through, r.toldRecorded = c.FromStep, c.FromStep
		for _, s := range c.Unevaluated {
			s.ValLoss = nil
			r.pending[s.Step] = &s
		}
	}
	r.silence.staff = c.StaffTimeout
	r.silence.heard(now, false)
	return r, nil
}

// Cells returns who holds each cell now, in the plan's order.
func (r *Run) Cells() []Cell { return slices.Clone(r.cells) }

// Unevaluated returns replica 0's rows still waiting for their evaluation, by step.
// A run that ends so records them without it: every stage holds that step's
// checkpoint, and a resumed run evaluates it again first and fills it in.
func (r *Run) Unevaluated() []metrics.Step {
	var out []metrics.Step
	for _, step := range slices.Sorted(maps.Keys(r.pending)) {
		out = append(out, *r.pending[step])
	}
	return out
}

// Over reports whether the run has finished (Finish was returned).
func (r *Run) Over() bool { return r.over }

// Tally returns the run's figures as of now.
func (r *Run) Tally(now time.Time) Tally {
	t := r.tally
	t.Broken, t.Rejoined = slices.Clone(t.Broken), slices.Clone(t.Rejoined)
	t.SyncBytes = make([][]int64, len(r.tally.SyncBytes))
	for i, row := range r.tally.SyncBytes {
		t.SyncBytes[i] = slices.Clone(row)
	}
	t.Elapsed, t.TimeRun = now.Sub(r.start), now.Sub(r.began)
	return t
}

// Handle takes event e, which happened at now, and returns what to do, in order.
// Once the run is over it returns nothing.
func (r *Run) Handle(now time.Time, e Event) []Action {
	if r.over {
		return nil
	}
	r.now, r.out = now, nil
	switch e := e.(type) {
	case StepTaken:
		r.stepTaken(e)
	case Evaluated:
		r.evaluated(e)
	case OuterTaken:
		r.outerTaken(e)
	case StageDone:
		if _, ok := r.heard(e.From, false); ok && !r.inBroken(e.From, false) {
			r.done[[2]int{e.Stage, e.Replica}] = true
			r.do(KeepEnd{e.Stage, e.Replica})
		}
	case Stopping:
		r.stoppingAt(e)
	case StageStopped:
		r.stageStopped(e)
	case PeerLost:
		r.peerLost(e.Peer)
	case Tick:
		r.tick()
	case NewcomersHeard:
		r.newcomers = slices.Clone(e.Candidates)
	case OfferAnswered:
		r.offerAnswered(e)
	case CheckpointTaken:
		r.common[e.Step] = true
		r.tellRecorded()
	case JoinDone:
		r.joinDone(e)
	case Interrupted:
		r.fail(RunInterrupted, "launcher interrupted", "launcher interrupted")
	}
	if !r.over && r.joining == nil && r.remaining() == 0 {
		r.end()
	}
	return r.out
}

func (r *Run) do(a ...Action) { r.out = append(r.out, a...) }

func (r *Run) log(level slog.Level, msg string, args ...any) {
	r.do(Log{Level: level, Msg: msg, Args: args})
}

// fail aborts the run with reason and finishes it as o, saying why.
func (r *Run) fail(o Outcome, reason, why string) {
	r.do(Abort{Reason: reason}, Finish{Outcome: o, Why: why})
	r.over = true
}

func (r *Run) cell(stage, replica int) (int, bool) {
	for i, a := range r.cells {
		if a.Stage == stage && a.Replica == replica {
			return i, true
		}
	}
	return -1, false
}

// heard checks that f comes from the node holding its cell, in the pipeline's
// current incarnation, and notes the time for the silence clock.
func (r *Run) heard(f From, step bool) (Cell, bool) {
	i, ok := r.cell(f.Stage, f.Replica)
	if !ok || r.cells[i].Peer != f.Peer || f.Join != r.epoch[f.Replica] {
		return Cell{}, false
	}
	r.silence.heard(r.now, step)
	return r.cells[i], true
}

// inBroken reports whether f's pipeline is out of the run; what its stages say then
// is noted as they stop, and otherwise ignored.
func (r *Run) inBroken(f From, stopped bool) bool {
	if _, ok := r.broken[f.Replica]; !ok {
		return false
	}
	if stopped {
		r.do(KeepEnd{f.Stage, f.Replica})
	}
	return true
}

func (r *Run) cellName(stage, replica int) string {
	if r.c.Replicas > 1 {
		return fmt.Sprintf("stage %d of replica %d", stage, replica)
	}
	return fmt.Sprintf("stage %d", stage)
}

func (r *Run) replicaName(replica int) string {
	if r.c.Replicas == 1 {
		return "the pipeline"
	}
	return fmt.Sprintf("replica pipeline %d", replica)
}

func (r *Run) evalDue(step int) bool {
	return core.EvalAt(step, r.c.Steps, r.c.EvalInterval)
}

func (r *Run) stepTaken(e StepTaken) {
	if _, ok := r.heard(e.From, true); !ok || r.inBroken(e.From, false) {
		return
	}
	t, rep := &r.tally, e.Replica
	if rep == 0 {
		t.Steps, t.Loss = e.Step, e.Loss
		t.StepsRun++
	}
	r.trained[rep]++
	t.Tokens += r.c.TokensPerStep
	t.TokensRun += r.c.TokensPerStep
	s := metrics.Step{Step: e.Step, Loss: e.Loss, Tokens: t.Tokens, LR: e.LR, GradNorm: e.GradNorm,
		TokensPerS: float64(r.c.TokensPerStep) / r.now.Sub(r.last[rep]).Seconds(), ElapsedS: r.now.Sub(r.start).Seconds()}
	if r.c.Replicas > 1 {
		s.Replica = &rep
	}
	r.last[rep] = r.now
	if rep == 0 {
		var mean time.Duration
		if r.silence.steps > 0 {
			mean = r.silence.sum / time.Duration(r.silence.steps)
		}
		if at, ok := r.ck.Recorded(e.Step, r.now.Sub(r.began), mean); ok {
			r.log(slog.LevelInfo, "checkpoint due by time; every stage takes it at a step ahead", "step", at, "now_at", e.Step)
			r.do(OrderCheckpoint{Step: at})
		}
		if r.evalDue(e.Step) {
			r.pending[e.Step] = &s
			return
		}
	}
	r.emit(s)
}

func (r *Run) evaluated(e Evaluated) {
	if _, ok := r.heard(e.From, false); !ok || r.inBroken(e.From, false) {
		return
	}
	p := r.pending[e.Step]
	if p == nil {
		return
	}
	v := e.ValLoss
	p.ValLoss, r.tally.ValLoss = &v, v
	// As train does: an evaluated step's time is when its validation loss is known.
	p.ElapsedS = r.now.Sub(r.start).Seconds()
	r.emit(*p)
	delete(r.pending, e.Step)
	r.last[0] = r.now // evaluation time is not training throughput
}

// emit records a step's row, and tells the stages once every row up to a common
// checkpoint step is recorded.
func (r *Run) emit(s metrics.Step) {
	r.do(WriteStep{Row: s})
	if s.Replica != nil && *s.Replica > 0 {
		r.latest[*s.Replica] = max(r.latest[*s.Replica], s.Step)
		r.tellRecorded()
	}
	if s.Replica == nil || *s.Replica == 0 {
		r.rowsIn[s.Step] = true
		for r.rowsIn[r.through+1] {
			r.through++
			delete(r.rowsIn, r.through)
		}
		r.tellRecorded()
	}
}

// tellRecorded tells the stages the newest common checkpoint step whose rows are all
// recorded: replica 0's through, and no later than any other pipeline whole and not
// lagging has got; and one every stage has taken by then (Trail), for a stage prunes
// the older ones it holds: were a stage that has yet to write it lost, the run would
// have no common step left to resume from.
func (r *Run) tellRecorded() {
	upTo := r.through
	for rep, l := range r.latest {
		if _, b := r.broken[rep]; !b && !r.lagging[rep] {
			upTo = min(upTo, l)
		}
	}
	upTo -= r.c.Trail
	c := 0
	if r.c.CheckpointInterval > 0 {
		c = upTo / r.c.CheckpointInterval * r.c.CheckpointInterval
	}
	for k := range r.common {
		if k <= upTo {
			c = max(c, k)
		}
	}
	if c > r.toldRecorded {
		r.toldRecorded = c
		r.do(TellRecorded{Step: c})
	}
}

func (r *Run) outerTaken(e OuterTaken) {
	if _, ok := r.heard(e.From, false); !ok {
		return
	}
	k := [2]int{e.Stage, e.Step}
	if e.Fetched {
		// It fell behind and took the others' newer global state: its hash is of a
		// later outer step than its own step number says.
		if r.lagging[e.Replica] {
			delete(r.lagging, e.Replica)
			r.log(slog.LevelInfo, "replica pipeline caught up: it fetched the global state", "replica", e.Replica, "stage", e.Stage, "step", e.Step)
		}
	} else if want, ok := r.hashes[k]; !ok {
		r.hashes[k] = e.Hash
	} else if want != e.Hash {
		r.fail(RunFailed, "replicas diverged", fmt.Sprintf("stage %d after step %d: replica %d's global weights hash %s, another replica's %s: the replicas diverged",
			e.Stage, e.Step, e.Replica, e.Hash, want))
		return
	}
	row := metrics.Outer{Step: e.Step, OuterStep: e.OuterStep, Stage: e.Stage, Replica: e.Replica, SyncBytes: e.SyncBytes,
		SyncS: e.SyncS, WeightsHash: e.Hash, Contributors: e.Contributors, ElapsedS: r.now.Sub(r.start).Seconds()}
	r.do(WriteOuter{Row: row})
	r.tally.SyncBytes[e.Replica][e.Stage] += e.SyncBytes
	if e.Stage == 0 && e.Replica == 0 {
		r.tally.OuterSteps++
	}
	if e.Stage == 0 && !r.stageSynced[k] {
		r.silence.outer(r.now, time.Duration(e.SyncS*float64(time.Second)))
	}
	r.outers[k] = append(r.outers[k], row)
	complete := len(r.outers[k]) >= r.c.Replicas-len(r.broken)-len(r.lagging)
	if complete {
		r.do(OuterComplete{Rows: r.outers[k]})
		delete(r.outers, k)
	}
	if complete && !r.stageSynced[k] {
		r.stageSynced[k] = true
		r.synced[e.Step]++
		if r.synced[e.Step] == r.c.Stages && len(r.wantJoin) > 0 && e.Step < r.c.Steps {
			r.joining = &joinRound{step: e.Step, queue: slices.Sorted(maps.Keys(r.wantJoin)), then: &e}
			r.nextJoin()
			return
		}
	}
	r.missing(e)
}

// missing judges the replicas an outer step went on without: one whose node is gone
// breaks its pipeline; one still connected has stalled, and lags: if it comes back it
// fetches the global state and trains on, and the others do not wait for it.
func (r *Run) missing(e OuterTaken) {
	for _, m := range e.Missing {
		if _, ok := r.broken[m.Replica]; ok || r.lagging[m.Replica] || m.Replica < 0 || m.Replica >= r.c.Replicas || e.Step <= r.joined[m.Replica] {
			continue // already out, or missing from a step before it rejoined
		}
		if !m.Up {
			if !r.breakPipeline(m.Replica, fmt.Sprintf("stage %d of replica %d missed the outer step after step %d and is gone", e.Stage, m.Replica, e.Step)) {
				return
			}
			continue
		}
		r.lagging[m.Replica] = true
		r.log(slog.LevelWarn, "replica pipeline fell behind; the others go on without waiting", "replica", m.Replica, "stage", e.Stage, "step", e.Step)
	}
}

func (r *Run) stoppingAt(e Stopping) {
	if _, ok := r.heard(e.From, false); !ok || r.inBroken(e.From, false) {
		return
	}
	if _, ok := r.stopping[e.Replica]; ok {
		return
	}
	name := r.cellName(e.Stage, e.Replica)
	why := fmt.Sprintf("the node holding %s (%s) is stopping; every stage of its pipeline stops after step %d", name, e.Peer, e.Step)
	r.log(slog.LevelWarn, "a node is stopping: every stage of its pipeline stops after the same step, keeping its checkpoint",
		"cell", name, "node", e.Peer, "after_step", e.Step)
	r.stopping[e.Replica] = &stopState{step: e.Step, why: why, since: r.now, stopped: map[int]bool{}}
	r.do(StopAt{Replica: e.Replica, Step: e.Step, Reason: fmt.Sprintf("the node holding %s is stopping", name)})
}

func (r *Run) stageStopped(e StageStopped) {
	if _, ok := r.heard(e.From, false); !ok {
		return
	}
	if r.inBroken(e.From, true) {
		r.log(slog.LevelInfo, "stage of a broken replica pipeline stopped", "stage", e.Stage, "replica", e.Replica, "reason", e.Error)
		return
	}
	r.do(KeepEnd{e.Stage, e.Replica})
	name := r.cellName(e.Stage, e.Replica)
	switch {
	case e.Failed && e.Diverged:
		// Every replica trains the same way: the run cannot go on.
		r.fail(RunDiverged, e.Error, fmt.Sprintf("%s (node %s)", e.Error, e.Peer))
		return
	case e.Failed && e.CheckpointFailed:
		// A node that cannot write its checkpoint cannot keep what it trains; waiting
		// for it would not help.
		r.fail(RunFailed, name+" could not write its checkpoint", fmt.Sprintf("%s on %s %s (free space or fix the disk on that node, then continue with launch --resume)",
			name, e.Peer, e.Error))
		return
	case e.Failed && !Replicable(e.Error):
		r.fail(RunFailed, fmt.Sprintf("stage %d failed", e.Stage), fmt.Sprintf("%s on %s: %s", name, e.Peer, e.Error))
		return
	}
	if handled := r.stopped(e.Stage, e.Replica); handled {
		return
	}
	r.breakPipeline(e.Replica, fmt.Sprintf("%s on %s stopped: %s", name, e.Peer, e.Error))
}

// Replicable says whether an error a stage reports is one a replicated run survives by
// dropping that stage's replica pipeline: anything but a run that cannot work at all
// (a bad spec; a divergence is reported as such), which would fail every replica alike.
func Replicable(msg string) bool {
	return !strings.Contains(msg, "refused")
}

func (r *Run) peerLost(id string) {
	i := slices.IndexFunc(r.cells, func(a Cell) bool { return a.Peer == id })
	if i < 0 {
		return
	}
	a := r.cells[i]
	if r.done[[2]int{a.Stage, a.Replica}] {
		return
	}
	if _, ok := r.broken[a.Replica]; ok {
		return
	}
	if r.stopped(a.Stage, a.Replica) {
		return
	}
	r.breakPipeline(a.Replica, fmt.Sprintf("the node holding %s (%s) disconnected", r.cellName(a.Stage, a.Replica), id))
}

// stopped notes that cell (stage, replica) has stopped; if its pipeline is stopping,
// it says it handled it, and takes the pipeline out once every stage has stopped.
func (r *Run) stopped(stage, replica int) (handled bool) {
	st, ok := r.stopping[replica]
	if !ok {
		return false
	}
	st.stopped[stage] = true
	if len(st.stopped) == r.c.Stages {
		delete(r.stopping, replica)
		r.breakPipeline(replica, st.why)
	}
	return true
}

// breakPipeline takes replica pipeline rep out of the run, or fails the run when it
// was the last one whole (or there is only one); it reports whether the run goes on.
func (r *Run) breakPipeline(rep int, why string) bool {
	if _, ok := r.broken[rep]; ok {
		return true
	}
	if r.c.Replicas == 1 || len(r.broken)+1 == r.c.Replicas {
		r.fail(RunDown, why, why)
		return false
	}
	r.broken[rep], r.brokeWhy[rep] = why, why
	r.tally.Broken = append(r.tally.Broken, rep)
	r.log(slog.LevelWarn, "replica pipeline broken; the run goes on without it", "replica", rep, "reason", why, "whole", r.c.Replicas-len(r.broken))
	r.idle(rep, why)
	if r.c.Rejoinable {
		r.probeAt[rep] = r.now.Add(ProbeEvery)
	}
	return true
}

// idle stops the nodes of broken pipeline rep, keeping their state, and tells every
// node of the pipelines still whole to drop rep's node of its stage from the
// all-reduce: a round waiting for a hung node ends now, not at its deadline.
func (r *Run) idle(rep int, why string) {
	act := Idle{Replica: rep, Reason: why}
	var drops []Action
	for _, a := range r.cells {
		if a.Replica == rep {
			if !slices.Contains(act.Peers, a.Peer) {
				act.Peers = append(act.Peers, a.Peer)
			}
			continue
		}
		if _, b := r.broken[a.Replica]; b {
			continue
		}
		if g, ok := r.cell(a.Stage, rep); ok {
			drops = append(drops, Drop{To: a, Gone: r.cells[g], Reason: why})
		}
	}
	r.do(act)
	r.do(drops...)
}

func (r *Run) remaining() int {
	n := 0
	for rep := range r.c.Replicas {
		if _, ok := r.broken[rep]; ok || r.lagging[rep] {
			continue
		}
		for s := range r.c.Stages {
			if !r.done[[2]int{s, rep}] {
				n++
			}
		}
	}
	return n
}

func (r *Run) tick() {
	for _, rep := range slices.Sorted(maps.Keys(r.stopping)) {
		st := r.stopping[rep]
		if r.now.Sub(st.since) > StopWait {
			delete(r.stopping, rep)
			if !r.breakPipeline(rep, st.why+" (not every stage had stopped "+StopWait.String()+" later)") {
				return
			}
		}
	}
	// The launcher's own deadline, a last resort behind the stages' (which name the
	// stage that stalled): no report at all for much longer than the steps have taken.
	if quiet, dl := r.silence.overdue(r.now, len(r.pending) > 0); quiet > 0 {
		why := fmt.Sprintf("no report from any stage for %s (deadline %s, from the steps measured)", quiet.Round(time.Second), dl.Round(time.Second))
		r.fail(RunFailed, why, why)
		return
	}
	for _, rep := range slices.Sorted(maps.Keys(r.probeAt)) {
		if _, b := r.broken[rep]; !b {
			delete(r.probeAt, rep)
			continue
		}
		if !r.now.Before(r.probeAt[rep]) && r.probes[rep] == nil {
			delete(r.probeAt, rep)
			r.startProbe(rep)
		}
	}
}

// end is the run's end once no stage of a pipeline whole is left to finish: whatever
// still lags has no one left to sync with, and a run that trained nothing on a
// pipeline, or recorded no validation loss, did not do what it was for.
func (r *Run) end() {
	for _, rep := range slices.Sorted(maps.Keys(r.lagging)) {
		if !r.breakPipeline(rep, fmt.Sprintf("replica %d fell behind and had not caught up when the others finished", rep)) {
			return
		}
	}
	var idle []string
	for rep, n := range r.trained {
		if n == 0 {
			why := r.brokeWhy[rep]
			if why == "" {
				why = "no step was reported"
			}
			idle = append(idle, fmt.Sprintf("%s trained no step of %d (%s)", r.replicaName(rep), r.c.Steps, why))
		}
	}
	r.over = true
	if len(idle) > 0 {
		r.do(Finish{Outcome: RunFailed, Why: strings.Join(idle, "; ")})
		return
	}
	if math.IsNaN(r.tally.ValLoss) {
		why := r.brokeWhy[0]
		if why == "" {
			why = "its evaluation was never reported"
		}
		r.do(Finish{Outcome: RunFailed, Why: fmt.Sprintf("no validation loss was recorded: replica pipeline 0, which evaluates, stopped at step %d (%s)", r.tally.Steps, why)})
		return
	}
	r.do(Finish{Outcome: RunFinished})
}
