package train

import (
	"math"
	"time"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/spec"
)

// StageCore is the core.Config of stage of a run of sp, as a node's worker and the WAN
// bench's meter both schedule it: what the spec decides. The caller adds what only it
// knows (the validation batches, the step resumed after, the start timeout).
func StageCore(sp *spec.Spec, stage int) core.Config {
	return core.Config{Stage: stage, Stages: sp.Pipeline.Stages, MicroBatches: sp.Pipeline.MicroBatches,
		MaxInFlight: sp.Pipeline.InFlight, Steps: sp.Train.Steps, EvalInterval: sp.EvalInterval,
		Clip: sp.Train.GradClip > 0, CheckpointInterval: sp.CheckpointInterval, Outer: OuterSchedule(sp),
		Async: sp.Pipeline.Async(), Stash: sp.Pipeline.Async() && sp.Train.Delay != spec.DelayNone}
}

// StaffSchedule is what staffing counts of sp's schedule: the micro-batches each stage
// keeps in flight and, in an async run, the past weight versions it keeps; those the
// worker's core and unit hold (StageCore's Slots, AsyncSchedule's MaxDelay).
func StaffSchedule(sp *spec.Spec) assign.Schedule {
	p := sp.Pipeline
	return assign.Schedule{Stages: p.Stages, MicroBatches: p.MicroBatches, InFlight: p.InFlight, Async: p.Async()}
}

// AsyncSchedule is the async schedule of a run of sp (pipeline.schedule: async).
func AsyncSchedule(sp *spec.Spec) core.Async {
	return core.Async{Stages: sp.Pipeline.Stages, MicroBatches: sp.Pipeline.MicroBatches, InFlight: sp.Pipeline.InFlight}
}

// Trail is how many steps behind the rows the launcher records (the last stage's) a
// stage of a run of sp may take a step, and so write its checkpoint: in an async run
// stage 0 trails by core.Async.Trail updates; in a sync run by one, as the last stage
// reports a step once its own optimiser step is done, while stage 0 may still be running
// the step's last backwards (a run that does not clip steps each stage on its own
// backwards) or its optimiser step.
func Trail(sp *spec.Spec) int {
	if sp.Pipeline.Async() {
		return AsyncSchedule(sp).Trail()
	}
	return 1
}

// AsyncClip is the bound each stage of an async run clips its own gradient's norm to:
// its share of grad_clip, so that when every stage clips, the whole gradient's norm is
// grad_clip, as in a sync step. Nothing is exchanged: an update would otherwise wait
// for every other stage's norm.
func AsyncClip(sp *spec.Spec) float64 {
	return sp.Train.GradClip / math.Sqrt(float64(sp.Pipeline.Stages))
}

// OuterSchedule is when the stages of sp take outer steps (nil: one replica, none).
func OuterSchedule(sp *spec.Spec) *core.Outer {
	if sp.Pipeline.Replicas < 2 {
		return nil
	}
	d, steps := sp.DiLoCo, sp.Train.Steps
	return &core.Outer{Fragments: d.Fragments, Overlap: d.Overlapped(), Due: func(f, step int) bool { return d.Due(f, step, steps) }}
}

// checkpoints is when the single-process trainer writes its checkpoint before the end:
// the stages' count rule and its own time rule.
func checkpoints(sp *spec.Spec) core.Checkpoints {
	return core.Checkpoints{Interval: sp.CheckpointInterval, Last: sp.Train.Steps, Every: time.Duration(sp.CheckpointSeconds) * time.Second}
}
