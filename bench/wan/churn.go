package wan

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/pipeswarm/pipeswarm/node/launcher"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
)

// Churn is one event of a churn schedule: at training step Step (as replica 0's
// pipeline reports it) the node holding Cell is killed (SIGKILL in netns mode, its
// host closed in sim mode) or started again with the same data directory.
type Churn struct {
	Cell   string
	Action string // "kill" or "restart"
	Step   int
	// Down, on a kill, restarts the node that long after it (a soak's schedule).
	Down time.Duration
}

func (c Churn) String() string { return fmt.Sprintf("%s:%s@%d", c.Cell, c.Action, c.Step) }

// ParseChurn reads a schedule: comma-separated CELL:kill@STEP or CELL:restart@STEP,
// e.g. "s1r1:kill@20,s1r1:restart@40". Events come back in step order; a restart
// must follow a kill of the same cell.
func ParseChurn(s string) ([]Churn, error) {
	var out []Churn
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		cell, rest, ok1 := strings.Cut(f, ":")
		action, step, ok2 := strings.Cut(rest, "@")
		n, err := strconv.Atoi(step)
		if !ok1 || !ok2 || err != nil || n < 1 || !cellRE.MatchString(cell) || cell == "launcher" || (action != "kill" && action != "restart") {
			return nil, fmt.Errorf("wan: churn %q: want CELL:kill@STEP or CELL:restart@STEP, CELL sSrR, STEP ≥ 1", f)
		}
		out = append(out, Churn{Cell: cell, Action: action, Step: n})
	}
	slices.SortStableFunc(out, func(a, b Churn) int { return a.Step - b.Step })
	down := map[string]bool{}
	for _, c := range out {
		switch {
		case c.Action == "kill" && down[c.Cell]:
			return nil, fmt.Errorf("wan: churn %s: %s is already down", c, c.Cell)
		case c.Action == "restart" && !down[c.Cell]:
			return nil, fmt.Errorf("wan: churn %s: %s was not killed before", c, c.Cell)
		}
		down[c.Cell] = c.Action == "kill"
	}
	return out, nil
}

// Rotate is a soak's schedule: every `every` steps up to steps, kill the next cell of
// cells in turn and restart it down later.
func Rotate(cells []string, every, steps int, down time.Duration) ([]Churn, error) {
	if len(cells) == 0 || every < 1 || down <= 0 {
		return nil, fmt.Errorf("wan: churn rotation: %d cells every %d steps, down %s: want cells, every ≥ 1 and down > 0", len(cells), every, down)
	}
	var out []Churn
	for i, step := 0, every; step < steps; i, step = i+1, step+every {
		out = append(out, Churn{Cell: cells[i%len(cells)], Action: "kill", Step: step, Down: down})
	}
	return out, nil
}

// churner fires a schedule's events as steps go by.
type churner struct {
	events []Churn
	next   int
	do     func(Churn)
}

// step fires every event due by step.
func (c *churner) step(step int) {
	for c.next < len(c.events) && c.events[c.next].Step <= step {
		c.do(c.events[c.next])
		c.next++
	}
}

// fired is the events fired so far.
func (c *churner) fired() []Churn { return c.events[:c.next] }

// ChurnFigures is what a run under churn went through, from its schedule and its
// metrics: kills and restarts fired, replica pipelines broken and brought back, the
// replica-steps not trained (every replica pipeline is meant to train every step), and
// the outer steps every stage took (any replica) against those due.
type ChurnFigures struct {
	Kills            int   `json:"kills"`
	Restarts         int   `json:"restarts"`
	Broken           []int `json:"broken_pipelines"` // one entry per break
	Rejoined         []int `json:"rejoined_pipelines"`
	LostReplicaSteps int   `json:"lost_replica_steps"`
	// RecomputedMicroBatches is 0: a broken pipeline's step in flight is dropped with
	// the pipeline, not recomputed elsewhere.
	RecomputedMicroBatches int `json:"recomputed_micro_batches"`
	OuterStepsDue          int `json:"outer_steps_due"`
	OuterStepsTaken        int `json:"outer_steps_taken"`
}

func churnFigures(sp *spec.Spec, fired []Churn, res *launcher.Result, steps []metrics.Step, outers []metrics.Outer) *ChurnFigures {
	if len(fired) == 0 {
		return nil
	}
	f := &ChurnFigures{Broken: res.Broken, Rejoined: res.Rejoined}
	for _, c := range fired {
		switch {
		case c.Action == "kill" && c.Down > 0:
			f.Kills++
			f.Restarts++ // restarted by the schedule, after Down
		case c.Action == "kill":
			f.Kills++
		default:
			f.Restarts++
		}
	}
	f.LostReplicaSteps = sp.Pipeline.Replicas*sp.Train.Steps - len(steps)
	taken := map[[2]int]bool{}
	for _, o := range outers {
		taken[[2]int{o.Stage, o.Step}] = true
	}
	outer := train.OuterSchedule(sp)
	for s := 1; outer != nil && s <= sp.Train.Steps; s++ {
		if outer.Applied(s, sp.Train.Steps) { // the steps whose outer step has a row
			f.OuterStepsDue += sp.Pipeline.Stages
			for st := range sp.Pipeline.Stages {
				if taken[[2]int{st, s}] {
					f.OuterStepsTaken++
				}
			}
		}
	}
	return f
}
