package wan

import (
	"context"
	"errors"

	"github.com/pipeswarm/pipeswarm/node"
	"github.com/pipeswarm/pipeswarm/node/spec"
)

func runSim(ctx context.Context, o Options) (*outcome, error) { return nil, errors.New("wip") }

const maxMeasured = 8

func cells(S, R int) [][2]int {
	var out [][2]int
	for r := range R {
		for s := range S {
			out = append(out, [2]int{s, r})
		}
	}
	return out
}
func probeBytes(mbps float64) int64 { return max(256<<10, int64(mbps*1e6/8/2)) }
func linkNote(f LinkFigures) string  { return "" }
func launched(sp *spec.Spec, dir string, res *node.LaunchResult, links []LinkFigures, notes []string) (*outcome, error) {
	return nil, nil
}
