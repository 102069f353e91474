package launcher

import (
	"encoding/json"
	"testing"
	"time"
)

// result.json writes the run ID in hex and the elapsed time in seconds, as run.json
// and metrics.jsonl do, and reads back the same result.
func TestLaunchResultJSONHasTheRunInHexAndSeconds(t *testing.T) {
	in := Result{RunID: 0x8a405f4bde62b593, Steps: 40, Loss: 2.5, ValLoss: 2.75, Tokens: 5120, Elapsed: 12500 * time.Millisecond,
		FromStep: 8, StepsRun: 32, TimeRun: 10 * time.Second,
		BoundaryFwd: []int64{100}, BoundaryBwd: []int64{90}, Checkpoints: [][]string{{"/n0/runs/8a405f4bde62b593/stage-0.safetensors"}},
		Pauses: []Pause{{Why: "stage 1 gone", Recorded: 10, ResumedAt: 8, WaitedS: 3}}}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	var fields map[string]any
	if err := json.Unmarshal(b, &fields); err != nil {
		t.Fatal(err)
	}
	if fields["run"] != "8a405f4bde62b593" || fields["elapsed_s"] != 12.5 || fields["val_loss"] != 2.75 || fields["time_run_s"] != 10.0 || fields["steps_run"] != 32.0 || fields["RunID"] != nil || fields["Elapsed"] != nil {
		t.Errorf("result.json %s: want run in hex, elapsed_s in seconds, snake_case keys", b)
	}
	var out Result
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	if out.RunID != in.RunID || out.Elapsed != in.Elapsed || out.Steps != 40 || out.Pauses[0] != in.Pauses[0] || out.Checkpoints[0][0] != in.Checkpoints[0][0] ||
		out.TimeRun != in.TimeRun || out.FromStep != 8 {
		t.Errorf("read back %+v, want %+v", out, in)
	}
}
