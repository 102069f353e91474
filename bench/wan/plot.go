package wan

import (
	"fmt"
	"image/color"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"

	"github.com/pipeswarm/pipeswarm/node/metrics"
)

var (
	swarmColor    = color.RGBA{R: 220, G: 80, B: 40, A: 255}
	baselineColor = color.RGBA{R: 70, G: 110, B: 200, A: 255}
	waitColors    = map[string]color.Color{
		"compute":    color.RGBA{R: 60, G: 160, B: 80, A: 255},
		"activation": color.RGBA{R: 240, G: 200, B: 60, A: 255},
		"gradient":   color.RGBA{R: 240, G: 140, B: 50, A: 255},
		"norm":       color.RGBA{R: 200, G: 60, B: 60, A: 255},
		"bubble":     color.RGBA{R: 170, G: 170, B: 170, A: 255},
		"sync":       color.RGBA{R: 140, G: 80, B: 180, A: 255},
		"send":       color.RGBA{R: 60, G: 120, B: 220, A: 255},
	}
)

// plotLoss draws validation (and training) loss against tokens and against wall time,
// swarm and baseline, side by side.
func plotLoss(path string, r *Report) error {
	byTokens, byTime := plot.New(), plot.New()
	byTokens.Title.Text = fmt.Sprintf("%s: loss against tokens", r.Spec)
	byTokens.X.Label.Text = "tokens trained"
	byTime.Title.Text = fmt.Sprintf("%s, %s (%s): loss against time", r.Spec, r.Profile, r.Mode)
	byTime.X.Label.Text = "wall time (s)"
	for _, p := range []*plot.Plot{byTokens, byTime} {
		p.Y.Label.Text = "loss (nats/byte)"
		p.Add(plotter.NewGrid())
		p.Legend.Top = true
	}
	add := func(name string, h []metrics.Step, c color.Color) error {
		var tok, tim, vtok, vtim plotter.XYs
		for _, s := range h {
			tok = append(tok, plotter.XY{X: float64(s.Tokens), Y: s.Loss})
			tim = append(tim, plotter.XY{X: s.ElapsedS, Y: s.Loss})
			if s.ValLoss != nil {
				vtok = append(vtok, plotter.XY{X: float64(s.Tokens), Y: *s.ValLoss})
				vtim = append(vtim, plotter.XY{X: s.ElapsedS, Y: *s.ValLoss})
			}
		}
		for _, pair := range []struct {
			p        *plot.Plot
			train, v plotter.XYs
		}{{byTokens, tok, vtok}, {byTime, tim, vtim}} {
			if len(pair.train) == 0 {
				continue
			}
			l, err := plotter.NewLine(pair.train)
			if err != nil {
				return err
			}
			l.Color = c
			l.Width = vg.Points(0.5)
			l.Dashes = []vg.Length{vg.Points(2), vg.Points(2)}
			pair.p.Add(l)
			pair.p.Legend.Add(name+" train", l)
			if len(pair.v) > 0 {
				vl, vp, err := plotter.NewLinePoints(pair.v)
				if err != nil {
					return err
				}
				vl.Color, vp.Color = c, c
				vl.Width = vg.Points(1.5)
				pair.p.Add(vl, vp)
				pair.p.Legend.Add(name+" validation", vl)
			}
		}
		return nil
	}
	if err := add("swarm", r.history, swarmColor); err != nil {
		return fmt.Errorf("wan: plot: %w", err)
	}
	// The baseline's times are scaled as the report's are.
	scale := r.ComputeScale
	if scale <= 0 {
		scale = 1
	}
	bh := make([]metrics.Step, len(r.bhist))
	for i, s := range r.bhist {
		s.ElapsedS /= scale
		bh[i] = s
	}
	if err := add("centralised", bh, baselineColor); err != nil {
		return fmt.Errorf("wan: plot: %w", err)
	}
	return metrics.SavePNG(path, 14*vg.Inch, 5*vg.Inch, byTokens, byTime)
}

// plotTimeline draws each stage's timeline over the report's window: a bar per
// (replica, stage) coloured by what it was doing, and its link sends beneath.
func plotTimeline(path string, r *Report) error {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("%s, %s (%s): what each stage does over a few steps", r.Spec, r.Profile, r.Mode)
	p.X.Label.Text = "time (s)"
	rows := map[[2]int]int{}
	var names []string
	for _, s := range r.StageTimes {
		rows[[2]int{s.Stage, s.Replica}] = len(names)
		names = append(names, Cell(s.Stage, s.Replica))
	}
	legend := map[string]bool{}
	for _, sp := range r.Timeline {
		if sp.What == "stopped" {
			continue
		}
		row, ok := rows[[2]int{sp.Stage, sp.Replica}]
		if !ok {
			continue
		}
		y0, y1 := float64(row)-0.35, float64(row)+0.35
		if sp.What == "send" {
			y0, y1 = float64(row)-0.45, float64(row)-0.3
		}
		poly, err := plotter.NewPolygon(plotter.XYs{{X: sp.Start, Y: y0}, {X: sp.End, Y: y0}, {X: sp.End, Y: y1}, {X: sp.Start, Y: y1}})
		if err != nil {
			return fmt.Errorf("wan: timeline: %w", err)
		}
		c := waitColors[sp.What]
		poly.Color, poly.LineStyle.Width = c, 0
		p.Add(poly)
		if !legend[sp.What] {
			legend[sp.What] = true
			label := sp.What
			switch label {
			case "compute", "send":
			case "bubble":
				label = "pipeline bubble (earlier stages' backward)"
			default:
				label = "waiting for " + label
			}
			p.Legend.Add(label, poly)
		}
	}
	p.NominalY(names...)
	p.Y.Min, p.Y.Max = -0.6, float64(len(names))+0.9 // room above the rows for the legend
	p.Legend.Top = true
	p.Legend.Left = true
	return metrics.SavePNG(path, 12*vg.Inch, vg.Length(2+0.5*float64(max(1, len(names))))*vg.Inch, p)
}
