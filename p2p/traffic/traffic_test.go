package traffic

import (
	"bytes"
	"io"
	"strings"
	"sync"
	"testing"
)

func TestMetersCountConcurrentFramesPerProtocolAndNilCountsNothing(t *testing.T) {
	m := NewMeters("/a/1", "/b/1", "/a/1")
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 1000 {
				m.For("/a/1").In(10)
				m.For("/b/1").Out(3)
				m.For("/unmetered").Out(5) // nil meter: counts nothing, does not panic
			}
		})
	}
	wg.Wait()
	got := m.Snapshot()
	want := []Protocol{{"/a/1", Counts{FramesIn: 8000, BytesIn: 80000}}, {"/b/1", Counts{FramesOut: 8000, BytesOut: 24000}}}
	if len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("snapshot %+v, want %+v", got, want)
	}
	var none *Meters
	if none.For("/a/1") != nil || none.Snapshot() != nil {
		t.Error("a nil Meters should meter nothing")
	}
}

func TestCountingReaderAndWriterCountWhatPassed(t *testing.T) {
	r := &CountingReader{R: strings.NewReader("hello, world")}
	b := make([]byte, 5)
	if _, err := io.ReadFull(r, b); err != nil || r.N != 5 {
		t.Fatalf("read 5: n %d, %v", r.N, err)
	}
	rest, _ := io.ReadAll(r)
	if r.N != 12 || string(rest) != ", world" {
		t.Errorf("counted %d, rest %q", r.N, rest)
	}
	var buf bytes.Buffer
	w := &CountingWriter{W: &buf}
	w.Write([]byte("abc"))
	w.Write([]byte("de"))
	if w.N != 5 || buf.String() != "abcde" {
		t.Errorf("counted %d of %q", w.N, buf.String())
	}
}
