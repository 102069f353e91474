// Package metrics holds a run's per-step record: the metrics.jsonl file every trainer
// and launcher writes, and the loss plot drawn from it.
package metrics

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
)

// Step is one line of metrics.jsonl.
type Step struct {
	Step       int      `json:"step"`
	Loss       float64  `json:"loss"`
	ValLoss    *float64 `json:"val_loss,omitempty"` // only on eval steps
	Tokens     int64    `json:"tokens"`             // trained so far
	TokensPerS float64  `json:"tokens_per_s"`       // of this step
	ElapsedS   float64  `json:"elapsed_s"`          // since the run started
	LR         float64  `json:"lr"`
	// GradNorm is the global gradient norm before clipping; 0 (absent) in a launched
	// run that does not clip, whose stages exchange no norms.
	GradNorm float64 `json:"grad_norm,omitempty"`
	// Replica is the replica pipeline the loss is of; absent in runs with one replica.
	// With replicas, validation loss (of the global weights) rides on replica 0's row.
	Replica *int `json:"replica,omitempty"`
}

// Outer is the row one replica of one stage writes after an outer (DiLoCo) step. It has
// no loss field, which is how readers tell it from a Step.
type Outer struct {
	Step      int     `json:"step"`       // the inner step it followed
	OuterStep int     `json:"outer_step"` // 1, 2, ... per stage
	Stage     int     `json:"stage"`
	Replica   int     `json:"replica"`
	SyncBytes int64   `json:"sync_bytes"` // what this replica of this stage sent, both phases of the all-reduce
	SyncS     float64 `json:"sync_s"`     // seconds the sync took
	// WeightsHash is a hash of the stage's global weights after the step: every replica
	// of a stage must report the same.
	WeightsHash  string  `json:"weights_hash"`
	Contributors int     `json:"contributors"` // replicas whose change was averaged in
	ElapsedS     float64 `json:"elapsed_s"`
}

// Writer appends Steps to a metrics.jsonl file, one JSON object per line, flushed
// after every step so a crash loses at most the step being written.
type Writer struct {
	f   *os.File
	enc *json.Encoder
	buf *bufio.Writer
}

// Create truncates (or creates) path and returns a Writer on it.
func Create(path string) (*Writer, error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	buf := bufio.NewWriter(f)
	return &Writer{f: f, buf: buf, enc: json.NewEncoder(buf)}, nil
}

// Write appends one step.
func (w *Writer) Write(s Step) error {
	if err := w.enc.Encode(s); err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	if err := w.buf.Flush(); err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	return nil
}

// WriteRaw appends a row already encoded (a resumed run keeps its earlier rows).
func (w *Writer) WriteRaw(row json.RawMessage) error {
	if _, err := w.buf.Write(row); err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	if err := w.buf.WriteByte('\n'); err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	if err := w.buf.Flush(); err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	return nil
}

// WriteOuter appends one outer-step row.
func (w *Writer) WriteOuter(o Outer) error {
	if err := w.enc.Encode(o); err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	if err := w.buf.Flush(); err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	return nil
}

// Close flushes and closes the file.
func (w *Writer) Close() error {
	return errors.Join(w.buf.Flush(), w.f.Close())
}

// Read parses a metrics.jsonl stream and returns its step rows; a bad line is an error
// naming it.
func Read(r io.Reader) ([]Step, error) {
	steps, _, err := ReadRun(r)
	return steps, err
}

// ReadRun parses a metrics.jsonl stream into its step rows and its outer-step rows.
func ReadRun(r io.Reader) ([]Step, []Outer, error) {
	var steps []Step
	var outers []Outer
	sc := bufio.NewScanner(r)
	for line := 1; sc.Scan(); line++ {
		if len(sc.Bytes()) == 0 {
			continue
		}
		var probe struct {
			Loss *float64 `json:"loss"`
		}
		if err := json.Unmarshal(sc.Bytes(), &probe); err != nil {
			return nil, nil, fmt.Errorf("metrics: line %d: %w", line, err)
		}
		if probe.Loss == nil {
			var o Outer
			if err := json.Unmarshal(sc.Bytes(), &o); err != nil {
				return nil, nil, fmt.Errorf("metrics: line %d: %w", line, err)
			}
			outers = append(outers, o)
			continue
		}
		var s Step
		if err := json.Unmarshal(sc.Bytes(), &s); err != nil {
			return nil, nil, fmt.Errorf("metrics: line %d: %w", line, err)
		}
		steps = append(steps, s)
	}
	if err := sc.Err(); err != nil {
		return nil, nil, fmt.Errorf("metrics: %w", err)
	}
	return steps, outers, nil
}

// ReadFile is Read on a file.
func ReadFile(path string) ([]Step, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	defer f.Close()
	return Read(f)
}
