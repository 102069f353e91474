package wan

import (
	"container/heap"
	"fmt"
	"math"
	"time"

	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/node/wire"
)

// normBytes is what a gradient-norm control message costs on the wire (framing,
// JSON, stream setup): small enough that latency is all that matters.
const normBytes = 160

// Trace is every piece of compute a centralised run did, as the stages of a swarm
// would do it, keyed for the meter.
type Trace struct {
	ops map[opKey]train.Op
}

type opKey struct {
	rep, stage int
	kind       train.OpKind
	step, item int
}

// NewTrace returns an empty trace; Add each op of a train.Run to it.
func NewTrace() *Trace { return &Trace{ops: map[opKey]train.Op{}} }

// Add records op (train.Options.Trace).
func (t *Trace) Add(op train.Op) {
	t.ops[opKey{op.Replica, op.Stage, op.Kind, op.Step, op.Item}] = op
}

// Ops is every op recorded, in no particular order.
func (t *Trace) Ops() []train.Op {
	out := make([]train.Op, 0, len(t.ops))
	for _, op := range t.ops {
		out = append(out, op)
	}
	return out
}

// Len is the number of ops recorded.
func (t *Trace) Len() int { return len(t.ops) }

func (t *Trace) op(k opKey) (train.Op, error) {
	op, ok := t.ops[k]
	if !ok {
		return op, fmt.Errorf("wan: meter: the trace has no %s of stage %d replica %d at step %d item %d (was the trace recorded from this spec?)",
			opNames[k.kind], k.stage, k.rep, k.step, k.item)
	}
	return op, nil
}

var opNames = map[train.OpKind]string{train.OpForward: "forward", train.OpBackward: "backward", train.OpOptimize: "optimiser step",
	train.OpEval: "validation forward", train.OpOuter: "outer step"}

// Schedule is what the meter found: when each step and evaluation would finish in a
// swarm with one machine per stage, and where each stage's time went.
type Schedule struct {
	StepEnd []time.Duration       // [step-1]: when every replica pipeline had finished it
	EvalEnd map[int]time.Duration // step → when its validation loss was known
	Wall    time.Duration
	Ledgers [][]*core.Ledger // [replica][stage]
	// Sends are, per [replica][stage], the intervals its frames occupied its links
	// in the ledgers' window (the timeline's "send").
	Sends [][][]core.Span
	// Syncs are the outer steps' all-reduce times, per stage and step.
	Syncs []SyncTime
}

// SyncTime is one outer step's all-reduce as the meter timed it.
type SyncTime struct {
	Stage, Step int
	Bytes       int64 // sent by the replicas, all together
	Dur         time.Duration
}

// meter is the discrete-event simulation behind Meter.
type meter struct {
	sp    *spec.Spec
	tr    *Trace
	prof  *Profile // nil: an ideal network (no latency, no bandwidth limit)
	scale float64

	now    time.Duration
	seq    int
	events eventQueue
	nodes  [][]*mnode
	links  map[[2]*mnode]time.Duration // directed link → when it is free
	groups map[[2]int]*syncGroup       // (stage, step) → replicas in the outer step
	sched  *Schedule
	err    error
}

type mnode struct {
	rep, stage int
	link       Link
	core       *core.Core
	ledger     *core.Ledger
	// charged says the trace's outer arithmetic of a step is on the clock already
	// (it is timed once per step, whether one all-reduce or two are applied then).
	charged map[int]bool
	begun   map[int]int // step → fragments of the overlapped all-reduce begun after it
}

// syncGroup is the replicas of a stage in the all-reduce begun after a step.
type syncGroup struct {
	ready []time.Duration // per replica, once it has started
	bytes []int64
	n     int
}

// Meter schedules sp's swarm on virtual time from a trace of its centralised run:
// every stage on a machine of its own (compute taking what the trace measured,
// divided by scale), every frame on its link arriving at max(link free, sent) +
// bits/bandwidth + latency, the stages' own cores deciding what runs when. With prof
// nil the network is ideal: what the swarm would do over loopback.
//
// Links are per ordered pair of nodes: bandwidth the lesser of the sender's and the
// receiver's, latency the sender's (so a round trip between two nodes of one profile
// is twice its latency). An outer step's all-reduce takes, once every replica is
// there, the longest time any replica needs to send its share at its bandwidth, plus
// two latencies (reduce-scatter and all-gather are pipelined); it does not compete
// with the pipeline's frames for the links. It starts where the core starts it
// (StartReduce) and the core hears ReduceDone when it ends, so with Streaming DiLoCo
// it runs under the next step as on the nodes.
func Meter(sp *spec.Spec, tr *Trace, prof *Profile, scale float64) (*Schedule, error) {
	if scale <= 0 || math.IsNaN(scale) || math.IsInf(scale, 0) {
		return nil, fmt.Errorf("wan: compute scale %g: want > 0", scale)
	}
	S, R := sp.Pipeline.Stages, sp.Pipeline.Replicas
	m := &meter{sp: sp, tr: tr, prof: prof, scale: scale, links: map[[2]*mnode]time.Duration{}, groups: map[[2]int]*syncGroup{},
		sched: &Schedule{StepEnd: make([]time.Duration, sp.Train.Steps), EvalEnd: map[int]time.Duration{}}}
	lo, hi := wire.TimelineSteps(sp.Train.Steps)
	evalN := 0
	for k := range tr.ops {
		if k.kind == train.OpEval && k.rep == 0 && k.stage == 0 {
			evalN = max(evalN, k.item+1)
		}
	}
	m.nodes = make([][]*mnode, R)
	m.sched.Ledgers = make([][]*core.Ledger, R)
	m.sched.Sends = make([][][]core.Span, R)
	for r := range R {
		m.sched.Sends[r] = make([][]core.Span, S)
		for s := range S {
			cc := train.StageCore(sp, s)
			if r == 0 {
				cc.EvalBatches = evalN
			}
			c, err := core.New(cc)
			if err != nil {
				return nil, err
			}
			n := &mnode{rep: r, stage: s, core: c, ledger: &core.Ledger{}, link: Link{Mbps: math.Inf(1)}, charged: map[int]bool{}, begun: map[int]int{}}
			if prof != nil {
				n.link = prof.Link(Cell(s, r))
			}
			n.ledger.Window.Lo, n.ledger.Window.Hi = lo, hi
			m.nodes[r] = append(m.nodes[r], n)
			m.sched.Ledgers[r] = append(m.sched.Ledgers[r], n.ledger)
		}
	}
	for _, row := range m.nodes {
		for _, n := range row {
			m.push(0, n, core.Start{})
		}
	}
	for m.events.Len() > 0 && m.err == nil {
		ev := heap.Pop(&m.events).(*event)
		m.now = ev.at
		m.handle(ev.n, ev.e)
	}
	if m.err != nil {
		return nil, m.err
	}
	for _, row := range m.nodes {
		for _, n := range row {
			if !n.core.Finished() {
				return nil, fmt.Errorf("wan: meter: stage %d of replica %d stopped at step %d (a deadlock in the schedule)", n.stage, n.rep, n.core.Step())
			}
		}
	}
	m.sched.Wall = m.now
	return m.sched, nil
}

func (m *meter) push(at time.Duration, n *mnode, e core.Event) {
	m.seq++
	heap.Push(&m.events, &event{at: at, seq: m.seq, n: n, e: e})
}

func (m *meter) fail(err error) {
	if m.err == nil {
		m.err = err
	}
}

func (m *meter) handle(n *mnode, e core.Event) {
	acts, err := n.core.Handle(e)
	if err != nil {
		m.fail(fmt.Errorf("wan: meter: stage %d replica %d: %w", n.stage, n.rep, err))
		return
	}
	for _, a := range acts {
		m.do(n, a)
	}
	n.ledger.Mark(m.now, n.core.Waiting(), m.windowStep(n))
}

// windowStep is the step by which n's timeline is kept: its own, or in an async run,
// where the stages sit at different update counts at once, stage 0's, so that every
// stage's timeline covers the same stretch of time (stage 0's updates 2 to 4 follow
// the pipeline's fill).
func (m *meter) windowStep(n *mnode) int {
	if m.sp.Pipeline.Async() {
		return m.nodes[n.rep][0].core.Step()
	}
	return n.core.Step()
}

func (m *meter) compute(n *mnode, k opKey) train.Op {
	op, err := m.tr.op(k)
	if err != nil {
		m.fail(err)
	}
	op.Dur = time.Duration(float64(op.Dur) / m.scale)
	m.push(m.now+op.Dur, n, core.Done{})
	return op
}

// send puts a frame of b bytes from n on its link to to at time at and returns when
// it arrives there.
func (m *meter) send(n, to *mnode, at time.Duration, b int64) time.Duration {
	bw := min(n.link.Mbps, to.link.Mbps)
	k := [2]*mnode{n, to}
	start := max(m.links[k], at)
	end := start
	if !math.IsInf(bw, 1) {
		end += time.Duration(float64(b) * 8 / (bw * 1e6) * float64(time.Second))
	}
	m.links[k] = end
	if w, step := n.ledger.Window, m.windowStep(n); w.Hi > 0 && step >= w.Lo && step <= w.Hi && end > start {
		m.sched.Sends[n.rep][n.stage] = append(m.sched.Sends[n.rep][n.stage], core.Span{Step: step, Start: start, End: end})
	}
	return end + n.link.Latency
}

func (m *meter) do(n *mnode, a core.Action) {
	row := m.nodes[n.rep]
	switch a := a.(type) {
	case core.Forward:
		op := m.compute(n, opKey{n.rep, n.stage, train.OpForward, a.Step, a.Micro})
		if a.Send {
			m.push(m.send(n, row[n.stage+1], m.now+op.Dur, op.Bytes), row[n.stage+1], core.ActivationIn{Step: a.Step, Micro: a.Micro})
		}
	case core.Backward:
		op := m.compute(n, opKey{n.rep, n.stage, train.OpBackward, a.Step, a.Micro})
		if a.Send {
			m.push(m.send(n, row[n.stage-1], m.now+op.Dur, op.Bytes), row[n.stage-1], core.GradientIn{Step: a.Step, Micro: a.Micro})
		}
	case core.ShareNorm:
		for _, o := range row {
			if o != n {
				m.push(m.send(n, o, m.now, normBytes), o, core.NormIn{Step: a.Step, Stage: n.stage})
			}
		}
		m.handle(n, core.NormIn{Step: a.Step, Stage: n.stage})
	case core.Optimize:
		m.compute(n, opKey{n.rep, n.stage, train.OpOptimize, a.Step, 0})
	case core.EvalForward:
		op := m.compute(n, opKey{n.rep, n.stage, train.OpEval, a.Step, a.Batch})
		if a.Send {
			m.push(m.send(n, row[n.stage+1], m.now+op.Dur, op.Bytes), row[n.stage+1], core.EvalIn{Step: a.Step, Batch: a.Batch})
		}
	case core.StepDone:
		m.sched.StepEnd[a.Step-1] = max(m.sched.StepEnd[a.Step-1], m.now)
	case core.EvalDone:
		if n.stage == len(row)-1 {
			m.sched.EvalEnd[a.Step] = m.now
		}
	case core.StartReduce:
		m.startReduce(n, a)
	case core.ApplyOuter:
		// Overlapped, the outer arithmetic is compute here, after the next step;
		// otherwise it was timed before the all-reduce (startReduce).
		var d time.Duration
		if a.Overlapped {
			d = m.outerArith(n, n.core.Step())
		}
		m.push(m.now+d, n, core.Done{})
	}
}

// outerArith is how long the outer arithmetic of the outer step after step takes on
// n, the first time it is asked for (the trace times all of it at once).
func (m *meter) outerArith(n *mnode, step int) time.Duration {
	if n.charged[step] {
		return 0
	}
	n.charged[step] = true
	op, err := m.tr.op(opKey{n.rep, n.stage, train.OpOuter, step, 0})
	if err != nil {
		m.fail(err)
	}
	return time.Duration(float64(op.Dur) / m.scale)
}

// startReduce enters n in the all-reduce begun after a.Step. A blocking one starts
// once the outer arithmetic is done; an overlapped one at once, the stage going on
// with its next step. Once every replica is in, the all-reduce takes the longest time
// any of them needs to send its share at its bandwidth, plus two latencies
// (reduce-scatter and all-gather are pipelined), and each replica hears ReduceDone.
func (m *meter) startReduce(n *mnode, a core.StartReduce) {
	// The trace has the bytes of the outer steps applied after a step: after the next
	// one for an overlapped all-reduce. Two applied after the same step (an overlapped
	// one, then the last step's) share them by their fragments, which are of about
	// equal size.
	at, frags, with := a.Step, len(a.Frags), 0
	if a.Overlap {
		at++
		n.begun[a.Step] = frags
		if at == m.sp.Train.Steps {
			with = m.sp.DiLoCo.Fragments
		}
	} else {
		with = n.begun[a.Step-1]
	}
	op, err := m.tr.op(opKey{n.rep, n.stage, train.OpOuter, at, 0})
	if err != nil {
		m.fail(err)
		return
	}
	bytes := op.Bytes * int64(frags) / int64(frags+with)
	ready := m.now
	if !a.Overlap {
		ready += m.outerArith(n, a.Step)
	}
	R := len(m.nodes)
	k := [2]int{n.stage, a.Step}
	g := m.groups[k]
	if g == nil {
		g = &syncGroup{ready: make([]time.Duration, R), bytes: make([]int64, R)}
		m.groups[k] = g
	}
	g.ready[n.rep], g.bytes[n.rep] = ready, bytes
	if g.n++; g.n < R {
		return
	}
	delete(m.groups, k)
	var start, send, lat time.Duration
	var total int64
	for r := range R {
		o := m.nodes[r][n.stage]
		start = max(start, g.ready[r])
		total += g.bytes[r]
		if !math.IsInf(o.link.Mbps, 1) {
			send = max(send, time.Duration(float64(g.bytes[r])*8/(o.link.Mbps*1e6)*float64(time.Second)))
		}
		lat = max(lat, o.link.Latency)
	}
	dur := send + 2*lat
	m.sched.Syncs = append(m.sched.Syncs, SyncTime{Stage: n.stage, Step: a.Step, Bytes: total, Dur: dur})
	for r := range R {
		m.push(start+dur, m.nodes[r][n.stage], core.ReduceDone{Step: a.Step})
	}
}

type event struct {
	at  time.Duration
	seq int
	n   *mnode
	e   core.Event
}

// eventQueue orders events by time, then by when they were pushed, so the schedule
// is the same every time.
type eventQueue []*event

func (q eventQueue) Len() int { return len(q) }
func (q eventQueue) Less(i, j int) bool {
	if q[i].at != q[j].at {
		return q[i].at < q[j].at
	}
	return q[i].seq < q[j].seq
}
func (q eventQueue) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *eventQueue) Push(x any)   { *q = append(*q, x.(*event)) }
func (q *eventQueue) Pop() any {
	old := *q
	e := old[len(old)-1]
	*q = old[:len(old)-1]
	return e
}
