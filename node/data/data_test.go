package data

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestLoadReadsTextFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "corpus.txt")
	write(t, p, "hello\nworld\n")
	got, err := Load(p)
	if err != nil || string(got) != "hello\nworld\n" {
		t.Errorf("Load = %q, %v", got, err)
	}
}

func TestLoadRejectsFileThatIsNotText(t *testing.T) {
	dir := t.TempDir()
	for name, content := range map[string]string{"nul.bin": "a\x00b", "latin1.txt": "caf\xe9"} {
		p := filepath.Join(dir, name)
		write(t, p, content)
		_, err := Load(p)
		if !errors.Is(err, ErrNotText) || !strings.Contains(err.Error(), p) {
			t.Errorf("Load(%s) error = %v, want ErrNotText naming the path", name, err)
		}
	}
}

func TestLoadOfEmptyCorpusIsAnError(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "empty.txt"), "")
	write(t, filepath.Join(dir, "empty.jsonl"), "\n\n")
	write(t, filepath.Join(dir, "sub", ".hidden.txt"), "not read")
	for _, p := range []string{filepath.Join(dir, "empty.txt"), filepath.Join(dir, "empty.jsonl"), filepath.Join(dir, "sub")} {
		_, err := Load(p)
		if !errors.Is(err, ErrEmpty) || !strings.Contains(err.Error(), p) {
			t.Errorf("Load(%s) error = %v, want ErrEmpty naming the path", p, err)
		}
	}
}

func TestLoadOfMissingPathWrapsNotExist(t *testing.T) {
	p := filepath.Join(t.TempDir(), "nope")
	_, err := Load(p)
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), p) {
		t.Errorf("error = %v, want not-exist naming the path", err)
	}
}

func TestLoadDirectoryJoinsTextFilesInSortedPathOrder(t *testing.T) {
	root := filepath.Join(t.TempDir(), "corpus")
	write(t, filepath.Join(root, "b.txt"), "B")
	write(t, filepath.Join(root, "a", "x.txt"), "AX")
	write(t, filepath.Join(root, "a.txt"), "A")
	write(t, filepath.Join(root, ".hidden"), "hidden file")
	write(t, filepath.Join(root, ".git", "config"), "hidden dir")
	write(t, filepath.Join(root, "a", "image.png"), "\x89PNG\x00\x00")
	write(t, filepath.Join(root, "a", "latin1.txt"), "caf\xe9")
	write(t, filepath.Join(root, "empty.txt"), "")
	outside := filepath.Join(filepath.Dir(root), "outside.txt")
	write(t, outside, "C")
	if err := os.Symlink(outside, filepath.Join(root, "c.txt")); err != nil {
		t.Fatal(err)
	}
	got, err := Load(root)
	if err != nil {
		t.Fatal(err)
	}
	// "a.txt" sorts before "a/x.txt" because '.' < '/'.
	if want := "A\nAX\nB\nC"; string(got) != want {
		t.Errorf("Load(dir) = %q, want %q", got, want)
	}
}

func TestLoadJSONLJoinsTextFields(t *testing.T) {
	p := filepath.Join(t.TempDir(), "c.jsonl")
	write(t, p, `{"text": "one"}`+"\n\n"+`{"id": 2, "text": "two\nlines"}`+"\r\n"+`{"text": "caf\u00e9"}`)
	got, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if want := "one\ntwo\nlines\ncafé"; string(got) != want {
		t.Errorf("Load(jsonl) = %q, want %q", got, want)
	}
}

func TestLoadJSONLNamesFileAndLineOfBadRecord(t *testing.T) {
	for _, tc := range []struct{ name, content, want string }{
		{"not json", "{\"text\": \"a\"}\n\n{\"text\": \"b\"\n", ":3: bad record"},
		{"no text", "{\"text\": \"a\"}\n{\"body\": \"b\"}\n", `:2: bad record: no "text" field`},
		{"text not a string", "{\"text\": 7}\n", `:1: bad record: "text" is not a string: 7`},
		{"text null", "{\"text\": null}\n", `:1: bad record: "text" is not a string: null`},
		{"not an object", "[\"a\"]\n", ":1: bad record"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "c.jsonl")
			write(t, p, tc.content)
			_, err := Load(p)
			if !errors.Is(err, ErrBadRecord) || !strings.Contains(err.Error(), p+tc.want) {
				t.Errorf("error = %v, want ErrBadRecord containing %q", err, p+tc.want)
			}
		})
	}
}

func TestSplitTakesValidationFromTheEnd(t *testing.T) {
	text := []byte(strings.Repeat("0123456789", 100))
	for _, tc := range []struct {
		n        int
		frac     float64
		trainLen int
	}{
		{1000, 0.1, 900},
		{10, 0.15, 9}, // floor(1.5) = 1 byte of validation
		{10, 0, 10},
		{10, 1, 0},
		{7, 0.5, 4},
	} {
		train, val := Split(text[:tc.n], tc.frac)
		if len(train) != tc.trainLen || len(train)+len(val) != tc.n {
			t.Errorf("Split(%d bytes, %v) = %d + %d, want %d + %d", tc.n, tc.frac, len(train), len(val), tc.trainLen, tc.n-tc.trainLen)
		}
		if !bytes.Equal(append(bytes.Clone(train), val...), text[:tc.n]) {
			t.Errorf("Split(%d bytes, %v) does not partition the text in order", tc.n, tc.frac)
		}
	}
	train, val := Split(text, 0.1)
	_ = append(train, 'x')
	if val[0] != '0' {
		t.Errorf("appending to train overwrote val")
	}
}

func TestValWindowsAreConsecutiveAndDropTheRemainder(t *testing.T) {
	val := make([]byte, 23)
	for i := range val {
		val[i] = byte(i)
	}
	const seqLen = 4
	if got := ValWindows(val, seqLen); got != 4 {
		t.Fatalf("ValWindows(23 bytes, 4) = %d, want 4", got)
	}
	in, tg := make([]int32, seqLen), make([]int32, seqLen)
	for i := range 4 {
		ValWindow(val, seqLen, i, in, tg)
		for j := range seqLen {
			if start := int32(i * (seqLen + 1)); in[j] != start+int32(j) || tg[j] != start+int32(j)+1 {
				t.Fatalf("window %d = %v -> %v, want inputs from %d", i, in, tg, start)
			}
		}
	}
	if got := ValWindows(val[:4], seqLen); got != 0 {
		t.Errorf("ValWindows(4 bytes, 4) = %d, want 0", got)
	}
}

func TestValWindowPanicsOutOfRange(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Errorf("ValWindow past the last window did not panic")
		}
	}()
	ValWindow(make([]byte, 10), 4, 2, make([]int32, 4), make([]int32, 4))
}

func sample(t *testing.T, train []byte, seqLen int, seed uint64, replica, batch int) []int32 {
	t.Helper()
	s, err := NewSampler(train, seqLen, seed, replica)
	if err != nil {
		t.Fatal(err)
	}
	in, tg := make([]int32, batch*seqLen), make([]int32, batch*seqLen)
	var all []int32
	for range 3 {
		s.Next(in, tg)
		all = append(append(all, in...), tg...)
	}
	return all
}

func TestSamplerIsDeterministicPerSeedAndReplica(t *testing.T) {
	train, _ := Builtin()
	a := sample(t, train, 64, 42, 0, 4)
	if b := sample(t, train, 64, 42, 0, 4); !equal(a, b) {
		t.Errorf("same seed and replica drew different sequences")
	}
	if b := sample(t, train, 64, 42, 1, 4); equal(a, b) {
		t.Errorf("replicas 0 and 1 drew the same sequences")
	}
	if b := sample(t, train, 64, 43, 0, 4); equal(a, b) {
		t.Errorf("seeds 42 and 43 drew the same sequences")
	}
}

func equal(a, b []int32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestSamplerDrawsContiguousSequencesWithNextByteTargets(t *testing.T) {
	const seqLen = 5
	train := make([]byte, seqLen+3) // three possible start offsets: 0, 1, 2
	for i := range train {
		train[i] = byte(i)
	}
	s, err := NewSampler(train, seqLen, 1, 0)
	if err != nil {
		t.Fatal(err)
	}
	in, tg := make([]int32, 2*seqLen), make([]int32, 2*seqLen)
	seen := map[int32]int{}
	for range 300 {
		s.Next(in, tg)
		for b := 0; b < len(in); b += seqLen {
			start := in[b]
			seen[start]++
			for j := range seqLen {
				if in[b+j] != start+int32(j) || tg[b+j] != start+int32(j)+1 {
					t.Fatalf("sequence %v -> %v is not a contiguous slice with next-byte targets", in[b:b+seqLen], tg[b:b+seqLen])
				}
			}
		}
	}
	if len(seen) != 3 || seen[0] < 150 || seen[1] < 150 || seen[2] < 150 {
		t.Errorf("start offsets drawn %v, want 0, 1 and 2 about 200 times each", seen)
	}
}

func TestNewSamplerRejectsTextShorterThanOneSequence(t *testing.T) {
	if _, err := NewSampler(make([]byte, 8), 8, 1, 0); !errors.Is(err, ErrTooShort) {
		t.Errorf("error = %v, want ErrTooShort", err)
	}
	if _, err := NewSampler(make([]byte, 9), 8, 1, 0); err != nil {
		t.Errorf("seqLen+1 bytes: %v", err)
	}
}

func TestTinyShakespeareLoadsAndSplits(t *testing.T) {
	const path = "../../../shared/data/tinyshakespeare.txt"
	info, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		t.Skipf("%s is absent; it is the shared copy of karpathy's tinyshakespeare input.txt", path)
	}
	if err != nil {
		t.Fatal(err)
	}
	text, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(text)) != info.Size() {
		t.Errorf("Load read %d bytes of a %d-byte file", len(text), info.Size())
	}
	train, val := Split(text, 0.1)
	if want := len(text) / 10; len(val) != want || len(train) != len(text)-want {
		t.Errorf("Split = %d + %d, want %d + %d", len(train), len(val), len(text)-want, want)
	}
	if !bytes.HasPrefix(train, []byte("First Citizen:")) {
		t.Errorf("train does not start at the start of the play: %q", train[:20])
	}
}

func TestAppendStateIsState(t *testing.T) {
	s, err := NewSampler([]byte("the quick brown fox jumps over the lazy dog"), 4, 3, 1)
	if err != nil {
		t.Fatal(err)
	}
	in, tg := make([]int32, 4), make([]int32, 4)
	s.Next(in, tg)
	want, err := s.State()
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.AppendState([]byte("x"))
	if err != nil || string(got[1:]) != string(want) || got[0] != 'x' {
		t.Errorf("AppendState %x, State %x", got, want)
	}
}
