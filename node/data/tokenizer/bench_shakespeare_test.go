package tokenizer

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkEncodeShakespeare encodes tinyshakespeare with a 2000-token tokenizer learnt
// from it.
func BenchmarkEncodeShakespeare(b *testing.B) {
	raw, err := os.ReadFile(filepath.Join("..", "..", "..", "..", "shared", "data", "tinyshakespeare.txt"))
	if err != nil {
		b.Skip("tinyshakespeare is absent (../shared/data/tinyshakespeare.txt beside the repository)")
	}
	text := string(raw)
	tk, err := Train(context.Background(), []string{text}, 2000)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(text)))
	for b.Loop() {
		tk.Encode(text)
	}
}
