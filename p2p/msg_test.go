package p2p

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"testing/iotest"
)

type testMsg struct {
	Type  string            `json:"type"`
	Step  int               `json:"step"`
	Peers []string          `json:"peers"`
	Extra map[string]string `json:"extra,omitempty"`
}

func TestMsgRoundTripsThroughWriteAndRead(t *testing.T) {
	var buf bytes.Buffer
	in := []testMsg{
		{Type: "join", Step: 3, Peers: []string{"a", "b"}},
		{Type: "leave", Extra: map[string]string{"why": "ctrl-c"}},
	}
	for _, m := range in {
		if err := WriteMsg(&buf, m); err != nil {
			t.Fatal(err)
		}
	}
	for i, want := range in {
		var got testMsg
		if err := ReadMsg(&buf, &got, 0); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("message %d: got %+v, want %+v", i, got, want)
		}
	}
	var m testMsg
	if err := ReadMsg(&buf, &m, 0); err != io.EOF {
		t.Fatalf("at end of stream got %v, want io.EOF itself", err)
	}
}

func TestWriteMsgUsesOneWrite(t *testing.T) {
	var w countingWriter
	if err := WriteMsg(&w, testMsg{Type: "x"}); err != nil {
		t.Fatal(err)
	}
	if w.writes != 1 {
		t.Fatalf("%d writes, want 1", w.writes)
	}
}

func lengthPrefixed(n uint32, body string) []byte {
	b := binary.BigEndian.AppendUint32(nil, n)
	return append(b, body...)
}

func TestReadMsgRejectsBadMessages(t *testing.T) {
	var big bytes.Buffer
	if err := WriteMsg(&big, testMsg{Type: strings.Repeat("x", 100)}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name  string
		in    []byte
		max   int
		want  string
		trunc bool
	}{
		{name: "over caller limit", in: big.Bytes(), max: 64, want: "exceeds limit 64"},
		{name: "claimed 4 GiB", in: lengthPrefixed(0xffffffff, "{}"), want: "length 4294967295 exceeds limit 4194304"},
		{name: "not JSON", in: lengthPrefixed(5, "hello"), want: "invalid character"},
		{name: "empty body", in: lengthPrefixed(0, ""), want: "unexpected end of JSON"},
		{name: "trailing garbage", in: lengthPrefixed(4, "{}{}"), want: "after top-level value"},
		{name: "wrong type", in: lengthPrefixed(12, `{"step":"x"}`), want: "cannot unmarshal string"},
		{name: "truncated length", in: []byte{0, 0}, want: "truncated length", trunc: true},
		{name: "truncated body", in: lengthPrefixed(10, "{}"), want: "truncated body", trunc: true},
	} {
		t.Run(c.name, func(t *testing.T) {
			var m testMsg
			err := ReadMsg(bytes.NewReader(c.in), &m, c.max)
			// A message cut short is a stream that broke, not a violation.
			if !c.trunc && (!errors.Is(err, ErrBadMsg) || !errors.Is(err, ErrViolation)) {
				t.Fatalf("got %v, want ErrBadMsg, a violation", err)
			}
			if c.trunc && (err == nil || errors.Is(err, ErrBadMsg) || errors.Is(err, ErrViolation)) {
				t.Fatalf("got %v for a truncated message, want an error that is no violation", err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not say %q", err, c.want)
			}
			if c.trunc != errors.Is(err, io.ErrUnexpectedEOF) {
				t.Errorf("errors.Is(err, io.ErrUnexpectedEOF) = %v, want %v", !c.trunc, c.trunc)
			}
		})
	}
}

func TestReadMsgBlamesTheCallerNotThePeerForANonPointer(t *testing.T) {
	var m testMsg
	err := ReadMsg(bytes.NewReader(lengthPrefixed(2, "{}")), m, 0)
	if err == nil || errors.Is(err, ErrBadMsg) || errors.Is(err, ErrViolation) {
		t.Fatalf("got %v, want an error without ErrBadMsg", err)
	}
}

func TestWriteMsgRefusesOversizeMessages(t *testing.T) {
	var buf bytes.Buffer
	err := WriteMsg(&buf, strings.Repeat("x", MaxMsgBytes))
	if err == nil || !strings.Contains(err.Error(), "exceeds MaxMsgBytes") {
		t.Fatalf("got %v, want a size error", err)
	}
	if buf.Len() != 0 {
		t.Fatalf("wrote %d bytes of a refused message", buf.Len())
	}
}

func FuzzReadMsg(f *testing.F) {
	f.Add(lengthPrefixed(2, "{}"))
	f.Add(lengthPrefixed(27, `{"type":"join","peers":[1]}`))
	f.Add(lengthPrefixed(4, "null"))
	f.Add(lengthPrefixed(0xffffffff, ""))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		var v any
		if err := ReadMsg(bytes.NewReader(in), &v, 1<<16); err != nil {
			if err != io.EOF && !errors.Is(err, ErrBadMsg) {
				t.Fatalf("error neither io.EOF nor ErrBadMsg: %v", err)
			}
			return
		}
		var buf bytes.Buffer
		if err := WriteMsg(&buf, v); err != nil {
			t.Fatalf("accepted message does not re-encode: %v", err)
		}
		var again any
		if err := ReadMsg(&buf, &again, 0); err != nil {
			t.Fatalf("re-encoded message refused: %v", err)
		}
		if !reflect.DeepEqual(v, again) {
			t.Fatalf("round trip changed the message: %#v → %#v", v, again)
		}
	})
}

// A peer that declares a 4 MiB message and sends a few bytes of it costs the
// reader about what it sent, not what it declared.
func TestReadMsgAllocatesAsBytesArriveNotTheDeclaredLength(t *testing.T) {
	var msg bytes.Buffer
	var p [4]byte
	binary.BigEndian.PutUint32(p[:], MaxMsgBytes)
	msg.Write(p[:])
	msg.WriteString(`{"type":"offer","peers":["`)
	msg.Write(bytes.Repeat([]byte("a"), 100<<10))
	least := ^uint64(0)
	for range 5 {
		var v testMsg
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		err := ReadMsg(bytes.NewReader(msg.Bytes()), &v, MaxMsgBytes)
		runtime.ReadMemStats(&after)
		if !errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, ErrViolation) {
			t.Fatalf("cut-short message: %v, want io.ErrUnexpectedEOF and no violation", err)
		}
		least = min(least, after.TotalAlloc-before.TotalAlloc)
	}
	// 100 KiB sent: the buffer may be up to twice that.
	if least > 512<<10 {
		t.Fatalf("reading a cut-short message declaring %d bytes allocated %d bytes, want ≤ %d", MaxMsgBytes, least, 512<<10)
	}
	// And a whole message of that size still reads.
	big := testMsg{Type: "x", Peers: []string{strings.Repeat("b", MaxMsgBytes-100)}}
	var buf bytes.Buffer
	if err := WriteMsg(&buf, big); err != nil {
		t.Fatal(err)
	}
	var got testMsg
	if err := ReadMsg(iotest.OneByteReader(io.LimitReader(&buf, 1<<30)), &got, MaxMsgBytes); err != nil || got.Peers[0] != big.Peers[0] {
		t.Fatalf("full message: %v", err)
	}
}
