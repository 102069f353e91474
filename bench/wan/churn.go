package wan

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Churn is one event of a churn schedule: at training step Step (as replica 0's
// pipeline reports it) the node holding Cell is killed (SIGKILL in netns mode, its
// host closed in sim mode) or started again with the same data directory.
type Churn struct {
	Cell   string
	Action string // "kill" or "restart"
	Step   int
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
