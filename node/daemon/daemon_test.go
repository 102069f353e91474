package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/config"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/status"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/clock"
	"github.com/pipeswarm/pipeswarm/p2p/corpus"
	"github.com/pipeswarm/pipeswarm/shard"
)

func testDaemon(t *testing.T) *Daemon {
	t.Helper()
	cfg := &config.Config{DataDir: filepath.Join(t.TempDir(), "node"), Listen: []string{"/ip4/127.0.0.1/tcp/0"}, Open: true}
	cfg.EnsureDefaults()
	d, err := New(context.Background(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
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
	return testHostWith(t, k)
}

// testHostWith is a host with identity k.
func testHostWith(t *testing.T, k crypto.PrivKey) *p2p.Host {
	t.Helper()
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
	k, _ := p2p.GenerateKey()
	h := testHostWith(t, k)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := h.Connect(ctx, d.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	// h launches a run here, so its tensor streams are read (a stranger's are not).
	if err := d.accept(h.ID(), signedPlanBy(t, d, k, 7, time.Now().Add(time.Minute))); err != nil {
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
		if n := d.host.Penalties().Offences(h.ID()); n != i+1 {
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
	if n := d.host.Penalties().Offences(h.ID()); n != 2 {
		t.Fatalf("a truncated frame changed the sender's penalties to %d, want them left at 2", n)
	}
	// An assignment without a signed plan is a violation too.
	if r, err := wire.Call(ctx, h, wire.NewCallClock(10*time.Second, nil), nil, d.ID(), wire.Msg{Type: wire.MsgAssign}); err != nil || r.OK {
		t.Fatalf("unsigned assignment: %+v, %v; want a refusal", r, err)
	}
	if n := d.host.Penalties().Offences(h.ID()); n != 3 {
		t.Fatalf("an unsigned assignment left the sender at %d penalties, want 3", n)
	}
	r, err := wire.Call(ctx, h, wire.NewCallClock(10*time.Second, nil), nil, d.ID(), wire.Msg{Type: wire.MsgOffer})
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
	if n := len(d.view.Load().runs); n != 0 {
		t.Fatalf("%d runs created by refused assignments", n)
	}
}

// signedPlan is a valid one-stage plan for d, signed by a new launcher key, expiring
// at expires.
func signedPlan(t *testing.T, d *Daemon, id uint64, expires time.Time) (peer.ID, *p2p.Signed) {
	t.Helper()
	k, err := p2p.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	launcher, _ := p2p.PeerID(k)
	return launcher, signedPlanBy(t, d, k, id, expires)
}

// signedPlanBy is signedPlan's plan signed by launcher key k.
func signedPlanBy(t *testing.T, d *Daemon, k crypto.PrivKey, id uint64, expires time.Time) *p2p.Signed {
	t.Helper()
	sp, err := spec.Parse([]byte(`name: p
model: {d_model: 32, n_layers: 1, n_heads: 2, d_ff: 64, seq_len: 16}
train: {batch_size: 2, steps: 2, lr: 0.001}
`), "p.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ranges, _ := shard.SplitLayers(1, 1)
	return signedPlanOf(t, k, id, expires, sp, []assign.Assignment{{Stage: 0, Peer: d.ID().String(), Range: ranges[0]}})
}

// signedPlanOf is the plan of run id of sp with cells, signed by launcher key k.
func signedPlanOf(t *testing.T, k crypto.PrivKey, id uint64, expires time.Time, sp *spec.Spec, cells []assign.Assignment) *p2p.Signed {
	t.Helper()
	launcher, _ := p2p.PeerID(k)
	plan := wire.Plan{ID: id, Spec: sp.String(), Launcher: launcher.String(), Created: time.Now(), Expires: expires,
		Stages: cells,
		Data:   &wire.DataPlan{Train: []corpus.Blob{corpus.BlobOf([]byte("some text"))}, Val: corpus.BlobOf([]byte("more text"))}}
	b, _ := json.Marshal(plan)
	signed, err := p2p.Sign(k, b)
	if err != nil {
		t.Fatal(err)
	}
	return signed
}

func TestPlansAreBoundToTheirLauncherAndExpire(t *testing.T) {
	d := testDaemon(t) // open: any launcher
	soon := time.Now().Add(time.Minute)

	launcher, signed := signedPlan(t, d, 1, soon)
	other := testHost(t).ID()
	if err := d.accept(other, signed); err == nil || !strings.Contains(err.Error(), "sent by") {
		t.Errorf("plan relayed by another peer: %v, want a refusal", err)
	}
	launcher, signed = signedPlan(t, d, 2, time.Now().Add(-time.Second))
	if err := d.accept(launcher, signed); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Errorf("expired plan: %v, want a refusal", err)
	}
	launcher, signed = signedPlan(t, d, 3, time.Now().Add(2*wire.MaxPlanLife))
	if err := d.accept(launcher, signed); err == nil || !strings.Contains(err.Error(), "ahead") {
		t.Errorf("plan valid for too long: %v, want a refusal", err)
	}
	launcher, signed = signedPlan(t, d, 4, soon)
	if err := d.accept(launcher, signed); err != nil {
		t.Fatalf("valid plan refused: %v", err)
	}
	if err := d.accept(launcher, signed); err == nil || !strings.Contains(err.Error(), "already accepted") {
		t.Errorf("replayed plan: %v, want a refusal", err)
	}
}

func TestAnAssignmentNeverStartedIsReleasedWhenItsPlanExpires(t *testing.T) {
	d := testDaemon(t)
	launcher, signed := signedPlan(t, d, 5, time.Now().Add(300*time.Millisecond))
	if err := d.accept(launcher, signed); err != nil {
		t.Fatal(err)
	}
	if d.run(5) == nil {
		t.Fatal("accepted run not held")
	}
	deadline := time.Now().Add(10 * time.Second)
	for d.run(5) != nil {
		if time.Now().After(deadline) {
			t.Fatal("the never-started run still holds its slot 10 s after its plan expired")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A neighbour that is still sending when a run has stopped here (it stopped first)
// has its stream reset but is not penalised: late is not malicious, and banning it
// would break the next run with the same peers.
func TestLateFramesForAnEndedRunAreDroppedWithoutPenalty(t *testing.T) {
	d := testDaemon(t)
	d.ask(inLoop(func(d *Daemon, t *table) {
		t.ended[42] = d.clock.Now()
		t.changed = true
	}))
	h := testHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := h.Connect(ctx, d.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	for range 12 { // more than the ban limit
		s, err := h.NewStream(ctx, d.ID(), p2p.ProtoActivation)
		if err != nil {
			t.Fatalf("stream refused (banned?): %v", err)
		}
		f := &p2p.Frame{Kind: p2p.KindActivation, Run: 42, Step: 9, Shape: []uint32{1, 2, 2}, Codec: p2p.CodecF32, Data: []float32{1, 2, 3, 4}}
		if err := p2p.WriteFrame(s, f); err != nil {
			t.Fatal(err)
		}
		_ = s.CloseWrite()
		_ = s.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := s.Read(make([]byte, 1)); err == nil || err == io.EOF {
			t.Fatalf("late frame: stream ended with %v, want a reset", err)
		}
	}
	if n := d.host.Penalties().Offences(h.ID()); n != 0 {
		t.Errorf("late frames for an ended run earned %d penalties, want 0", n)
	}
}

// A run that ended is remembered for endedMemory on the daemon's clock, then
// forgotten; its record goes when a later run ends.
func TestAnEndedRunIsForgottenAfterAWhile(t *testing.T) {
	d := testDaemon(t)
	m := clock.NewManual(time.Now())
	d.clock = m // before any traffic: nothing else reads it yet
	d.endRun(7, status.Run{})
	if !d.hasEnded(7) {
		t.Fatal("a run that just ended is not remembered")
	}
	m.Advance(endedMemory - time.Nanosecond)
	if !d.hasEnded(7) {
		t.Fatal("an ended run is forgotten before endedMemory")
	}
	m.Advance(time.Nanosecond)
	if d.hasEnded(7) {
		t.Fatal("an ended run is remembered past endedMemory")
	}
	d.endRun(8, status.Run{})
	_, kept := d.view.Load().ended[7]
	if kept || !d.hasEnded(8) {
		t.Fatalf("after run 8 ended: run 7's record kept %v, run 8 remembered %v; want false, true", kept, d.hasEnded(8))
	}
}

// A node told nowhere to listen picks its ports on the first start and listens on the
// same ones after a restart on its data directory; told where, it listens there.
func TestNodeKeepsItsDefaultListenPortsAcrossRestarts(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "node")
	start := func(listen []string) []string {
		cfg := &config.Config{DataDir: dataDir, Listen: listen, Open: true}
		cfg.EnsureDefaults()
		d, err := New(context.Background(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		var out []string
		for _, a := range d.host.Network().ListenAddresses() {
			if !strings.Contains(a.String(), "p2p-circuit") {
				out = append(out, a.String())
			}
		}
		slices.Sort(out)
		return out
	}
	first := start(nil)
	if len(first) != 2 || strings.Contains(first[0], "/tcp/0") {
		t.Fatalf("first start listens on %v, want TCP and QUIC on chosen ports", first)
	}
	if again := start(nil); !slices.Equal(again, first) {
		t.Errorf("restarted, the node listens on %v, want %v as before", again, first)
	}
	if told := start([]string{"/ip4/127.0.0.1/tcp/0"}); len(told) != 1 || !strings.HasPrefix(told[0], "/ip4/127.0.0.1/tcp/") {
		t.Errorf("told --listen /ip4/127.0.0.1/tcp/0, the node listens on %v", told)
	}
	if again := start(nil); !slices.Equal(again, first) {
		t.Errorf("after a start told elsewhere, the node listens on %v, want its kept %v", again, first)
	}
}

// A plan accepted before a restart is refused after it, until it expires: the node
// keeps the plans it accepted in its data directory.
func TestAPlanAcceptedBeforeARestartIsRefusedAfterIt(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "node")
	newDaemon := func() *Daemon {
		cfg := &config.Config{DataDir: dir, Listen: []string{"/ip4/127.0.0.1/tcp/0"}, Open: true, MaxStages: 2}
		cfg.EnsureDefaults()
		d, err := New(context.Background(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	d := newDaemon()
	k, _ := p2p.GenerateKey()
	launcher, _ := p2p.PeerID(k)
	signed := signedPlanBy(t, d, k, 11, time.Now().Add(time.Minute))
	if err := d.accept(launcher, signed); err != nil {
		t.Fatal(err)
	}
	short := signedPlanBy(t, d, k, 12, time.Now().Add(300*time.Millisecond))
	if err := d.accept(launcher, short); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	d = newDaemon()
	defer d.Close()
	if err := d.accept(launcher, signed); err == nil || !strings.Contains(err.Error(), "already accepted") {
		t.Fatalf("the same signed plan after a restart: %v, want a refusal", err)
	}
	// Once a plan has expired it is forgotten (and refused as expired anyway).
	time.Sleep(400 * time.Millisecond)
	var err error
	d.ask(inLoop(func(d *Daemon, t *table) { err = d.writeAccepted(t) }))
	if err != nil {
		t.Fatal(err)
	}
	kept, err := d.dir.ReadAccepted(time.Now())
	if err != nil || len(kept) != 1 || kept[0].Run != 11 {
		t.Fatalf("kept after one expired: %+v, %v; want run 11 only", kept, err)
	}
}
