package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
)

// Setting is one way of crossing stage boundaries.
type Setting struct {
	Name        string `json:"setting"`
	Subspace    int    `json:"subspace"` // rank k; 0 = dense
	DenseTail   int    `json:"dense_tail"`
	Activations string `json:"activations"`
	Gradients   string `json:"gradients"`
}

// DefaultSettings are the rows for a model of width d: none (fp32), bf16,
// int8, the subspace at k = d/8, d/16, d/32, and the subspace at d/32 with int8 (the
// pairing that cleared 32× fewer bytes at under 2× the steps on tiny).
func DefaultSettings(d int) []Setting {
	return []Setting{
		{Name: "none", Activations: "fp32", Gradients: "fp32"},
		{Name: "bf16", Activations: "bf16", Gradients: "bf16"},
		{Name: "int8", Activations: "int8/32", Gradients: "int8/32"},
		{Name: fmt.Sprintf("subspace k=%d", d/8), Subspace: d / 8, DenseTail: 1, Activations: "fp32", Gradients: "fp32"},
		{Name: fmt.Sprintf("subspace k=%d", d/16), Subspace: d / 16, DenseTail: 1, Activations: "fp32", Gradients: "fp32"},
		{Name: fmt.Sprintf("subspace k=%d", d/32), Subspace: d / 32, DenseTail: 1, Activations: "fp32", Gradients: "fp32"},
		{Name: fmt.Sprintf("subspace k=%d + int8", d/32), Subspace: d / 32, DenseTail: 1, Activations: "int8/32", Gradients: "int8/32"},
	}
}

// ParseSetting reads a setting from "[k=K[,tail=N]/]CODEC": a wire codec for both
// directions ("fp32", "bf16", "int8/32+zstd", ...), optionally on the residual subspace
// of rank K with the last N layers (default 1) left dense ("k=4/int8/32",
// "k=8,tail=4/int8/32").
func ParseSetting(s string) (Setting, error) {
	st := Setting{Activations: s}
	if rest, ok := strings.CutPrefix(s, "k="); ok {
		sub, c, _ := strings.Cut(rest, "/")
		k, tail, hasTail := strings.Cut(sub, ",tail=")
		st.DenseTail, st.Activations = 1, c
		var err error
		st.Subspace, err = strconv.Atoi(k)
		bad := err != nil || st.Subspace < 1 || c == ""
		if hasTail {
			n, err := strconv.Atoi(tail)
			bad = bad || err != nil || n < 0
			st.DenseTail = n
		}
		if bad {
			return Setting{}, fmt.Errorf("bench: setting %q: want k=RANK[,tail=LAYERS]/CODEC, e.g. k=4/int8/32 or k=8,tail=4/int8/32", s)
		}
	}
	if err := spec.CheckCodec(st.Activations); err != nil {
		return Setting{}, fmt.Errorf("bench: setting %q: %w", s, err)
	}
	st.Gradients = st.Activations
	sub := fmt.Sprintf("subspace k=%d", st.Subspace)
	if st.DenseTail != 1 {
		sub += fmt.Sprintf(" (dense tail %d)", st.DenseTail)
	}
	switch {
	case st.Subspace == 0 && st.Activations == "fp32":
		st.Name = "none"
	case st.Subspace == 0:
		st.Name = st.Activations
	case st.Activations == "fp32":
		st.Name = sub
	default:
		st.Name = sub + " + " + st.Activations
	}
	return st, nil
}

// Row is one setting's result. Ratios are to the first (baseline) row.
type Row struct {
	Setting
	BytesPerTokenFwd    float64  `json:"bytes_per_token_fwd"` // per stage boundary
	BytesPerTokenBwd    float64  `json:"bytes_per_token_bwd"`
	ValLossAtEqualSteps float64  `json:"val_loss_at_equal_steps"`
	StepsToTarget       *int     `json:"steps_to_target"` // nil: never reached
	Target              float64  `json:"target"`
	FwdRatio            float64  `json:"bytes_fwd_ratio"` // baseline / this: how many times fewer bytes
	BwdRatio            float64  `json:"bytes_bwd_ratio"`
	ValLossRatio        float64  `json:"val_loss_ratio"`        // this / baseline
	StepsRatio          *float64 `json:"steps_to_target_ratio"` // this / baseline
	Steps               int      `json:"steps"`
	ElapsedS            float64  `json:"elapsed_s"`
}

// CompressionOptions configure Compression.
type CompressionOptions struct {
	Spec     *spec.Spec
	Settings []Setting // nil: DefaultSettings
	OutDir   string
	// Target is the validation loss for steps_to_target; 0 takes the baseline's
	// validation loss at half its steps, so the baseline needs half the run and a
	// setting may take up to twice that. Without an evaluation by then, the
	// baseline's first one after it.
	Target float64
	Log    *slog.Logger
	OnStep func(setting string, s metrics.Step)
}

// Compression trains the spec once per setting, pipelined across at least two stages
// with each boundary compressed as the setting says, and writes compression.md and
// compression.json into OutDir. Each setting's run directory is kept beside them.
func Compression(ctx context.Context, o CompressionOptions) ([]Row, error) {
	log := o.Log
	if log == nil {
		log = slog.Default()
	}
	settings := o.Settings
	if settings == nil {
		settings = DefaultSettings(o.Spec.Model.DModel)
	}
	if len(settings) == 0 {
		return nil, errors.New("bench: no settings")
	}
	var rows []Row
	var histories [][]metrics.Step
	for _, st := range settings {
		sp := o.Spec.Clone()
		if sp.Pipeline.Stages < 2 {
			sp.Pipeline.Stages = 2 // a boundary to compress
		}
		sp.Compression = spec.Compression{Subspace: st.Subspace, DenseTail: st.DenseTail, Activations: st.Activations, Gradients: st.Gradients}
		if err := sp.Validate(); err != nil {
			return rows, fmt.Errorf("bench: setting %q: %w", st.Name, err)
		}
		dir := filepath.Join(o.OutDir, slug(st.Name))
		log.Info("bench compression: training", "setting", st.Name, "stages", sp.Pipeline.Stages, "steps", sp.Train.Steps)
		var hist []metrics.Step
		res, err := train.Run(ctx, train.Options{Spec: sp, OutDir: dir, Log: log, OnStep: func(s metrics.Step) {
			hist = append(hist, s)
			if o.OnStep != nil {
				o.OnStep(st.Name, s)
			}
		}})
		if err != nil {
			return rows, fmt.Errorf("bench: setting %q: %w", st.Name, err)
		}
		tokens := float64(res.Tokens)
		row := Row{Setting: st, Steps: res.Steps, ElapsedS: res.Elapsed.Seconds(), ValLossAtEqualSteps: res.ValLoss}
		// Every boundary carries the same shapes; report the mean per boundary.
		for i := range res.BoundaryFwd {
			row.BytesPerTokenFwd += float64(res.BoundaryFwd[i]) / tokens / float64(len(res.BoundaryFwd))
			row.BytesPerTokenBwd += float64(res.BoundaryBwd[i]) / tokens / float64(len(res.BoundaryBwd))
		}
		rows, histories = append(rows, row), append(histories, hist)
	}
	target := o.Target
	if target == 0 {
		target = TargetAt(histories[0], rows[0].Steps/2)
		log.Info("bench compression: target", "val_loss", target, "from", "baseline at half its steps")
	}
	for i := range rows {
		rows[i].Target, rows[i].StepsToTarget = target, StepsTo(histories[i], target)
	}
	base := rows[0]
	for i := range rows {
		r := &rows[i]
		r.FwdRatio, r.BwdRatio = base.BytesPerTokenFwd/r.BytesPerTokenFwd, base.BytesPerTokenBwd/r.BytesPerTokenBwd
		r.ValLossRatio = r.ValLossAtEqualSteps / base.ValLossAtEqualSteps
		if r.StepsToTarget != nil && base.StepsToTarget != nil {
			v := float64(*r.StepsToTarget) / float64(*base.StepsToTarget)
			r.StepsRatio = &v
		}
	}
	if err := writeCompression(o.OutDir, o.Spec, rows); err != nil {
		return rows, err
	}
	return rows, nil
}

func slug(s string) string {
	r := strings.NewReplacer(" ", "", "=", "", "+", "-", "/", "-")
	return r.Replace(s)
}

// TargetAt is the last validation loss recorded at or before step or, if
// none was, the first after it (every run evaluates at its end).
func TargetAt(h []metrics.Step, step int) float64 {
	v := math.NaN()
	for _, s := range h {
		if s.ValLoss == nil {
			continue
		}
		if s.Step > step {
			if math.IsNaN(v) {
				v = *s.ValLoss
			}
			break
		}
		v = *s.ValLoss
	}
	return v
}

// StepsTo is the first evaluated step whose validation loss is at or below target.
func StepsTo(h []metrics.Step, target float64) *int {
	for _, s := range h {
		if s.ValLoss != nil && *s.ValLoss <= target {
			n := s.Step
			return &n
		}
	}
	return nil
}

func writeCompression(dir string, sp *spec.Spec, rows []Row) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	j, err := json.MarshalIndent(map[string]any{"spec": sp.Name, "rows": rows}, "", "  ")
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "compression.json"), append(j, '\n'), 0o644); err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	f, err := os.Create(filepath.Join(dir, "compression.md"))
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	WriteCompressionTable(f, sp.Name, rows)
	return f.Close()
}

// WriteCompressionTable writes rows as a Markdown table.
func WriteCompressionTable(w io.Writer, name string, rows []Row) {
	fmt.Fprintf(w, "Boundary compression on `%s` (%d steps; target validation loss %.4f)\n\n", name, rows[0].Steps, rows[0].Target)
	fmt.Fprintln(w, "| setting | bytes/token fwd | bytes/token bwd | × fewer fwd | × fewer bwd | val loss at equal steps | steps to target | × steps |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|")
	for _, r := range rows {
		steps, ratio := "never", "—"
		if r.StepsToTarget != nil {
			steps = fmt.Sprint(*r.StepsToTarget)
		}
		if r.StepsRatio != nil {
			ratio = fmt.Sprintf("%.2f", *r.StepsRatio)
		}
		fmt.Fprintf(w, "| %s | %.1f | %.1f | %.1f | %.1f | %.4f | %s | %s |\n", r.Name, r.BytesPerTokenFwd, r.BytesPerTokenBwd,
			r.FwdRatio, r.BwdRatio, r.ValLossAtEqualSteps, steps, ratio)
	}
}
