// Package core is the decision-making of one pipeline stage in a run, with no I/O, no
// goroutines and no clock: the daemon feeds it events (an activation arrived, a compute
// finished, a peer's gradient norm arrived) and carries out the actions it returns
// (compute this, send that, step the optimiser). Everything that decides what happens
// next lives here, so it is tested by feeding scripts of events.
//
// A step is M micro-batches scheduled one-forward-one-backward (1F1B): a stage prefers
// a backward whenever a gradient is waiting, and runs at most Stages−Stage forwards
// ahead of its backwards, which bounds the activations it holds. When a stage has all M
// backwards it shares its gradient's sum of squares with every other stage; once it has
// all of them it clips by the global norm and steps, exactly as the single-process
// trainer does. On evaluation steps the validation batches then flow forward through
// the pipeline.
package core

import (
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/pipeswarm/pipeswarm/p2p/clock"
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
	// OuterDue, if set, says after which steps the stage takes an outer (DiLoCo) step
	// with the other replicas of its stage, after its optimiser step and before the
	// step is done; nil means never (one replica).
	OuterDue func(step int) bool
	// StartTimeout bounds a wait before the stage has measured a step of its own (the
	// first step: neighbours still loading data, dialling, warming up); after that,
	// deadlines come from the step times measured. 0 means no deadline before then.
	StartTimeout time.Duration
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
	case c.EvalInterval < 0 || c.EvalBatches < 0:
		return fmt.Errorf("core: eval interval %d, batches %d", c.EvalInterval, c.EvalBatches)
	case c.MaxInFlight < 0:
		return fmt.Errorf("core: max in flight %d", c.MaxInFlight)
	case c.StartTimeout < 0:
		return fmt.Errorf("core: start timeout %s", c.StartTimeout)
	}
	return nil
}

// Slots is how many activation tapes the stage needs: one per forward in flight.
func (c Config) Slots() int { return min(c.maxInFlight(), c.MicroBatches) }

func (c Config) maxInFlight() int {
	if c.MaxInFlight > 0 {
		return c.MaxInFlight
	}
	return c.Stages - c.Stage
}

func (c Config) first() bool { return c.Stage == 0 }
func (c Config) last() bool  { return c.Stage == c.Stages-1 }

// EvalDue reports whether validation runs after step.
func (c Config) EvalDue(step int) bool {
	return c.EvalBatches > 0 && (step == c.Steps || (c.EvalInterval > 0 && step%c.EvalInterval == 0))
}

// Events.
type (
	// Start begins the run.
	Start struct{}
	// ActivationIn: the previous stage's output for a micro-batch arrived.
	ActivationIn struct{ Step, Micro int }
	// GradientIn: the next stage's input gradient for a micro-batch arrived.
	GradientIn struct{ Step, Micro int }
	// NormIn: a stage's (possibly this one's) gradient sum of squares for a step.
	NormIn struct {
		Step, Stage int
		SumSq       float64
	}
	// EvalIn: the previous stage's output for a validation batch arrived.
	EvalIn struct{ Step, Batch int }
	// Done: the compute action the core last asked for finished.
	Done struct{}
	// Synced: the outer step asked for by Sync is applied.
	Synced struct{ Step int }
	// Tick: time has passed. Now is the time since the run began on the caller's clock
	// (the core has none); RTT is the longest round trip to the stage's neighbours
	// measured so far; Outer is how long a neighbour's outer step may take (its
	// all-reduce waits that long for a replica that is gone, as this stage's does).
	// Other events happen at the last tick's Now.
	Tick struct{ Now, RTT, Outer time.Duration }
	// PeerDown: the node holding stage Stage of this pipeline is unreachable.
	PeerDown struct{ Stage int }
)

// Actions. Forward, Backward, Optimize and EvalForward are compute: the core asks for
// one at a time and waits for Done.
type (
	// Forward runs micro-batch Micro of Step into tape Slot (stage 0 samples it first;
	// the last stage also computes its loss). Send, if set, says to send the output on.
	Forward struct {
		Step, Micro, Slot int
		Send              bool
	}
	// Backward runs the micro-batch in Slot backward; Send says to send the input
	// gradient back to the previous stage.
	Backward struct {
		Step, Micro, Slot int
		Send              bool
	}
	// ShareNorm: compute this stage's gradient sum of squares for Step, send it to
	// every other stage, and feed it back as NormIn.
	ShareNorm struct{ Step int }
	// Optimize: clip by the global gradient norm Norm and take the optimiser step.
	Optimize struct {
		Step int
		Norm float64
	}
	// EvalForward runs validation batch Batch forward (the last stage adds its loss
	// to the evaluation); Send says to send the output on.
	EvalForward struct {
		Step, Batch int
		Send        bool
	}
	// StepDone: Step is finished on this stage (the last stage reports its loss).
	StepDone struct{ Step int }
	// EvalDone: the evaluation after Step is finished on this stage.
	EvalDone struct{ Step int }
	// Sync: take the outer step after Step with the stage's other replicas; answer
	// with Synced. Compute is idle meanwhile; frames for the next step may arrive.
	Sync struct{ Step int }
	// Finished: every step is done; write the checkpoint and report.
	Finished struct{}
	// Stalled: the stage cannot go on: it has waited for stage Stage (for what Wait
	// says) past its deadline, or that stage's node is down. The core asks for nothing
	// more.
	Stalled struct {
		Step, Stage      int
		Wait             Wait
		Waited, Deadline time.Duration
		Down             bool
	}
)

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
	busy  bool    // a compute action is out
	cur   pending // which one

	// training step state
	forwarded, backwarded int
	slotOf                map[int]int // micro -> tape slot, while in flight
	free                  []int
	acts                  map[key]bool
	grads                 map[key]bool
	norms                 map[int]map[int]float64 // step -> stage -> sumsq

	// evaluation state
	evalNext int
	evalIns  map[key]bool

	// time, from ticks: the last tick, the last event that was not one (liveness of the
	// neighbours, or this stage's own progress), and the step times measured.
	now, rtt  time.Duration
	outer     time.Duration
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
	return &Core{cfg: cfg, acts: map[key]bool{}, grads: map[key]bool{}, norms: map[int]map[int]float64{},
		evalIns: map[key]bool{}, slotOf: map[int]int{}, downAfter: -1}, nil
}

// Step is the step in progress (0 before Start).
func (c *Core) Step() int { return c.step }

// Stepping reports whether the stage has shared its gradient norm for the step in
// progress and waits for the others', runs its optimiser step or takes its outer
// step: the step will be taken by every stage once the norms are in, so a stage asked
// to stop lets it finish.
func (c *Core) Stepping() bool {
	return c.phase == sharing || c.phase == stepping || c.phase == syncing
}

// Finished reports whether the run is over for this stage.
func (c *Core) Finished() bool { return c.phase == finished }

// Handle takes one event and returns what to do, in order.
func (c *Core) Handle(e any) ([]any, error) {
	if t, ok := e.(Tick); ok {
		return c.tick(t), nil
	}
	if c.stalled {
		return nil, nil // the stage is stopping; nothing more is asked for
	}
	c.lastEvent = c.now
	var out []any
	switch e := e.(type) {
	case Start:
		if c.phase != idle {
			return nil, fmt.Errorf("%w: start twice", ErrProtocol)
		}
		if c.cfg.EvalFrom && c.cfg.From > 0 && c.cfg.EvalDue(c.cfg.From) {
			c.step, c.phase, c.evalNext = c.cfg.From, evaluating, 0
			break
		}
		out = c.beginStep(c.cfg.From+1, out)
	case ActivationIn:
		if c.cfg.first() {
			return nil, fmt.Errorf("%w: activation sent to stage 0", ErrProtocol)
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
		switch {
		case e.Step < c.step || (e.Step == c.step && c.phase != training):
			return nil, fmt.Errorf("%w: gradient for step %d while at step %d", ErrStale, e.Step, c.step)
		case e.Step > c.step:
			return nil, fmt.Errorf("%w: gradient for step %d while at step %d", ErrProtocol, e.Step, c.step)
		case e.Micro < 0 || e.Micro >= c.forwarded:
			return nil, fmt.Errorf("%w: gradient for micro-batch %d never sent", ErrProtocol, e.Micro)
		}
		backing := c.busy && c.cur.kind == 2 && c.cur.micro == e.Micro // its gradient already came
		if _, ok := c.slotOf[e.Micro]; !ok || backing || c.grads[key{e.Step, e.Micro}] {
			return nil, fmt.Errorf("%w: gradient for micro-batch %d twice", ErrStale, e.Micro)
		}
		c.grads[key{e.Step, e.Micro}] = true
	case NormIn:
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
	case Synced:
		if c.phase != syncing || e.Step != c.step {
			return nil, fmt.Errorf("%w: synced step %d while at step %d, not syncing", ErrProtocol, e.Step, c.step)
		}
		out = c.stepDone(out)
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
		// A step whose norms are all in (or whose norm from that stage is) can still
		// be finished here: do so, so that stages stopped together keep one step,
		// and stop after it.
		if c.phase == stepping || c.phase == syncing || (c.phase == sharing && c.hasNorm(e.Stage)) {
			if c.downAfter < 0 {
				c.downAfter = e.Stage
			}
			return c.advance(nil), nil
		}
		c.stalled = true
		return []any{Stalled{Step: c.step, Stage: e.Stage, Wait: c.Waiting(), Down: true}}, nil
	default:
		return nil, fmt.Errorf("%w: unknown event %T", ErrProtocol, e)
	}
	return c.advance(out), nil
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

func (c *Core) beginStep(step int, out []any) []any {
	c.step, c.phase = step, training
	c.stepFrom = c.now
	c.forwarded, c.backwarded = 0, 0
	c.free = c.free[:0]
	for s := c.cfg.Slots() - 1; s >= 0; s-- {
		c.free = append(c.free, s)
	}
	clear(c.slotOf)
	return out
}

// pending is what the compute in progress is, for completed().
type pending struct {
	kind        int // 1 forward, 2 backward, 3 optimize, 4 eval
	micro, slot int
}

// advance issues the next compute if none is running and one is ready.
func (c *Core) advance(out []any) []any {
	for !c.busy {
		var next []any
		switch c.phase {
		case training:
			next = c.nextTraining()
		case sharing:
			next = c.tryOptimize()
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

func (c *Core) nextTraining() []any {
	// 1F1B: a waiting gradient first.
	if !c.cfg.last() {
		for m := c.forwarded - c.inFlight(); m < c.forwarded; m++ {
			slot, ok := c.slotOf[m]
			if ok && c.grads[key{c.step, m}] {
				delete(c.grads, key{c.step, m})
				c.busy, c.cur = true, pending{kind: 2, micro: m, slot: slot}
				return []any{Backward{Step: c.step, Micro: m, Slot: slot, Send: !c.cfg.first()}}
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
			c.busy, c.cur = true, pending{kind: 1, micro: m, slot: slot}
			return []any{Forward{Step: c.step, Micro: m, Slot: slot, Send: !c.cfg.last()}}
		}
	}
	return nil
}

// completed updates the state for the compute that just finished.
func (c *Core) completed(out []any) []any {
	switch p := c.cur; p.kind {
	case 1: // forward
		if c.cfg.last() {
			// The last stage has the loss right away: its backward is next, on the
			// same tape, with no gradient to wait for.
			c.busy, c.cur = true, pending{kind: 2, micro: p.micro, slot: p.slot}
			out = append(out, Backward{Step: c.step, Micro: p.micro, Slot: p.slot, Send: !c.cfg.first()})
		}
	case 2: // backward
		delete(c.slotOf, p.micro)
		c.free = append(c.free, p.slot)
		c.backwarded++
		if c.backwarded == c.cfg.MicroBatches {
			c.phase = sharing
			out = append(out, ShareNorm{Step: c.step})
		}
	case 3: // optimize
		delete(c.norms, c.step)
		if c.cfg.OuterDue != nil && c.cfg.OuterDue(c.step) {
			c.phase = syncing
			return append(out, Sync{Step: c.step})
		}
		out = c.stepDone(out)
	case 4: // evaluation batch
		c.evalNext++
		if c.evalNext == c.cfg.EvalBatches {
			out = append(out, EvalDone{Step: c.step})
			out = c.nextStep(out)
		}
	}
	return out
}

// stepDone finishes the step: evaluation if due, else the next step.
func (c *Core) stepDone(out []any) []any {
	d := c.now - c.stepFrom
	c.stepSum += d
	c.stepMax = max(c.stepMax, d)
	c.stepN++
	out = append(out, StepDone{Step: c.step})
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

func (c *Core) nextStep(out []any) []any {
	if c.step == c.cfg.Steps {
		c.phase = finished
		return append(out, Finished{})
	}
	return c.beginStep(c.step+1, out)
}

// tryOptimize steps once every stage's norm for this step is in.
func (c *Core) tryOptimize() []any {
	m := c.norms[c.step]
	if len(m) < c.cfg.Stages {
		return nil
	}
	var ss float64
	for s := range c.cfg.Stages { // a fixed order: every stage sums the same way
		ss += m[s]
	}
	c.phase = stepping
	c.busy, c.cur = true, pending{kind: 3}
	return []any{Optimize{Step: c.step, Norm: sqrt(ss)}}
}

func (c *Core) nextEval() []any {
	b := c.evalNext
	if !c.cfg.first() {
		k := key{c.step, b}
		if !c.evalIns[k] {
			return nil
		}
		delete(c.evalIns, k)
	}
	c.busy, c.cur = true, pending{kind: 4, micro: b}
	return []any{EvalForward{Step: c.step, Batch: b, Send: !c.cfg.last()}}
}

// Wait is what a stage is doing, or waiting for when it computes nothing.
type Wait int

const (
	Computing      Wait = iota // a compute action is out
	WaitActivation             // the previous stage's output (training or validation)
	WaitGradient               // the next stage's input gradient
	WaitNorm                   // the later stages' gradient norms, in flight (the exchange itself)
	WaitSync                   // the outer step with the other replicas
	// WaitBubble is the pipeline's drain: an earlier stage's norm, which it sends
	// when its own backward passes, run after this stage's, are done.
	WaitBubble
	Stopped // not started, or finished
	NumWaits
)

var waitNames = [NumWaits]string{"compute", "activation", "gradient", "norm", "sync", "bubble", "stopped"}

func (w Wait) String() string {
	if w < 0 || w >= NumWaits {
		return fmt.Sprintf("wait(%d)", int(w))
	}
	return waitNames[w]
}

// Waiting says what the stage is doing now: computing, or, idle, what it needs
// before it can compute again. Utilisation and the split of idle time come from it.
func (c *Core) Waiting() Wait {
	if c.busy {
		return Computing
	}
	switch c.phase {
	case training:
		if !c.cfg.first() && c.forwarded < c.cfg.MicroBatches && c.inFlight() < c.cfg.maxInFlight() && c.inFlight() == 0 {
			return WaitActivation
		}
		if c.cfg.last() || c.inFlight() > 0 {
			return WaitGradient
		}
		return WaitActivation
	case sharing:
		// An earlier stage's backward passes follow this one's, and its norm follows
		// them: waiting for it is waiting for the pipeline to drain.
		for s := range c.cfg.Stage {
			if !c.hasNorm(s) {
				return WaitBubble
			}
		}
		return WaitNorm
	case stepping:
		return WaitNorm
	case syncing:
		return WaitSync
	case evaluating:
		return WaitActivation
	}
	return Stopped
}

// Ledger adds up how long a stage spent in each Wait, and keeps the intervals that
// fall in a window of steps for a timeline. Times are offsets from the run's start,
// measured (a node) or virtual (the WAN bench's meter), so it is deterministic.
type Ledger struct {
	Total [NumWaits]time.Duration
	// Window, if Hi > 0, is the steps [Lo, Hi] whose intervals are kept in Spans.
	Window struct{ Lo, Hi int }
	Spans  []Span

	at      time.Duration
	cur     Wait
	step    int
	started bool
}

// Span is one interval of a stage's timeline.
type Span struct {
	Step       int
	Wait       Wait
	Start, End time.Duration
}

// Mark closes the interval since the last mark, in the state then current, and
// enters state w (of step) at time at.
func (l *Ledger) Mark(at time.Duration, w Wait, step int) {
	if d := at - l.at; d > 0 && l.started {
		l.Total[l.cur] += d
		if l.Window.Hi > 0 && l.step >= l.Window.Lo && l.step <= l.Window.Hi {
			if n := len(l.Spans); n > 0 && l.Spans[n-1].Wait == l.cur && l.Spans[n-1].End == l.at {
				l.Spans[n-1].End = at
			} else {
				l.Spans = append(l.Spans, Span{Step: l.step, Wait: l.cur, Start: l.at, End: at})
			}
		}
	}
	l.at, l.cur, l.step, l.started = at, w, step, true
}

func (c *Core) hasNorm(s int) bool {
	_, ok := c.norms[c.step][s]
	return ok
}

// needs says whether the stage still needs stage s's node: every stage takes part in
// every step's norm exchange; an evaluation needs only the previous stage.
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

// Deadline is how long the stage may wait idle for a neighbour now, by the deadline
// rule (clock.Deadline): what the step times measured lead one to expect
// (clock.Expect), or Config.StartTimeout before it has measured a step, plus round
// trips to the farthest neighbour and, once steps are measured, clock.Busy (a loaded
// machine pauses); 0 means no deadline. A slow but steady neighbour only lengthens the
// steps measured, and the deadline with them; one that stops is found within a few of
// its usual steps.
func (c *Core) Deadline() time.Duration {
	if c.stepN == 0 {
		if c.cfg.StartTimeout == 0 {
			return 0
		}
		return clock.Deadline(c.cfg.StartTimeout, c.rtt, 0)
	}
	d := clock.Deadline(clock.Expect(c.stepSum/time.Duration(c.stepN), c.stepMax), c.rtt, clock.Busy)
	// What a neighbour sends next may wait for its outer step: in the step after one,
	// and in the evaluation that follows one.
	if due := c.cfg.OuterDue; due != nil && ((c.phase == evaluating && due(c.step)) || (c.phase != evaluating && c.step > 1 && due(c.step-1))) {
		d += c.outer
	}
	return d
}

// tick advances the core's time and reports a stall once: idle, waiting for a
// neighbour (not for its own compute, nor for an outer step, which the all-reduce
// times itself), for longer than the deadline since anything last happened.
func (c *Core) tick(t Tick) []any {
	if t.Now > c.now {
		c.now = t.Now
	}
	c.rtt = max(c.rtt, t.RTT)
	c.outer = t.Outer
	if c.stalled || c.busy {
		return nil
	}
	switch c.phase {
	case training, sharing, evaluating:
	default:
		return nil
	}
	dl := c.Deadline()
	waited := c.now - c.lastEvent
	if dl == 0 || waited <= dl {
		return nil
	}
	c.stalled = true
	return []any{Stalled{Step: c.step, Stage: c.waitedFor(), Wait: c.Waiting(), Waited: waited, Deadline: dl}}
}

// waitedFor is the stage whose silence holds this one up: the previous stage for an
// activation, the next for a gradient, the first stage whose norm is missing.
func (c *Core) waitedFor() int {
	switch c.Waiting() {
	case WaitActivation:
		if !c.cfg.first() {
			return c.cfg.Stage - 1
		}
	case WaitGradient:
		if !c.cfg.last() {
			return c.cfg.Stage + 1
		}
	case WaitNorm, WaitBubble:
		for s := range c.cfg.Stages {
			if _, ok := c.norms[c.step][s]; !ok {
				return s
			}
		}
	}
	return c.cfg.Stage
}
