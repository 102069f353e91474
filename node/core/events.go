package core

import "time"

// Event is what the core is told: one of the types below, and no other (the method
// is unexported, so the set is closed and Handle's switch is the whole protocol).
type Event interface{ isEvent() }

// Action is what the core asks for: one of the types below. Forward, Backward,
// Optimize, EvalForward and ApplyOuter are compute: the core asks for one at a time,
// always last in what Handle returns, and waits for Done. The others are carried out
// at once, in order, before the next event is fed (ShareNorm and StartReduce start
// work whose result comes back later as an event).
type Action interface{ isAction() }

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
	// ReduceDone: the all-reduce StartReduce began after Step is over (its results,
	// or its failure, are the executor's to hold until ApplyOuter asks for them).
	ReduceDone struct{ Step int }
	// CheckpointAt: the launcher orders a checkpoint at the end of Step (its time
	// rule, see CheckpointClock). Every stage must take it or none: one ordered at a
	// step this stage has finished already is refused with ErrStale.
	CheckpointAt struct{ Step int }
	// Tick: time has passed. Now is the time since the run began on the caller's clock
	// (the core has none); RTT is the longest round trip to the stage's neighbours
	// measured so far; Outer is how long a neighbour's outer step may take (its
	// all-reduce waits that long for a replica that is gone, as this stage's does).
	// Other events happen at the last tick's Now.
	Tick struct{ Now, RTT, Outer time.Duration }
	// PeerDown: the node holding stage Stage of this pipeline is unreachable.
	PeerDown struct{ Stage int }
)

func (Start) isEvent()        {}
func (ActivationIn) isEvent() {}
func (GradientIn) isEvent()   {}
func (NormIn) isEvent()       {}
func (EvalIn) isEvent()       {}
func (Done) isEvent()         {}
func (ReduceDone) isEvent()   {}
func (CheckpointAt) isEvent() {}
func (Tick) isEvent()         {}
func (PeerDown) isEvent()     {}

// Actions.
type (
	// Forward runs micro-batch Micro of Step into tape Slot (stage 0 samples it first;
	// the last stage also computes its loss). Send, if set, says to send the output on.
	// Age is how many updates old the weights it runs on are (always 0 in a sync run;
	// in an async one, the version the schedule gives it, kept by the stage).
	Forward struct {
		Step, Micro, Slot int
		Send              bool
		Age               int
	}
	// Backward runs the micro-batch in Slot backward; Send says to send the input
	// gradient back to the previous stage. Age is as Forward's.
	Backward struct {
		Step, Micro, Slot int
		Send              bool
		Age               int
	}
	// ShareNorm: project this stage's gradients as the optimiser sees them, compute
	// their sum of squares for Step, send it to every other stage, and feed it back as
	// NormIn. Asked for only when the run clips (Config.Clip).
	ShareNorm struct{ Step int }
	// Optimize takes the optimiser step. With Clip it clips by Norm, the global
	// gradient norm from every stage's ShareNorm; without it the run does not clip, no
	// norm was exchanged, Norm is 0 and the gradients are not projected yet.
	// Own (an async run): the stage projects its gradients and clips them by their
	// own norm against its share of grad_clip, grad_clip/√Stages, with nothing
	// exchanged (Norm and Clip are then unused).
	Optimize struct {
		Step int
		Norm float64
		Clip bool
		Own  bool
	}
	// EvalForward runs validation batch Batch forward (the last stage adds its loss
	// to the evaluation); Send says to send the output on.
	EvalForward struct {
		Step, Batch int
		Send        bool
	}
	// StepDone: Step is finished on this stage (the last stage reports its loss).
	StepDone struct{ Step int }
	// Checkpoint: write the stage's checkpoint of Step, which just finished (every
	// stage of the run writes the same steps). The last step's is Finished's.
	Checkpoint struct{ Step int }
	// EvalDone: the evaluation after Step is finished on this stage.
	EvalDone struct{ Step int }
	// StartReduce: take this replica's contributions to the outer step after Step on
	// fragments Frags and all-reduce them with the stage's other replicas, off the
	// loop; answer with ReduceDone{Step}. Overlap (Streaming DiLoCo) says the result
	// is applied after the next step, so the contributions also keep the fragments'
	// local weights as they are now (train.Outer.Begin); otherwise the stage waits
	// for it.
	StartReduce struct {
		Step  int
		Frags []int
		// Overlap: applied after the next step, with the inner step between kept.
		Overlap bool
	}
	// ApplyOuter applies the all-reduce begun after Step (Overlapped: an inner step
	// ago) to the stage's weights and outer state. A failed all-reduce fails here.
	ApplyOuter struct {
		Step       int
		Overlapped bool
	}
	// OuterDone: the outer steps applied after Step (one or two ApplyOuter) are one
	// outer step of the run: count it, serve the new state, report it.
	OuterDone struct{ Step int }
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

func (Forward) isAction()     {}
func (Backward) isAction()    {}
func (ShareNorm) isAction()   {}
func (Optimize) isAction()    {}
func (EvalForward) isAction() {}
func (StepDone) isAction()    {}
func (Checkpoint) isAction()  {}
func (EvalDone) isAction()    {}
func (StartReduce) isAction() {}
func (ApplyOuter) isAction()  {}
func (OuterDone) isAction()   {}
func (Finished) isAction()    {}
func (Stalled) isAction()     {}
