package train

import (
	"time"

	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/spec"
)

// StageCore is the core.Config of stage of a run of sp, as a node's worker and the WAN
// bench's meter both schedule it: what the spec decides. The caller adds what only it
// knows (the validation batches, the step resumed after, the start timeout).
func StageCore(sp *spec.Spec, stage int) core.Config {
	return core.Config{Stage: stage, Stages: sp.Pipeline.Stages, MicroBatches: sp.Pipeline.MicroBatches,
		MaxInFlight: sp.Pipeline.InFlight, Steps: sp.Train.Steps, EvalInterval: sp.EvalInterval,
		Clip: sp.Train.GradClip > 0, CheckpointInterval: sp.CheckpointInterval, Outer: OuterSchedule(sp)}
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
