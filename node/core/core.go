// Package core is the decision-making of one pipeline stage in a run, with no I/O, no
// goroutines and no clock: the daemon feeds it events (an activation arrived, a compute
// finished, a peer's gradient norm arrived, an all-reduce is over) and carries out the
// actions it returns (compute this, send that, step the optimiser, start the outer
// step's all-reduce, write a checkpoint). Everything that decides what happens next
// lives here, so it is tested by feeding scripts of events; the WAN bench's meter runs
// the same core on virtual time.
//
// A step is M micro-batches scheduled one-forward-one-backward (1F1B): a stage prefers
// a backward whenever a gradient is waiting, and runs at most Stages−Stage forwards
// ahead of its backwards, which bounds the activations it holds. When a run clips by
// the global gradient norm, a stage with all M backwards shares its gradient's sum of
// squares with every other stage and, once it has all of them, clips and steps, exactly
// as the single-process trainer does; a run that does not clip exchanges nothing and
// steps at once. With replicas, the outer (DiLoCo) step comes next (outer.go), then the
// checkpoint if one is due (checkpoint.go), then on evaluation steps the validation
// batches flow forward through the pipeline.
package core

import (
	"errors"
	"fmt"
	"math"
	"time"
)

var sqrt = math.Sqrt

// ErrProtocol is wrapped by errors about events that cannot happen in a correct run
// (a duplicate micro-batch, a gradient for a micro-batch never sent, ...).
var ErrProtocol = errors.New("core: protocol violation")

// ErrStale is wrapped by errors about events that come twice or too late (a frame
// resent after a retry, a norm for a step already taken): the caller drops them; the
// core's state is unchanged.
var ErrStale = errors.New("core: duplicate or late")

// Config is one stage's view of the run.
type Config struct {
	Stage, Stages int
	MicroBatches  int // per optimiser step
	Steps         int
	// From is the last step already taken (a resumed run): Start begins step From+1.
	From int
	// EvalFrom: a resumed run first runs the evaluation due after step From, then step
	// From+1. Stages stopped together stop right after a step, before its evaluation,
	// so the evaluation is run again rather than lost (it is exact: same weights).
	EvalFrom     bool
	EvalInterval int // 0: evaluate after the last step only
	EvalBatches  int // validation batches per evaluation
	// MaxInFlight bounds forwards not yet matched by a backward; 0 means the 1F1B
	// bound Stages−Stage.
	MaxInFlight int
	// Clip says the optimiser step clips by the global gradient norm (train.grad_clip
	// above 0): every stage then shares its gradient's sum of squares and steps only
	// once it has every stage's, a barrier across the pipeline. Without it no norm is
	// exchanged and a stage steps as soon as its own backwards are done.
	Clip bool
	// CheckpointInterval asks for a checkpoint every that many steps (0: none by
	// count); the launcher may order more (CheckpointAt).
	CheckpointInterval int
	// Outer is when the stage takes outer (DiLoCo) steps with the other replicas of
	// its stage, after its optimiser step and before the step is done; nil means
	// never (one replica).
	Outer *Outer
	// Async runs the asynchronous schedule (asynccore.go) instead of 1F1B: no flush
	// and no step barrier; Steps, EvalInterval, CheckpointInterval and Outer count
	// updates, MaxInFlight is the schedule's in-flight bound of stage 0 (Async.Bound)
	// and the stage clips by its own gradient norm (Optimize.Own).
	Async bool
	// Stash: in an async run, a backward runs on the weights its forward ran on
	// (train.delay stash or nesterov) rather than the current ones (none).
	Stash bool
	// Joined: the stage joins an async run in progress after step From (its replica
	// pipeline rejoins), holding From's weights alone, fetched from another replica,
	// and none older. Its pipeline refills from From as a run fills at its start, and
	// a forward (or stashed backward) the schedule would run on a version before From
	// runs on From's (asynccore.go). A resumed run is not joined: its checkpoint holds
	// the past versions.
	Joined bool
	// StartTimeout bounds a wait before the stage has measured a step of its own (the
	// first step: neighbours still loading data, dialling, warming up); after that,
	// deadlines come from the step times measured. 0 means no deadline before then.
	StartTimeout time.Duration
}

// Outer is a stage's outer-step schedule.
type Outer struct {
	Fragments int // the stage's parameters are cut into this many, each synced on its own schedule
	// Due reports whether fragment f takes an outer step after step (spec.DiLoCo.Due).
	Due func(f, step int) bool
	// Overlap (Streaming DiLoCo): an outer step due after a step other than the last
	// begins its all-reduce then and is applied after the next step, which runs
	// meanwhile; otherwise the stage waits for it.
	Overlap bool
}

// Validate reports an impossible configuration.
func (c Config) Validate() error {
	switch {
	case c.Stages < 1 || c.Stage < 0 || c.Stage >= c.Stages:
		return fmt.Errorf("core: stage %d of %d", c.Stage, c.Stages)
	case c.MicroBatches < 1:
		return fmt.Errorf("core: %d micro-batches", c.MicroBatches)
	case c.Steps < 1:
		return fmt.Errorf("core: %d steps", c.Steps)
	case c.From < 0 || c.From >= c.Steps:
		return fmt.Errorf("core: resuming after step %d of %d", c.From, c.Steps)
	case c.Joined && (c.From < 1 || c.EvalFrom):
		return fmt.Errorf("core: joining after step %d (resumed %v)", c.From, c.EvalFrom)
	case c.EvalInterval < 0 || c.EvalBatches < 0:
		return fmt.Errorf("core: eval interval %d, batches %d", c.EvalInterval, c.EvalBatches)
	case c.MaxInFlight < 0:
		return fmt.Errorf("core: max in flight %d", c.MaxInFlight)
	case c.CheckpointInterval < 0:
		return fmt.Errorf("core: checkpoint interval %d", c.CheckpointInterval)
	case c.Outer != nil && (c.Outer.Fragments < 1 || c.Outer.Due == nil):
		return fmt.Errorf("core: outer steps on %d fragments, due %v", c.Outer.Fragments, c.Outer.Due != nil)
	case c.StartTimeout < 0:
		return fmt.Errorf("core: start timeout %s", c.StartTimeout)
	}
	return nil
}

// Slots is how many activation tapes the stage needs: one per forward in flight.
func (c Config) Slots() int {
	if c.Async {
		return c.schedule().Bound(c.Stage)
	}
	return min(c.maxInFlight(), c.MicroBatches)
}

func (c Config) maxInFlight() int {
	if c.Async {
		return c.schedule().Bound(c.Stage)
	}
	if c.MaxInFlight > 0 {
		return c.MaxInFlight
	}
	return c.Stages - c.Stage
}

func (c Config) first() bool { return c.Stage == 0 }
func (c Config) last() bool  { return c.Stage == c.Stages-1 }

// EvalDue reports whether validation runs after step.
func (c Config) EvalDue(step int) bool {
	return c.EvalBatches > 0 && EvalAt(step, c.Steps, c.EvalInterval)
}

type phase int

const (
	idle phase = iota
	training
	sharing  // waiting for every stage's norm
	stepping // optimiser running
	syncing  // outer step with the other replicas
	evaluating
	finished
)

type key struct{ step, item int }

// Core is one stage's scheduler. Not safe for concurrent use; the daemon's one loop
// owns it.
type Core struct {
	cfg   Config
	phase phase
	step  int
	done  int     // the last step finished (StepDone)
	busy  bool    // a compute action is out
	cur   pending // which one

	// training step state
	forwarded, backwarded int
	fwd, bwd              int         // async: the next micro-batch (over the run) to run forward, backward
	slotOf                map[int]int // micro -> tape slot, while in flight
	free                  []int
	acts                  map[key]bool
	grads                 map[key]bool
	norms                 map[int]map[int]float64 // step -> stage -> sumsq

	// evaluation state
	evalNext int
	evalIns  map[key]bool

	outer outerState
	ck    Checkpoints

	// time, from ticks: the last tick, the last event that was not one (liveness of the
	// neighbours, or this stage's own progress), and the step times measured.
	now, rtt  time.Duration
	outerWait time.Duration
	downAfter int // a stage whose node went down, to stall on once the step in hand is done; -1: none
	lastEvent time.Duration
	stepFrom  time.Duration
	stepSum   time.Duration
	stepMax   time.Duration
	stepN     int
	stalled   bool
}

// New returns the core for cfg.
func New(cfg Config) (*Core, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	c := &Core{cfg: cfg, acts: map[key]bool{}, grads: map[key]bool{}, norms: map[int]map[int]float64{},
		evalIns: map[key]bool{}, slotOf: map[int]int{}, downAfter: -1, done: cfg.From,
		ck: Checkpoints{Interval: cfg.CheckpointInterval, Last: cfg.Steps}}
	if cfg.Async {
		c.asyncStart()
	}
	return c, nil
}

// Step is the step in progress (0 before Start).
func (c *Core) Step() int { return c.step }

// Stepping reports whether the other stages may finish the step in progress whatever
// this one does next, so a stage asked to stop lets it finish: it has shared its
// gradient norm (a run that clips: the others step once they have it) or, in a run
// that does not clip, sent every forward of the step (the later stages need nothing
// more of it); or it runs its optimiser step or its outer step.
func (c *Core) Stepping() bool {
	switch c.phase {
	case sharing, stepping, syncing:
		return true
	case training:
		if c.cfg.Async {
			return c.fwd >= c.step*c.cfg.MicroBatches
		}
		return !c.cfg.Clip && c.forwarded == c.cfg.MicroBatches
	}
	return false
}

// Finished reports whether the run is over for this stage.
func (c *Core) Finished() bool { return c.phase == finished }

// Handle takes one event and returns what to do, in order.
func (c *Core) Handle(e Event) ([]Action, error) {
	switch e := e.(type) {
	case Tick:
		return c.tick(e), nil
	case CheckpointAt: // the launcher's order says nothing of the neighbours' liveness
		return nil, c.ck.Order(e.Step, c.done)
	}
	if c.stalled {
		return nil, nil // the stage is stopping; nothing more is asked for
	}
	c.lastEvent = c.now
	var out []Action
	switch e := e.(type) {
	case Start:
		if c.phase != idle {
			return nil, fmt.Errorf("%w: start twice", ErrProtocol)
		}
		out = c.resumeOuter(out)
		if c.cfg.EvalFrom && c.cfg.From > 0 && c.cfg.EvalDue(c.cfg.From) {
			c.step, c.phase, c.evalNext = c.cfg.From, evaluating, 0
			break
		}
		out = c.beginStep(c.cfg.From+1, out)
	case ActivationIn:
		if c.cfg.first() {
			return nil, fmt.Errorf("%w: activation sent to stage 0", ErrProtocol)
		}
		if c.cfg.Async {
			if err := c.asyncActivation(e); err != nil {
				return nil, err
			}
			break
		}
		if err := c.checkItem(e.Step, e.Micro, c.cfg.MicroBatches, "micro-batch"); err != nil {
			return nil, err
		}
		k := key{e.Step, e.Micro}
		if c.acts[k] || (e.Step == c.step && (c.phase != training || e.Micro < c.forwarded)) {
			return nil, fmt.Errorf("%w: activation for step %d micro-batch %d twice", ErrStale, e.Step, e.Micro)
		}
		c.acts[k] = true
	case GradientIn:
		if c.cfg.last() {
			return nil, fmt.Errorf("%w: gradient sent to the last stage", ErrProtocol)
		}
		if c.cfg.Async {
			if err := c.asyncGradient(e); err != nil {
				return nil, err
			}
			break
		}
		switch {
		case e.Step < c.step || (e.Step == c.step && c.phase != training):
			return nil, fmt.Errorf("%w: gradient for step %d while at step %d", ErrStale, e.Step, c.step)
		case e.Step > c.step:
			return nil, fmt.Errorf("%w: gradient for step %d while at step %d", ErrProtocol, e.Step, c.step)
		case e.Micro < 0 || e.Micro >= c.forwarded:
			return nil, fmt.Errorf("%w: gradient for micro-batch %d never sent", ErrProtocol, e.Micro)
		}
		backing := c.busy && c.cur.kind == kindBackward && c.cur.micro == e.Micro // its gradient already came
		if _, ok := c.slotOf[e.Micro]; !ok || backing || c.grads[key{e.Step, e.Micro}] {
			return nil, fmt.Errorf("%w: gradient for micro-batch %d twice", ErrStale, e.Micro)
		}
		c.grads[key{e.Step, e.Micro}] = true
	case NormIn:
		if !c.cfg.Clip {
			return nil, fmt.Errorf("%w: norm from stage %d in a run that does not clip", ErrProtocol, e.Stage)
		}
		if e.Stage < 0 || e.Stage >= c.cfg.Stages || e.Step > c.cfg.Steps || e.Step < 1 {
			return nil, fmt.Errorf("%w: norm from stage %d for step %d at step %d", ErrProtocol, e.Stage, e.Step, c.step)
		}
		if e.Step < c.step || (e.Step == c.step && c.phase != training && c.phase != sharing) {
			return nil, fmt.Errorf("%w: norm from stage %d for step %d at step %d", ErrStale, e.Stage, e.Step, c.step)
		}
		m := c.norms[e.Step]
		if m == nil {
			m = map[int]float64{}
			c.norms[e.Step] = m
		}
		if _, dup := m[e.Stage]; dup {
			return nil, fmt.Errorf("%w: norm from stage %d for step %d twice", ErrStale, e.Stage, e.Step)
		}
		m[e.Stage] = e.SumSq
	case EvalIn:
		if c.cfg.first() {
			return nil, fmt.Errorf("%w: evaluation input sent to stage 0", ErrProtocol)
		}
		if !c.cfg.EvalDue(e.Step) {
			return nil, fmt.Errorf("%w: evaluation input for step %d, which does not evaluate", ErrProtocol, e.Step)
		}
		if err := c.checkItem(e.Step, e.Batch, c.cfg.EvalBatches, "validation batch"); err != nil {
			return nil, err
		}
		k := key{e.Step, e.Batch}
		if c.evalIns[k] || (e.Step == c.step && c.phase == evaluating && e.Batch < c.evalNext) || (e.Step == c.step && c.phase > evaluating) {
			return nil, fmt.Errorf("%w: validation batch %d of step %d twice", ErrStale, e.Batch, e.Step)
		}
		c.evalIns[k] = true
	case ReduceDone:
		if err := c.reduceDone(e.Step); err != nil {
			return nil, err
		}
	case Done:
		if !c.busy {
			return nil, fmt.Errorf("%w: done with nothing running", ErrProtocol)
		}
		c.busy = false
		out = c.completed(out)
	case PeerDown:
		if e.Stage < 0 || e.Stage >= c.cfg.Stages || e.Stage == c.cfg.Stage {
			return nil, fmt.Errorf("%w: peer down for stage %d", ErrProtocol, e.Stage)
		}
		if !c.needs(e.Stage) {
			return nil, nil
		}
		// A step that needs nothing more of that stage can still be finished here: do
		// so, so that stages stopped together keep one step, and stop after it.
		if c.finishable(e.Stage) {
			if c.downAfter < 0 {
				c.downAfter = e.Stage
			}
			return c.advance(nil), nil
		}
		c.stalled = true
		return []Action{Stalled{Step: c.step, Stage: e.Stage, Wait: c.Waiting(), Down: true}}, nil
	default:
		return nil, fmt.Errorf("%w: unknown event %T", ErrProtocol, e)
	}
	return c.advance(out), nil
}

// finishable reports whether the step in progress can be finished without stage s:
// its optimiser step or outer step is under way, or every stage's norm it still
// needs is in, or (no clipping) stage s is an earlier one and every forward is out.
func (c *Core) finishable(s int) bool {
	switch c.phase {
	case stepping, syncing:
		return true
	case sharing:
		return c.hasNorm(s)
	case training:
		if c.cfg.Async {
			return s < c.cfg.Stage && c.fwd >= c.step*c.cfg.MicroBatches
		}
		return !c.cfg.Clip && s < c.cfg.Stage && c.forwarded == c.cfg.MicroBatches
	}
	return false
}

func (c *Core) checkItem(step, i, n int, what string) error {
	if step > c.cfg.Steps || step < 1 || i < 0 || i >= n {
		return fmt.Errorf("%w: %s %d of step %d (at step %d; %d per step, %d steps)", ErrProtocol, what, i, step, c.step, n, c.cfg.Steps)
	}
	if step < c.step {
		return fmt.Errorf("%w: %s %d of step %d, at step %d", ErrStale, what, i, step, c.step)
	}
	return nil
}

func (c *Core) beginStep(step int, out []Action) []Action {
	c.step, c.phase = step, training
	c.stepFrom = c.now
	if c.cfg.Async { // the tapes in flight carry over from update to update
		return out
	}
	c.forwarded, c.backwarded = 0, 0
	c.free = c.free[:0]
	for s := c.cfg.Slots() - 1; s >= 0; s-- {
		c.free = append(c.free, s)
	}
	clear(c.slotOf)
	return out
}

// computeKind is what the compute in progress is.
type computeKind int

const (
	kindForward computeKind = iota + 1
	kindBackward
	kindOptimize
	kindEval
	kindApplyOuter
)

// pending is the compute in progress, for completed().
type pending struct {
	kind        computeKind
	micro, slot int
}

// advance issues the next compute if none is running and one is ready, and whatever
// comes before it.
func (c *Core) advance(out []Action) []Action {
	for !c.busy && !c.stalled {
		var next []Action
		switch c.phase {
		case training:
			if c.cfg.Async {
				next = c.nextAsync()
			} else {
				next = c.nextTraining()
			}
		case sharing:
			next = c.tryOptimize()
		case syncing:
			next = c.nextOuter()
		case evaluating:
			next = c.nextEval()
		}
		if next == nil {
			return out
		}
		out = append(out, next...)
	}
	return out
}

func (c *Core) inFlight() int { return c.forwarded - c.backwarded }

func (c *Core) nextTraining() []Action {
	// 1F1B: a waiting gradient first.
	if !c.cfg.last() {
		for m := c.forwarded - c.inFlight(); m < c.forwarded; m++ {
			slot, ok := c.slotOf[m]
			if ok && c.grads[key{c.step, m}] {
				delete(c.grads, key{c.step, m})
				c.busy, c.cur = true, pending{kind: kindBackward, micro: m, slot: slot}
				return []Action{Backward{Step: c.step, Micro: m, Slot: slot, Send: !c.cfg.first()}}
			}
		}
	}
	if c.forwarded < c.cfg.MicroBatches && c.inFlight() < c.cfg.maxInFlight() && len(c.free) > 0 {
		m := c.forwarded
		if c.cfg.first() || c.acts[key{c.step, m}] {
			delete(c.acts, key{c.step, m})
			slot := c.free[len(c.free)-1]
			c.free = c.free[:len(c.free)-1]
			c.slotOf[m] = slot
			c.forwarded++
			c.busy, c.cur = true, pending{kind: kindForward, micro: m, slot: slot}
			return []Action{Forward{Step: c.step, Micro: m, Slot: slot, Send: !c.cfg.last()}}
		}
	}
	return nil
}

// completed updates the state for the compute that just finished.
func (c *Core) completed(out []Action) []Action {
	if c.cfg.Async && (c.cur.kind == kindForward || c.cur.kind == kindBackward) {
		return c.asyncCompleted(out)
	}
	switch p := c.cur; p.kind {
	case kindForward:
		if c.cfg.last() {
			// The last stage has the loss right away: its backward is next, on the
			// same tape, with no gradient to wait for.
			c.busy, c.cur = true, pending{kind: kindBackward, micro: p.micro, slot: p.slot}
			out = append(out, Backward{Step: c.step, Micro: p.micro, Slot: p.slot, Send: !c.cfg.first()})
		}
	case kindBackward:
		delete(c.slotOf, p.micro)
		c.free = append(c.free, p.slot)
		c.backwarded++
		if c.backwarded < c.cfg.MicroBatches {
			break
		}
		if !c.cfg.Clip {
			// Nothing to wait for: the stage's own gradients are all it steps with.
			c.phase = stepping
			c.busy, c.cur = true, pending{kind: kindOptimize}
			return append(out, Optimize{Step: c.step})
		}
		c.phase = sharing
		out = append(out, ShareNorm{Step: c.step})
	case kindOptimize:
		delete(c.norms, c.step)
		if c.outerDue() {
			c.beginOuter()
			return out // advance runs the outer step
		}
		out = c.stepDone(out)
	case kindEval:
		c.evalNext++
		if c.evalNext == c.cfg.EvalBatches {
			out = append(out, EvalDone{Step: c.step})
			out = c.nextStep(out)
		}
	case kindApplyOuter:
		// advance goes on with the outer step
	}
	return out
}

// stepDone finishes the step: its checkpoint if one is due, then evaluation if due,
// else the next step.
func (c *Core) stepDone(out []Action) []Action {
	d := c.now - c.stepFrom
	c.stepSum += d
	c.stepMax = max(c.stepMax, d)
	c.stepN++
	c.done = c.step
	out = append(out, StepDone{Step: c.step})
	if c.ck.Due(c.step) {
		out = append(out, Checkpoint{Step: c.step})
	}
	if c.downAfter >= 0 {
		c.stalled = true
		return append(out, Stalled{Step: c.step, Stage: c.downAfter, Wait: WaitActivation, Down: true})
	}
	if c.cfg.EvalDue(c.step) {
		c.phase, c.evalNext = evaluating, 0
		return out
	}
	return c.nextStep(out)
}

func (c *Core) nextStep(out []Action) []Action {
	if c.step == c.cfg.Steps {
		c.phase = finished
		return append(out, Finished{})
	}
	return c.beginStep(c.step+1, out)
}

// tryOptimize steps once every stage's norm for this step is in.
func (c *Core) tryOptimize() []Action {
	m := c.norms[c.step]
	if len(m) < c.cfg.Stages {
		return nil
	}
	var ss float64
	for s := range c.cfg.Stages { // a fixed order: every stage sums the same way
		ss += m[s]
	}
	c.phase = stepping
	c.busy, c.cur = true, pending{kind: kindOptimize}
	return []Action{Optimize{Step: c.step, Norm: sqrt(ss), Clip: true}}
}

func (c *Core) nextEval() []Action {
	b := c.evalNext
	if !c.cfg.first() {
		k := key{c.step, b}
		if !c.evalIns[k] {
			return nil
		}
		delete(c.evalIns, k)
	}
	c.busy, c.cur = true, pending{kind: kindEval, micro: b}
	return []Action{EvalForward{Step: c.step, Batch: b, Send: !c.cfg.last()}}
}

func (c *Core) hasNorm(s int) bool {
	_, ok := c.norms[c.step][s]
	return ok
}

// needs says whether the stage still needs stage s's node: every stage takes part in
// every step (its activations or gradients pass through each, and with clipping its
// norm); an evaluation needs only the previous stage.
func (c *Core) needs(s int) bool {
	switch c.phase {
	case training, sharing:
		return true
	case stepping, syncing:
		return c.step < c.cfg.Steps || (c.cfg.EvalDue(c.step) && s == c.cfg.Stage-1)
	case evaluating:
		return s == c.cfg.Stage-1 || c.step < c.cfg.Steps
	}
	return false
}
