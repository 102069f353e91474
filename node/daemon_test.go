package node

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/config"
	"github.com/pipeswarm/pipeswarm/p2p"
)

func testDaemon(t *testing.T) *Daemon {
	t.Helper()
	cfg := &config.Config{DataDir: filepath.Join(t.TempDir(), "node"), Listen: []string{"/ip4/127.0.0.1/tcp/0"}, Open: true}
	cfg.EnsureDefaults()
	d, err := NewDaemon(context.Background(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func testHost(t *testing.T) *p2p.Host {
	t.Helper()
	k, err := p2p.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	h, err := p2p.NewHost(context.Background(), p2p.HostOptions{Key: k, Listen: []string{"/ip4/127.0.0.1/tcp/0"},
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// A malformed or misaddressed frame resets its stream and counts against the sender;
// the node keeps serving.
func TestBadFramesResetTheStreamAndPenaliseTheSender(t *testing.T) {
	d := testDaemon(t)
	h := testHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := h.Connect(ctx, d.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	good := &p2p.Frame{Kind: p2p.KindActivation, Run: 42, Step: 1, Shape: []uint32{1, 2, 2}, Codec: p2p.CodecF32,
		Data: []float32{1, 2, 3, 4}}
	for i, send := range []func(w io.Writer) error{
		func(w io.Writer) error {
			_, err := w.Write([]byte("PSWF\x01garbage that is not a header, long enough to be read as one"))
			return err
		},
		func(w io.Writer) error { return p2p.WriteFrame(w, good) }, // well formed, but no such run here
	} {
		s, err := h.NewStream(ctx, d.ID(), p2p.ProtoActivation)
		if err != nil {
			t.Fatal(err)
		}
		if err := send(s); err != nil {
			t.Fatal(err)
		}
		_ = s.CloseWrite()
		_ = s.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := s.Read(make([]byte, 1)); err == nil || err == io.EOF {
			t.Fatalf("frame %d: stream ended with %v, want a reset", i, err)
		}
		if n := d.host.Penalties().Count(h.ID()); n != i+1 {
			t.Fatalf("after bad frame %d the sender has %d penalties, want %d", i, n, i+1)
		}
	}
	// A stream cut short (a peer that dies mid-write) is reset but is not misbehaviour.
	s, err := h.NewStream(ctx, d.ID(), p2p.ProtoActivation)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := p2p.WriteFrame(&buf, good); err != nil {
		t.Fatal(err)
	}
	_, _ = s.Write(buf.Bytes()[:buf.Len()/2])
	_ = s.CloseWrite()
	_ = s.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := s.Read(make([]byte, 1)); err == nil || err == io.EOF {
		t.Fatalf("truncated frame: stream ended with %v, want a reset", err)
	}
	if n := d.host.Penalties().Count(h.ID()); n != 2 {
		t.Fatalf("a truncated frame changed the sender's penalties to %d, want them left at 2", n)
	}
	r, err := call(ctx, h, d.ID(), ctlMsg{Type: msgOffer})
	if err != nil || !r.OK || r.Offer == nil || r.Offer.Peer != d.ID().String() {
		t.Fatalf("node stopped answering after bad frames: %+v, %v", r, err)
	}
}

// An assignment must carry a valid signature from a trusted key, name the signer as
// launcher, and give this node a stage.
func TestAssignmentsAreCheckedBeforeAnythingIsAllocated(t *testing.T) {
	d := testDaemon(t)
	d.cfg.Open = false
	k, _ := p2p.GenerateKey()
	signed, err := p2p.Sign(k, []byte(`{"id":1}`))
	if err != nil {
		t.Fatal(err)
	}
	h := testHost(t)
	if err := d.accept(h.ID(), signed); err == nil {
		t.Fatal("accepted a run signed by an untrusted key")
	}
	signed.Payload = []byte(`{"id":2}`) // tampered after signing
	if err := d.accept(h.ID(), signed); err == nil {
		t.Fatal("accepted a run whose payload does not match its signature")
	}
	if len(d.runs) != 0 {
		t.Fatalf("%d runs created by refused assignments", len(d.runs))
	}
}
