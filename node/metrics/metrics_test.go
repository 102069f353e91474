package metrics

import (
	"bytes"
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestWriterLinesReadBack(t *testing.T) {
	path := filepath.Join(t.TempDir(), "metrics.jsonl")
	w, err := Create(path)
	if err != nil {
		t.Fatal(err)
	}
	v := 2.5
	in := []Step{{Step: 1, Loss: 5.5, Tokens: 2048, TokensPerS: 1000, ElapsedS: 2}, {Step: 2, Loss: 4, ValLoss: &v, Tokens: 4096}}
	for _, s := range in {
		if err := w.Write(s); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(path)
	if n := strings.Count(string(raw), "\n"); n != 2 {
		t.Fatalf("%d lines, want 2:\n%s", n, raw)
	}
	if strings.Contains(strings.Split(string(raw), "\n")[0], "val_loss") {
		t.Fatalf("a step without evaluation carries val_loss: %s", raw)
	}
	out, err := ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 2 || out[1].ValLoss == nil || *out[1].ValLoss != 2.5 || out[0].Tokens != 2048 {
		t.Fatalf("read back %+v", out)
	}
}

func TestReadNamesTheBadLine(t *testing.T) {
	_, err := Read(bytes.NewBufferString("{\"step\":1}\n{oops\n"))
	if err == nil || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("err = %v, want one naming line 2", err)
	}
}

func TestPlotLossWritesAPNG(t *testing.T) {
	path := filepath.Join(t.TempDir(), "loss.png")
	v := 3.0
	steps := []Step{{Step: 1, Loss: 5}, {Step: 2, Loss: 4, ValLoss: &v}, {Step: 3, Loss: 3.5}}
	if err := PlotLoss(path, "test", steps); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("loss.png is not a PNG: %v", err)
	}
	if b := img.Bounds(); b.Dx() < 100 || b.Dy() < 100 {
		t.Fatalf("loss.png is %v", b)
	}
	if ents, _ := os.ReadDir(filepath.Dir(path)); len(ents) != 1 {
		t.Fatalf("plot left %d files, want only loss.png", len(ents))
	}
}
