package core

import "fmt"

// Async is the order of work on every stage of an asynchronous pipeline: no flush,
// no step barrier. Stage s first runs Bound(s) forwards, then alternates one
// backward and one forward (the backward of micro-batch j, then the forward of
// j+Bound(s)), and applies an update after every MicroBatches backwards. Micro-batches
// are numbered over the whole run (micro-batch j belongs to update j/MicroBatches + 1).
// Because the order is fixed, not left to timing, the weight version (updates applied
// so far) that every forward and backward runs on is known in advance; that is what
// lets one process reproduce a swarm's async run exactly.
type Async struct {
	Stages, MicroBatches int
	// InFlight is stage 0's bound on forwards not yet matched by a backward; 0 means
	// Stages (the one-forward-one-backward bound).
	InFlight int
}

// Validate reports an impossible configuration.
func (a Async) Validate() error {
	switch {
	case a.Stages < 1:
		return fmt.Errorf("core: async: %d stages", a.Stages)
	case a.MicroBatches < 1:
		return fmt.Errorf("core: async: %d micro-batches", a.MicroBatches)
	case a.InFlight < 0:
		return fmt.Errorf("core: async: in flight %d", a.InFlight)
	}
	return nil
}

// Bound is how many forwards stage runs ahead of its backwards. The last stage needs
// one: its loss gives the gradient at once. Stage 0 holds InFlight, and the stages
// between a share in proportion to how far they are from the end (a round trip from
// stage s crosses 2·(Stages−1−s) boundaries), rounded up; with InFlight 0 that is
// Stages − s, the bound of a one-forward-one-backward pipeline.
func (a Async) Bound(stage int) int {
	k := a.InFlight
	if k == 0 {
		k = a.Stages
	}
	if a.Stages == 1 {
		return 1
	}
	rest := a.Stages - 1 - stage
	return 1 + ((k-1)*rest+a.Stages-2)/(a.Stages-1)
}

// OpKind says what an AsyncOp does.
type AsyncOpKind uint8

const (
	AsyncForward AsyncOpKind = iota
	AsyncBackward
	AsyncUpdate
)

func (k AsyncOpKind) String() string {
	switch k {
	case AsyncForward:
		return "F"
	case AsyncBackward:
		return "B"
	case AsyncUpdate:
		return "U"
	}
	return fmt.Sprintf("AsyncOpKind(%d)", uint8(k))
}

// AsyncOp is one piece of a stage's work: a forward or backward of micro-batch Micro
// on weight version Version, or the update that makes version Version.
type AsyncOp struct {
	Kind    AsyncOpKind
	Micro   int
	Version int
}

func (o AsyncOp) String() string { return fmt.Sprintf("%v%d@%d", o.Kind, o.Micro, o.Version) }

// Order is stage's work for micro-batches [0, n) in the order it runs it, updates
// included (n should be a whole number of updates).
func (a Async) Order(stage, n int) []AsyncOp {
	k := a.Bound(stage)
	ops := make([]AsyncOp, 0, 2*n+n/a.MicroBatches)
	version, fwd := 0, 0
	forward := func() {
		if fwd < n {
			ops = append(ops, AsyncOp{Kind: AsyncForward, Micro: fwd, Version: version})
			fwd++
		}
	}
	for range min(k, n) {
		forward()
	}
	for j := range n {
		ops = append(ops, AsyncOp{Kind: AsyncBackward, Micro: j, Version: version})
		if (j+1)%a.MicroBatches == 0 {
			version++
			ops = append(ops, AsyncOp{Kind: AsyncUpdate, Micro: j, Version: version})
		}
		forward()
	}
	return ops
}

// ForwardVersion is the weight version stage's forward of micro-batch j runs on:
// the updates applied before it, one per MicroBatches backwards done, and the
// forward of j follows the backward of j − Bound(stage).
func (a Async) ForwardVersion(stage, j int) int {
	done := j - a.Bound(stage) + 1 // backwards before the forward of j
	if done <= 0 {
		return 0
	}
	return done / a.MicroBatches
}

// BackwardVersion is the weight version every stage's backward of micro-batch j
// finds current: the updates of the micro-batches before j's update.
func (a Async) BackwardVersion(j int) int { return j / a.MicroBatches }

// Delay is the mean, over the micro-batches of an update in the steady state, of how
// many updates the weights a stage's gradient is applied to are newer than the ones
// its forward ran on.
func (a Async) Delay(stage int) float64 {
	sum, j0 := 0, a.MicroBatches*(1+a.MaxDelay(stage)) // past the start-up
	for j := j0; j < j0+a.MicroBatches; j++ {
		sum += a.BackwardVersion(j) - a.ForwardVersion(stage, j)
	}
	return float64(sum) / float64(a.MicroBatches)
}

// MaxDelay is the largest such delay in updates: a stage that stashes weights holds
// this many past versions besides the current one.
func (a Async) MaxDelay(stage int) int {
	// The forward of j follows Bound−1 more forwards than the backward of j has, and
	// these span at most ceil((Bound−1)/MicroBatches) update boundaries.
	return (a.Bound(stage) - 1 + a.MicroBatches - 1) / a.MicroBatches
}

// Trail is how many updates behind the last stage any stage's updates may be once
// the last stage has taken update k: it has run the forward of k's last micro-batch
// j = k·MicroBatches − 1, which every stage ran before it, and a stage runs that
// forward after the backward of j − Bound(stage) and the update it ends. So every
// stage has taken k − ceil(Bound(stage)/MicroBatches) updates at least, and stage 0,
// whose bound is the largest, trails furthest. The checkpoints a stage writes after its
// updates trail the last stage's rows as far.
func (a Async) Trail() int {
	return (a.Bound(0) + a.MicroBatches - 1) / a.MicroBatches
}
