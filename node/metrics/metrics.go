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
	GradNorm   float64  `json:"grad_norm"`
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

// Close flushes and closes the file.
func (w *Writer) Close() error {
	return errors.Join(w.buf.Flush(), w.f.Close())
}

// Read parses a metrics.jsonl stream; a bad line is an error naming it.
func Read(r io.Reader) ([]Step, error) {
	var out []Step
	sc := bufio.NewScanner(r)
	for line := 1; sc.Scan(); line++ {
		if len(sc.Bytes()) == 0 {
			continue
		}
		var s Step
		if err := json.Unmarshal(sc.Bytes(), &s); err != nil {
			return nil, fmt.Errorf("metrics: line %d: %w", line, err)
		}
		out = append(out, s)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	return out, nil
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
