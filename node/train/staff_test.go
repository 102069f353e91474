package train

import (
	"strings"
	"testing"
)

// Staffing counts, for every stage, the activation tapes the stage's core gives it
// slots for and the past weight versions a worker keeps (the schedule's largest
// delay in an async run, whatever train.delay; none in a sync one).
func TestStaffScheduleIsWhatTheStagesHold(t *testing.T) {
	for _, pipeline := range []string{
		"{stages: 4, micro_batches: 4}",
		"{stages: 4, micro_batches: 2}",
		"{stages: 4, micro_batches: 4, in_flight: 2}",
		"{stages: 4, micro_batches: 4, schedule: async}",
		"{stages: 4, micro_batches: 2, schedule: async}",
		"{stages: 4, micro_batches: 4, in_flight: 16, schedule: async}",
		"{stages: 3, micro_batches: 1, in_flight: 5, schedule: async}",
		"{stages: 1, micro_batches: 2, schedule: async}",
	} {
		src := strings.Replace(smallSpec, "n_layers: 2", "n_layers: 4", 1)
		sp := testSpec(t, strings.Replace(src, "{stages: 1, micro_batches: 1}", pipeline, 1))
		p := StaffSchedule(sp)
		for s := range sp.Pipeline.Stages {
			want := 0
			if sp.Pipeline.Async() {
				want = AsyncSchedule(sp).MaxDelay(s)
			}
			if got, slots := p.Slots(s), StageCore(sp, s).Slots(); got != slots || p.Versions(s) != want {
				t.Errorf("%s, stage %d: staffing counts %d slots and %d past versions, the stage holds %d and %d", pipeline, s, got, p.Versions(s), slots, want)
			}
		}
	}
}
