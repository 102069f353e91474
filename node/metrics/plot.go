package metrics

import (
	"fmt"
	"image/color"
	"os"
	"path/filepath"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// PlotLoss draws training loss (and validation loss where present) against step into
// a PNG at path, written atomically.
func PlotLoss(path, title string, steps []Step) error {
	if len(steps) == 0 {
		return fmt.Errorf("metrics: no steps to plot")
	}
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = "step"
	p.Y.Label.Text = "loss (nats/byte)"
	p.Add(plotter.NewGrid())
	var train, val plotter.XYs
	for _, s := range steps {
		train = append(train, plotter.XY{X: float64(s.Step), Y: s.Loss})
		if s.ValLoss != nil {
			val = append(val, plotter.XY{X: float64(s.Step), Y: *s.ValLoss})
		}
	}
	tl, err := plotter.NewLine(train)
	if err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	tl.Color = color.RGBA{R: 70, G: 110, B: 200, A: 255}
	p.Add(tl)
	p.Legend.Add("train", tl)
	if len(val) > 0 {
		vl, vp, err := plotter.NewLinePoints(val)
		if err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
		vl.Color = color.RGBA{R: 220, G: 80, B: 40, A: 255}
		vp.Color = vl.Color
		p.Add(vl, vp)
		p.Legend.Add("validation", vl)
	}
	p.Legend.Top = true
	return SavePNG(path, 8*vg.Inch, 5*vg.Inch, p)
}

// SavePNG draws plots side by side into a w×h PNG at path, written atomically.
func SavePNG(path string, w, h vg.Length, plots ...*plot.Plot) error {
	img := vgimg.New(w, h)
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: 1, Cols: len(plots), PadX: vg.Millimeter * 4, PadTop: vg.Millimeter * 2,
		PadBottom: vg.Millimeter * 2, PadLeft: vg.Millimeter * 2, PadRight: vg.Millimeter * 2}
	canvases := plot.Align([][]*plot.Plot{plots}, tiles, dc)
	for i, p := range plots {
		p.Draw(canvases[0][i])
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".plot-*.png")
	if err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	_, err = vgimg.PngCanvas{Canvas: img}.WriteTo(tmp)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("metrics: plot %s: %w", path, err)
	}
	return nil
}
