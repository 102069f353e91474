package launcher

import (
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/clock"
)

// Result summarises a finished run.
type Result struct {
	RunID   uint64  `json:"-"`     // "run" in JSON, 16 hex digits, as run.json and the nodes' folders name it
	Steps   int     `json:"steps"` // the last step recorded, as metrics.jsonl counts steps
	Loss    float64 `json:"loss"`
	ValLoss float64 `json:"val_loss"`
	// Tokens and Elapsed are the run's, as metrics.jsonl counts them: every replica's
	// tokens, and a resumed run's include what it went on from.
	Tokens  int64         `json:"tokens"`
	Elapsed time.Duration `json:"-"` // "elapsed_s" in JSON, seconds
	// This launch's own share of the run, over every part of it (steps taken again
	// after a pause included), from which its throughput and traffic are figured:
	// FromStep is the step it went on from (0 for a new run), StepsRun the steps
	// replica pipeline 0 took, TokensRun the tokens every replica trained, TimeRun
	// the wall time from each part's start to its end (staffing and pauses left out).
	FromStep  int           `json:"from_step"`
	StepsRun  int           `json:"steps_run"`
	TokensRun int64         `json:"tokens_run"`
	TimeRun   time.Duration `json:"-"` // "time_run_s" in JSON, seconds
	// Per stage boundary i (stage i → i+1): encoded bytes of the training activation
	// frames replica pipeline 0 sent forward and the gradient frames it sent back, and
	// how many steps of the sending stage they are (a stage stopped early says how far
	// it got, which may be a step past the steps recorded).
	BoundaryFwd      []int64 `json:"boundary_fwd_bytes"`
	BoundaryBwd      []int64 `json:"boundary_bwd_bytes"`
	BoundaryFwdSteps []int   `json:"boundary_fwd_steps"`
	BoundaryBwdSteps []int   `json:"boundary_bwd_steps"`
	// Checkpoints[r][s] is replica r's stage s checkpoint, on its node, as the node
	// last said ("" if it stopped without saying).
	Checkpoints [][]string `json:"checkpoints"`
	// SyncBytes[r][s]: what replica r of stage s sent in its outer steps, both phases,
	// over every part of the run.
	SyncBytes  [][]int64 `json:"sync_bytes"`
	OuterSteps int       `json:"outer_steps"` // outer steps of stage 0's replicas, over every part of the run
	Broken     []int     `json:"broken"`      // replica pipelines that stopped early (a stage's peer died or stalled)
	Rejoined   []int     `json:"rejoined"`    // replica pipelines brought back (once each time) after they broke
	// Repaired counts cells taken by the idle survivor of another broken replica
	// pipeline: two broken pipelines made one whole one.
	Repaired int `json:"repaired"`
	// Pauses: each time the run stopped because a stage had no live node, and how it
	// went on. Broken and Rejoined are over every part of the run, as are the byte
	// counts; checkpoints and Times are the last part's.
	Pauses []Pause `json:"pauses"`
	// Times: where each stage's wall time went, one per (stage, replica) that finished.
	Times []wire.StageTime `json:"times"`
	// Penalties: the protocol violations and bans the launcher's host recorded.
	Penalties p2p.PenaltyStats `json:"penalties"`
	// Model is the model assembled from the stages' final weights, of a run whose spec
	// says export: allowed (see Export); nil if it was not, and ExportError says why.
	Model       *ExportResult `json:"model,omitempty"`
	ExportError string        `json:"export_error,omitempty"`

	cells []assign.Assignment // the run's cells as it ended
}

// resultJSON is Result as result.json has it: the run ID in hex and the
// elapsed time in seconds, as run.json and metrics.jsonl write them.
type resultJSON struct {
	Run      string  `json:"run"`
	ElapsedS float64 `json:"elapsed_s"`
	TimeRunS float64 `json:"time_run_s"`
	plainResult
}

type plainResult Result

// MarshalJSON writes result.json's form.
func (r Result) MarshalJSON() ([]byte, error) {
	return json.Marshal(resultJSON{Run: fmt.Sprintf("%016x", r.RunID), ElapsedS: r.Elapsed.Seconds(), TimeRunS: r.TimeRun.Seconds(),
		plainResult: plainResult(r)})
}

// UnmarshalJSON reads result.json's form.
func (r *Result) UnmarshalJSON(b []byte) error {
	var j resultJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	id, err := strconv.ParseUint(j.Run, 16, 64)
	if err != nil {
		return fmt.Errorf("result: run %q: want 16 hex digits: %w", j.Run, err)
	}
	*r = Result(j.plainResult)
	r.RunID, r.Elapsed, r.TimeRun = id, time.Duration(j.ElapsedS*float64(time.Second)), time.Duration(j.TimeRunS*float64(time.Second))
	return nil
}

// Pause is one stop of a launched run for want of a live node for some stage.
type Pause struct {
	Why       string `json:"why"`        // the failure that paused it, naming the stage and peer
	Recorded  int    `json:"recorded"`   // the last step recorded before it stopped
	ResumedAt int    `json:"resumed_at"` // the step every stage had checkpointed, which it went on from; 0 if it did not
	// Restarted: no step had a checkpoint of every stage, and the run started again
	// from its beginning (ResumedAt 0).
	Restarted bool    `json:"restarted,omitempty"`
	WaitedS   float64 `json:"waited_s"` // from the stop until the run was going again (or given up)
}

// writeResult writes res as JSON into dir's ResultFile, for tools that run launch as
// a process (the WAN bench's netns mode).
func writeResult(dir string, res *Result) error {
	b, err := json.MarshalIndent(res, "", "  ")
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, ResultFile), b, 0o644)
	}
	if err != nil {
		return fmt.Errorf("launch: %w", err)
	}
	return nil
}

// ResultFile is where Launch writes its Result (JSON) in the run's directory.
const ResultFile = "result.json"

func newResult(run uint64, S, R int) *Result {
	res := &Result{RunID: run, BoundaryFwd: make([]int64, S-1), BoundaryBwd: make([]int64, S-1),
		BoundaryFwdSteps: make([]int, S-1), BoundaryBwdSteps: make([]int, S-1),
		Checkpoints: make([][]string, R), ValLoss: math.NaN(), SyncBytes: make([][]int64, R)}
	for r := range R {
		res.SyncBytes[r] = make([]int64, S)
		res.Checkpoints[r] = make([]string, S)
	}
	return res
}

// stageEnded notes what a stage says when it stops, done or not: where its
// checkpoint is and, for replica pipeline 0, what it sent over its boundaries in
// the steps it took since the part began (res.FromStep).
func (res *Result) stageEnded(r wire.Report) {
	S := len(res.BoundaryFwd) + 1
	if r.Replica < 0 || r.Replica >= len(res.Checkpoints) || r.Stage < 0 || r.Stage >= S {
		return
	}
	if r.Checkpoint != "" {
		res.Checkpoints[r.Replica][r.Stage] = r.Checkpoint
	}
	steps := r.Step - res.FromStep
	if r.Replica != 0 || steps <= 0 || (r.BytesFwd == 0 && r.BytesBwd == 0) {
		return
	}
	if r.Stage < S-1 {
		res.BoundaryFwd[r.Stage], res.BoundaryFwdSteps[r.Stage] = r.BytesFwd, steps
	}
	if r.Stage > 0 {
		res.BoundaryBwd[r.Stage-1], res.BoundaryBwdSteps[r.Stage-1] = r.BytesBwd, steps
	}
}

// evalRow parses row as replica 0's row of step, if that step is one a resumed run
// evaluates again (core.Config.EvalFrom).
func evalRow(row json.RawMessage, step int, sp *spec.Spec) (*metrics.Step, bool) {
	if !core.EvalAt(step, sp.Train.Steps, sp.EvalInterval) {
		return nil, false
	}
	var probe struct {
		Loss *float64 `json:"loss"` // absent: not a step's row
	}
	var st metrics.Step
	if json.Unmarshal(row, &probe) != nil || probe.Loss == nil || json.Unmarshal(row, &st) != nil ||
		st.Step != step || (st.Replica != nil && *st.Replica != 0) {
		return nil, false
	}
	st.ValLoss = nil
	return &st, true
}

// drainEnds, after a run stopped early, listens a little longer for its stages'
// last words (they report once the abort reaches them): where each checkpoint is,
// and what it sent. It returns once every cell has said where its checkpoint is, or
// after wait.
func drainEnds(res *Result, plan *wire.Plan, reports <-chan wire.Report, clk clock.Clock, wait time.Duration) {
	told := func() bool {
		for _, row := range res.Checkpoints {
			for _, c := range row {
				if c == "" {
					return false
				}
			}
		}
		return true
	}
	deadline := clk.After(wait)
	for !told() {
		select {
		case <-deadline:
			return
		case r := <-reports:
			if a, ok := plan.Cell(r.Stage, r.Replica); ok && a.Peer == r.Peer &&
				(r.Kind == wire.ReportDone || r.Kind == wire.ReportIdle || r.Kind == wire.ReportError) {
				res.stageEnded(r)
			}
		}
	}
}

// add counts another part's share of the run (see Result.StepsRun) into res.
func (res *Result) add(part *Result) {
	res.StepsRun += part.StepsRun
	res.TokensRun += part.TokensRun
	res.TimeRun += part.TimeRun
	for i := range min(len(res.BoundaryFwd), len(part.BoundaryFwd)) {
		res.BoundaryFwd[i] += part.BoundaryFwd[i]
		res.BoundaryBwd[i] += part.BoundaryBwd[i]
		res.BoundaryFwdSteps[i] += part.BoundaryFwdSteps[i]
		res.BoundaryBwdSteps[i] += part.BoundaryBwdSteps[i]
	}
	res.OuterSteps += part.OuterSteps
	for r := range min(len(res.SyncBytes), len(part.SyncBytes)) {
		for s := range min(len(res.SyncBytes[r]), len(part.SyncBytes[r])) {
			res.SyncBytes[r][s] += part.SyncBytes[r][s]
		}
	}
}

// Gone lists the replica pipelines still broken when the run ended: broken more
// often than they rejoined.
func (r *Result) Gone() []int {
	n := map[int]int{}
	for _, b := range r.Broken {
		n[b]++
	}
	for _, j := range r.Rejoined {
		n[j]--
	}
	var out []int
	for _, b := range slices.Sorted(maps.Keys(n)) {
		if n[b] > 0 {
			out = append(out, b)
		}
	}
	return out
}
