package wan

import (
	"fmt"
	"time"

	"github.com/pipeswarm/pipeswarm/node/launcher"
	"github.com/pipeswarm/pipeswarm/node/spec"
)

// maxMeasured bounds how many links are measured before a run: each takes about a
// second of transfer.
const maxMeasured = 8

// cells lists the grid in the order the launcher staffs it (replica 0's stages
// first), which is the order nodes are given to it: with equal offers, node i holds
// cells[i].
func cells(S, R int) [][2]int {
	var out [][2]int
	for r := range R {
		for s := range S {
			out = append(out, [2]int{s, r})
		}
	}
	return out
}

// measureLink measures the path between cells ca and cb with measure (given a
// transfer size for their bandwidth), prints it and returns it beside the profile's
// figures.
func measureLink(o Options, ca, cb string, measure func(bytes int64) (rtt time.Duration, up, down float64, err error)) (LinkFigures, error) {
	la, lb := o.Profile.Link(ca), o.Profile.Link(cb)
	mbps := min(la.Mbps, lb.Mbps)
	rtt, up, down, err := measure(probeBytes(mbps))
	if err != nil {
		return LinkFigures{}, fmt.Errorf("wan: %s: measure %s ↔ %s: %w", o.Mode, ca, cb, err)
	}
	f := LinkFigures{From: ca, To: cb, ProfileMbps: mbps, MeasuredMbps: up, ReverseMbps: down,
		ProfileRTTMs: ms(la.Latency + lb.Latency), MeasuredRTTMs: ms(rtt)}
	o.OnNote(linkNote(f))
	return f, nil
}

// probeBytes is a transfer of about a second at mbps: its second half, which is
// timed, is then long enough that a late wake-up moves the figure little.
func probeBytes(mbps float64) int64 { return max(256<<10, int64(mbps*1e6/8)) }

func linkNote(f LinkFigures) string {
	return fmt.Sprintf("link %s ↔ %s: RTT %.1f ms (profile %g), %.1f / %.1f Mbit/s (profile %g)",
		f.From, f.To, f.MeasuredRTTMs, f.ProfileRTTMs, f.MeasuredMbps, f.ReverseMbps, f.ProfileMbps)
}

// overRun scales what was sent over each boundary in the steps its stage counted
// (after a pause, steps taken twice are counted twice) to the run's train.steps,
// which the report divides by.
func overRun(sp *spec.Spec, bytes []int64, steps []int) []int64 {
	out := make([]int64, len(bytes))
	for i, b := range bytes {
		if i < len(steps) && steps[i] > 0 {
			out[i] = b * int64(sp.Train.Steps) / int64(steps[i])
		}
	}
	return out
}

// launched turns a launched run's result and metrics into an outcome.
func launched(sp *spec.Spec, dir string, res *launcher.Result, links []LinkFigures, notes []string, fired []Churn) (*outcome, error) {
	steps, outers, err := metricsOf(dir)
	if err != nil {
		return nil, err
	}
	out := &outcome{steps: steps, outers: outers, wall: res.Elapsed, tokens: res.Tokens,
		fwd: overRun(sp, res.BoundaryFwd, res.BoundaryFwdSteps), bwd: overRun(sp, res.BoundaryBwd, res.BoundaryBwdSteps),
		syncs: syncFigures(sp, outers, nil), times: res.Times, links: links, notes: notes,
		churn: churnFigures(sp, fired, res, steps, outers)}
	if len(res.Broken) > 0 {
		note := fmt.Sprintf("replica pipelines %v stopped early", res.Broken)
		if gone := res.Gone(); len(gone) > 0 {
			note += fmt.Sprintf("; %v were not whole again by the end", gone)
		} else {
			note += "; each came back"
		}
		out.notes = append(out.notes, note)
	}
	return out, nil
}
