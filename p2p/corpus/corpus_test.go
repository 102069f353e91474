package corpus

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	mocknet "github.com/libp2p/go-libp2p/p2p/net/mock"

	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/traffic"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// hosts returns n connected hosts on an in-memory network.
func hosts(t *testing.T, n int) []host.Host {
	t.Helper()
	mn, err := mocknet.FullMeshConnected(n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mn.Close() })
	return mn.Hosts()
}

func randomBytes(t testing.TB, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// serve registers srv on h and returns it.
func serve(h host.Host, srv *Server) *Server {
	h.SetStreamHandler(Proto, srv.HandleStream)
	return srv
}

// lyingServer serves fake as the blob b.
func lyingServer(b Blob, fake []byte) *Server {
	s := NewServer(quiet)
	s.blobs[b.sum()] = fake
	return s
}

// penalties records Penalise calls.
type penalties struct {
	mu  sync.Mutex
	ids []peer.ID
	err []error
}

func (p *penalties) add(id peer.ID, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.ids = append(p.ids, id)
	p.err = append(p.err, err)
}

func (p *penalties) list() []peer.ID {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.ids)
}

func (p *penalties) errs() []error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.err)
}

func newFetcher(t *testing.T, h host.Host, pen *penalties) *Fetcher {
	f := &Fetcher{Host: h, CacheDir: filepath.Join(t.TempDir(), "cache"), Log: quiet}
	if pen != nil {
		f.Penalise = pen.add
	}
	return f
}

// dirNames lists dir, or nil if it does not exist.
func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

// checkCached fails unless dir holds exactly b's file, with data in it.
func checkCached(t *testing.T, dir string, b Blob, data []byte) {
	t.Helper()
	if names := dirNames(t, dir); !slices.Equal(names, []string{b.Hash}) {
		t.Fatalf("cache holds %v, want just %s", names, b.Hash)
	}
	got, err := os.ReadFile(filepath.Join(dir, b.Hash))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("cached file differs from the blob")
	}
}

func TestFetchRoundTripsBlobAndSecondFetchReadsCacheWithoutStreams(t *testing.T) {
	hs := hosts(t, 2)
	srv := serve(hs[0], NewServer(quiet))
	data := randomBytes(t, 3<<20)
	b := srv.Add(data)
	f := newFetcher(t, hs[1], nil)

	var calls [][2]int64
	got, err := f.Fetch(t.Context(), []peer.ID{hs[0].ID()}, b, func(done, total int64) { calls = append(calls, [2]int64{done, total}) })
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("fetched bytes differ")
	}
	checkCached(t, f.CacheDir, b, data)
	if st := srv.Stats(); st.Requests != 3 || st.Bytes != b.Size {
		t.Fatalf("server stats %+v, want 3 requests and %d bytes", st, b.Size)
	}
	for i, c := range calls {
		if c[1] != b.Size || (i > 0 && c[0] < calls[i-1][0]) {
			t.Fatalf("progress %v is not monotone towards %d", calls, b.Size)
		}
	}
	if last := calls[len(calls)-1]; last[0] != b.Size {
		t.Fatalf("last progress %v, want %d done", last, b.Size)
	}

	before := srv.Stats()
	got, err = f.Fetch(t.Context(), nil, b, nil)
	if err != nil {
		t.Fatalf("second fetch with no peers: %v", err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("cached bytes differ")
	}
	if after := srv.Stats(); after != before {
		t.Fatalf("second fetch reached the server: %+v then %+v", before, after)
	}
}

func TestFetchOfEmptyBlobNeedsNoPeers(t *testing.T) {
	hs := hosts(t, 1)
	f := newFetcher(t, hs[0], nil)
	b := BlobOf(nil)
	got, err := f.Fetch(t.Context(), nil, b, nil)
	if err != nil || len(got) != 0 {
		t.Fatalf("got %d bytes, %v; want 0, nil", len(got), err)
	}
	checkCached(t, f.CacheDir, b, nil)
}

func TestFetchSplitsChunksAcrossPeers(t *testing.T) {
	hs := hosts(t, 3)
	data := randomBytes(t, 8<<20)
	// Neither server answers until both have a stream, so both serve a share.
	var arrived sync.WaitGroup
	arrived.Add(2)
	var srvs []*Server
	for _, h := range hs[:2] {
		srv := NewServer(quiet)
		srv.Add(data)
		srvs = append(srvs, srv)
		var once sync.Once
		h.SetStreamHandler(Proto, func(st network.Stream) {
			once.Do(arrived.Done)
			arrived.Wait()
			srv.HandleStream(st)
		})
	}
	b := BlobOf(data)
	f := newFetcher(t, hs[2], nil)
	f.Parallel = 2
	got, err := f.Fetch(t.Context(), []peer.ID{hs[0].ID(), hs[1].ID()}, b, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("fetched bytes differ")
	}
	s0, s1 := srvs[0].Stats(), srvs[1].Stats()
	if s0.Bytes == 0 || s1.Bytes == 0 || s0.Bytes+s1.Bytes != b.Size {
		t.Fatalf("servers sent %d and %d bytes, want both > 0 summing to %d", s0.Bytes, s1.Bytes, b.Size)
	}
	checkCached(t, f.CacheDir, b, data)
}

func TestFetchResumesFromPartFileDownloadingOnlyTheRest(t *testing.T) {
	hs := hosts(t, 2)
	srv := serve(hs[0], NewServer(quiet))
	data := randomBytes(t, 3<<20)
	b := srv.Add(data)
	f := newFetcher(t, hs[1], nil)
	half := int64(len(data) / 2)
	if err := os.MkdirAll(f.CacheDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(f.CacheDir, b.Hash+".part"), data[:half], 0o600); err != nil {
		t.Fatal(err)
	}
	var first int64 = -1
	got, err := f.Fetch(t.Context(), []peer.ID{hs[0].ID()}, b, func(done, _ int64) {
		if first < 0 {
			first = done
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("fetched bytes differ")
	}
	if st := srv.Stats(); st.Bytes != b.Size-half || st.Requests != 2 {
		t.Fatalf("server sent %d bytes in %d requests, want %d in 2", st.Bytes, st.Requests, b.Size-half)
	}
	if first != half {
		t.Fatalf("first progress %d, want the resumed %d", first, half)
	}
	checkCached(t, f.CacheDir, b, data)
}

func TestFetchRemovesCorruptCachedFile(t *testing.T) {
	hs := hosts(t, 2)
	srv := serve(hs[0], NewServer(quiet))
	data := randomBytes(t, 1<<20+7)
	b := srv.Add(data)
	f := newFetcher(t, hs[1], nil)
	bad := slices.Clone(data)
	bad[12345] ^= 1
	final := filepath.Join(f.CacheDir, b.Hash)
	if err := os.MkdirAll(f.CacheDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(final, bad, 0o600); err != nil {
		t.Fatal(err)
	}

	_, err := f.Fetch(t.Context(), nil, b, nil)
	if !errors.Is(err, ErrHashMismatch) {
		t.Fatalf("with no peers got %v, want ErrHashMismatch", err)
	}
	if names := dirNames(t, f.CacheDir); len(names) != 0 {
		t.Fatalf("cache holds %v after refusing a corrupt file, want nothing", names)
	}

	if err := os.WriteFile(final, bad, 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := f.Fetch(t.Context(), []peer.ID{hs[0].ID()}, b, nil)
	if err != nil {
		t.Fatalf("with an honest peer: %v", err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("fetched bytes differ")
	}
	checkCached(t, f.CacheDir, b, data)
}

func TestFetchFromLyingServerFailsWithHashMismatchLeavesNothingAndPenalises(t *testing.T) {
	hs := hosts(t, 2)
	data := randomBytes(t, 2<<20+100)
	b := BlobOf(data)
	fake := randomBytes(t, len(data))
	serve(hs[0], lyingServer(b, fake))
	var pen penalties
	f := newFetcher(t, hs[1], &pen)

	_, err := f.Fetch(t.Context(), []peer.ID{hs[0].ID()}, b, nil)
	if !errors.Is(err, ErrHashMismatch) {
		t.Fatalf("got %v, want ErrHashMismatch", err)
	}
	if !strings.Contains(err.Error(), b.Hash) {
		t.Fatalf("error %q does not name the blob", err)
	}
	if names := dirNames(t, f.CacheDir); len(names) != 0 {
		t.Fatalf("cache holds %v, want nothing", names)
	}
	if got := pen.list(); !slices.Equal(got, []peer.ID{hs[0].ID()}) || !errors.Is(pen.errs()[0], p2p.ErrViolation) {
		t.Fatalf("penalised %v (%v), want the liar %v for a violation", got, pen.errs(), hs[0].ID())
	}
}

func TestFetchFallsBackFromLyingServerToHonestOne(t *testing.T) {
	for _, parallel := range []int{1, 2} {
		t.Run(map[int]string{1: "one at a time", 2: "both at once"}[parallel], func(t *testing.T) {
			hs := hosts(t, 3)
			data := randomBytes(t, 3<<20)
			b := BlobOf(data)
			liar, honest := hs[0], hs[1]
			serve(liar, lyingServer(b, randomBytes(t, len(data))))
			serve(honest, NewServer(quiet)).Add(data)
			var pen penalties
			f := newFetcher(t, hs[2], &pen)
			f.Parallel = parallel

			got, err := f.Fetch(t.Context(), []peer.ID{liar.ID(), honest.ID()}, b, nil)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatal("fetched bytes differ")
			}
			if got := pen.list(); !slices.Equal(got, []peer.ID{liar.ID()}) {
				t.Fatalf("penalised %v, want just the liar %v", got, liar.ID())
			}
			checkCached(t, f.CacheDir, b, data)
		})
	}
}

func TestFetchOfUnknownBlobNamesItsHash(t *testing.T) {
	hs := hosts(t, 2)
	srv := serve(hs[0], NewServer(quiet))
	srv.Add([]byte("something else"))
	var pen penalties
	f := newFetcher(t, hs[1], &pen)
	b := BlobOf(randomBytes(t, 5000))

	_, err := f.Fetch(t.Context(), []peer.ID{hs[0].ID()}, b, nil)
	if !errors.Is(err, ErrUnknownBlob) {
		t.Fatalf("got %v, want ErrUnknownBlob", err)
	}
	if !strings.Contains(err.Error(), b.Hash) {
		t.Fatalf("error %q does not name %s", err, b.Hash)
	}
	if got := pen.list(); len(got) != 0 {
		t.Fatalf("penalised %v for not having a blob", got)
	}
	if names := dirNames(t, f.CacheDir); len(names) != 0 {
		t.Fatalf("cache holds %v, want nothing", names)
	}
}

func TestFetchRefusesBlobOfWrongSize(t *testing.T) {
	hs := hosts(t, 2)
	srv := serve(hs[0], NewServer(quiet))
	b := srv.Add(randomBytes(t, 5000))
	f := newFetcher(t, hs[1], nil)
	b.Size = 4000
	_, err := f.Fetch(t.Context(), []peer.ID{hs[0].ID()}, b, nil)
	if !errors.Is(err, ErrWrongSize) || !strings.Contains(err.Error(), "5000") {
		t.Fatalf("got %v, want ErrWrongSize naming the real size 5000", err)
	}
}

func TestFetchCancelledMidwayKeepsPartAndNextFetchResumes(t *testing.T) {
	hs := hosts(t, 3)
	srv := serve(hs[0], NewServer(quiet))
	data := randomBytes(t, 4<<20)
	b := srv.Add(data)
	f := newFetcher(t, hs[1], nil)
	f.Parallel = 1
	// The resumed fetch goes to a second server, whose counters see nothing
	// of the request the first fetch may have had in flight when cancelled.
	srv2 := serve(hs[2], NewServer(quiet))
	srv2.Add(data)

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	_, err := f.Fetch(ctx, []peer.ID{hs[0].ID()}, b, func(done, _ int64) {
		if done >= ChunkBytes {
			cancel()
		}
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	part, err := os.ReadFile(filepath.Join(f.CacheDir, b.Hash+".part"))
	if err != nil {
		t.Fatalf("no .part left to resume: %v", err)
	}
	if len(part) < ChunkBytes || len(part) >= len(data) || !bytes.Equal(part, data[:len(part)]) {
		t.Fatalf(".part holds %d bytes, want a proper prefix of at least %d", len(part), ChunkBytes)
	}

	got, err := f.Fetch(t.Context(), []peer.ID{hs[2].ID()}, b, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("fetched bytes differ")
	}
	if sent := srv2.Stats().Bytes; sent != b.Size-int64(len(part)) {
		t.Fatalf("resumed fetch downloaded %d bytes, want %d", sent, b.Size-int64(len(part)))
	}
	checkCached(t, f.CacheDir, b, data)
}

func TestFetchReturnsPromptlyWhenCancelledDuringStalledReply(t *testing.T) {
	hs := hosts(t, 2)
	asked := make(chan struct{}, 1)
	release := make(chan struct{})
	t.Cleanup(func() { close(release) }) // runs before the network closes
	hs[0].SetStreamHandler(Proto, func(st network.Stream) {
		var q [requestLen]byte
		io.ReadFull(st, q[:])
		asked <- struct{}{}
		<-release // never replies
		st.Reset()
	})
	f := newFetcher(t, hs[1], nil)
	b := BlobOf(randomBytes(t, 3000))

	ctx, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() {
		_, err := f.Fetch(ctx, []peer.ID{hs[0].ID()}, b, nil)
		errc <- err
	}()
	<-asked
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second): // the stream deadline alone would be 10 s, and the mock network ignores deadlines
		t.Fatal("Fetch did not return after ctx was cancelled")
	}
}

func TestFetchRefusesReplyOfWrongLengthAndPenalises(t *testing.T) {
	hs := hosts(t, 2)
	hs[0].SetStreamHandler(Proto, func(st network.Stream) {
		q, err := readRequest(st)
		if err != nil {
			st.Reset()
			return
		}
		n := int(q.Length) + 1 // one byte more than asked
		st.Write(append(replyHeader(statusOK, n), make([]byte, n)...))
		st.Close()
	})
	var pen penalties
	f := newFetcher(t, hs[1], &pen)
	b := BlobOf(randomBytes(t, 3000))
	_, err := f.Fetch(t.Context(), []peer.ID{hs[0].ID()}, b, nil)
	if !errors.Is(err, ErrBadReply) {
		t.Fatalf("got %v, want ErrBadReply", err)
	}
	if got := pen.list(); !slices.Equal(got, []peer.ID{hs[0].ID()}) {
		t.Fatalf("penalised %v, want %v", got, hs[0].ID())
	}
}

func TestFetchOfSameBlobTwiceAtOnceIsRefused(t *testing.T) {
	hs := hosts(t, 1)
	f := newFetcher(t, hs[0], nil)
	b := BlobOf([]byte("x"))
	if err := os.MkdirAll(f.CacheDir, 0o700); err != nil {
		t.Fatal(err)
	}
	held, err := os.OpenFile(filepath.Join(f.CacheDir, b.Hash+".part"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if err := flock(held); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Fetch(t.Context(), nil, b, nil); err == nil || !strings.Contains(err.Error(), "another fetch") {
		t.Fatalf("got %v, want a refusal naming another fetch", err)
	}
}

// rawStream opens a Proto stream from hs[1] to hs[0].
func rawStream(t *testing.T, from, to host.Host) network.Stream {
	t.Helper()
	st, err := from.NewStream(t.Context(), to.ID(), Proto)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Reset() })
	return st
}

func TestServerRefusesUnknownBlobWithReplyAndKeepsServingTheStream(t *testing.T) {
	hs := hosts(t, 2)
	var pen penalties
	srv := NewServer(quiet)
	srv.Penalise = pen.add
	serve(hs[0], srv)
	data := []byte("the quick brown fox")
	b := srv.Add(data)
	other := BlobOf([]byte("not served"))
	st := rawStream(t, hs[1], hs[0])

	st.Write(request{Sum: other.sum(), Size: uint64(other.Size), Length: 3}.append(nil))
	status, reason, err := readReply(st, make([]byte, 3))
	if err != nil || status != statusUnknown || !strings.Contains(reason, other.Hash) {
		t.Fatalf("got status %d, reason %q, err %v; want statusUnknown naming %s", status, reason, err, other.Hash)
	}
	st.Write(request{Sum: b.sum(), Size: uint64(b.Size), Offset: 4, Length: 5}.append(nil))
	dst := make([]byte, 5)
	if status, _, err := readReply(st, dst); err != nil || status != statusOK || string(dst) != "quick" {
		t.Fatalf("got %q, status %d, err %v; want \"quick\"", dst, status, err)
	}
	if s := srv.Stats(); s.Requests != 2 || s.Refused != 1 || s.Bytes != 5 || s.Malformed != 0 {
		t.Fatalf("stats %+v", s)
	}
	// Asking for what is not served is how a stranger probes for a hash: it counts.
	if got := pen.list(); len(got) != 1 || got[0] != hs[1].ID() || !errors.Is(pen.errs()[0], ErrNotServed) {
		t.Fatalf("penalised %v (%v), want the asker once for ErrNotServed", got, pen.errs())
	}
}

func TestServerResetsMalformedRequestAndPenalisesSender(t *testing.T) {
	b := BlobOf(make([]byte, 100))
	cases := map[string][]byte{
		"zero length":        request{Sum: b.sum(), Size: 100, Length: 0}.append(nil),
		"over ChunkBytes":    request{Sum: b.sum(), Size: 4 << 20, Length: ChunkBytes + 1}.append(nil),
		"past the end":       request{Sum: b.sum(), Size: 100, Offset: 90, Length: 11}.append(nil),
		"offset past size":   request{Sum: b.sum(), Size: 100, Offset: 1 << 63, Length: 1}.append(nil),
		"size over MaxBlob":  request{Sum: b.sum(), Size: MaxBlobBytes + 1, Length: 1}.append(nil),
		"offset wraps round": request{Sum: b.sum(), Size: 100, Offset: ^uint64(0), Length: 2}.append(nil),
	}
	for name, req := range cases {
		t.Run(name, func(t *testing.T) {
			hs := hosts(t, 2)
			var pen penalties
			srv := NewServer(quiet)
			srv.Penalise = pen.add
			srv.Add(make([]byte, 100))
			serve(hs[0], srv)
			st := rawStream(t, hs[1], hs[0])
			st.Write(req)
			st.CloseWrite()
			if _, _, err := readReply(st, make([]byte, 1)); err == nil {
				t.Fatal("server replied to a malformed request")
			}
			// The server penalises before it resets, so the reset we saw means it is done.
			if got, errs := pen.list(), pen.errs(); !slices.Equal(got, []peer.ID{hs[1].ID()}) || !errors.Is(errs[0], ErrBadRequest) || !errors.Is(errs[0], p2p.ErrViolation) {
				t.Fatalf("penalised %v (%v), want %v for ErrBadRequest", got, errs, hs[1].ID())
			}
			if s := srv.Stats(); s.Malformed != 1 || s.Bytes != 0 {
				t.Fatalf("stats %+v", s)
			}
		})
	}
}

// A request cut short is what a fetcher that dies mid-write leaves: the
// stream is reset, and nobody is penalised.
func TestServerResetsATruncatedRequestWithoutPenalty(t *testing.T) {
	b := BlobOf(make([]byte, 100))
	hs := hosts(t, 2)
	var pen penalties
	srv := NewServer(quiet)
	srv.Penalise = pen.add
	srv.Add(make([]byte, 100))
	serve(hs[0], srv)
	st := rawStream(t, hs[1], hs[0])
	st.Write(request{Sum: b.sum(), Size: 100, Length: 1}.append(nil)[:30])
	st.CloseWrite()
	if _, _, err := readReply(st, make([]byte, 1)); err == nil {
		t.Fatal("server replied to a truncated request")
	}
	// A penalty would come before the reset we saw.
	if got := pen.list(); len(got) != 0 {
		t.Fatalf("penalised %v for a request cut short", got)
	}
	if s := srv.Stats(); s.Malformed != 0 {
		t.Fatalf("stats %+v", s)
	}
}

func TestRequestRoundTripsThroughWire(t *testing.T) {
	b := BlobOf([]byte("abc"))
	in := request{Sum: b.sum(), Size: 3 << 20, Offset: 2 << 20, Length: ChunkBytes}
	out, err := readRequest(bytes.NewReader(in.append(nil)))
	if err != nil || out != in {
		t.Fatalf("got %+v, %v; want %+v", out, err, in)
	}
	if _, err := readRequest(bytes.NewReader(nil)); err != io.EOF {
		t.Fatalf("empty input gave %v, want io.EOF", err)
	}
}

func TestUseLocalAcceptsMatchingFileAndNamesBothHashesOtherwise(t *testing.T) {
	dir := t.TempDir()
	data := randomBytes(t, 10000)
	b := BlobOf(data)
	good := filepath.Join(dir, "good")
	os.WriteFile(good, data, 0o600)
	got, err := UseLocal(good, b)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("matching file: %v", err)
	}

	sameSize := slices.Clone(data)
	sameSize[0] ^= 0xff
	longer := append(slices.Clone(data), 'x')
	for name, other := range map[string][]byte{"same size": sameSize, "longer": longer} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(name, " ", "-"))
			os.WriteFile(path, other, 0o600)
			_, err := UseLocal(path, b)
			if !errors.Is(err, ErrHashMismatch) {
				t.Fatalf("got %v, want ErrHashMismatch", err)
			}
			if msg := err.Error(); !strings.Contains(msg, b.Hash) || !strings.Contains(msg, BlobOf(other).Hash) {
				t.Fatalf("error %q does not name both %s and %s", msg, b.Hash, BlobOf(other).Hash)
			}
		})
	}
	if _, err := UseLocal(filepath.Join(dir, "missing"), b); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing file gave %v", err)
	}
}

func TestBlobValidateRefusesBadHashesAndSizes(t *testing.T) {
	good := BlobOf([]byte("x"))
	if err := good.Validate(); err != nil {
		t.Fatalf("BlobOf gave an invalid blob: %v", err)
	}
	if err := (Blob{Hash: good.Hash, Size: MaxBlobBytes}).Validate(); err != nil {
		t.Fatalf("size MaxBlobBytes refused: %v", err)
	}
	bad := map[string]Blob{
		"empty hash":     {Size: 1},
		"short hash":     {Hash: good.Hash[:63], Size: 1},
		"long hash":      {Hash: good.Hash + "0", Size: 1},
		"uppercase hash": {Hash: strings.ToUpper(good.Hash), Size: 1},
		"non-hex hash":   {Hash: "g" + good.Hash[1:], Size: 1},
		"negative size":  {Hash: good.Hash, Size: -1},
		"huge size":      {Hash: good.Hash, Size: MaxBlobBytes + 1},
	}
	for name, b := range bad {
		if err := b.Validate(); !errors.Is(err, ErrBadBlob) {
			t.Errorf("%s: got %v, want ErrBadBlob", name, err)
		}
	}
}

func TestFetcherValidateNamesMissingFields(t *testing.T) {
	hs := hosts(t, 1)
	for field, f := range map[string]*Fetcher{
		"Host":     {CacheDir: "x"},
		"CacheDir": {Host: hs[0]},
		"Parallel": {Host: hs[0], CacheDir: "x", Parallel: -1},
		"MinRate":  {Host: hs[0], CacheDir: "x", MinRate: -1},
	} {
		if err := f.Validate(); !errors.Is(err, ErrBadFetcher) || !strings.Contains(err.Error(), field) {
			t.Errorf("%s: got %v", field, err)
		}
	}
}

// fakeStream is an in-memory deadlineRW for fuzzing the server.
type fakeStream struct {
	io.Reader
	out int
}

func (s *fakeStream) Write(p []byte) (int, error)      { s.out += len(p); return len(p), nil }
func (s *fakeStream) SetReadDeadline(time.Time) error  { return nil }
func (s *fakeStream) SetWriteDeadline(time.Time) error { return nil }

func FuzzServeRequest(f *testing.F) {
	data := []byte("0123456789abcdefghijklmnopqrstuvwxyz")
	b := BlobOf(data)
	f.Add(request{Sum: b.sum(), Size: uint64(b.Size), Offset: 3, Length: 10}.append(nil))
	f.Add(append(request{Sum: b.sum(), Size: uint64(b.Size), Length: 36}.append(nil), request{Sum: b.sum(), Size: 5, Length: 1}.append(nil)...))
	f.Add(request{Size: 10, Length: 1}.append(nil))
	f.Add(request{Sum: b.sum(), Size: MaxBlobBytes, Offset: MaxBlobBytes - 1, Length: 1}.append(nil))
	f.Add(request{Sum: b.sum(), Size: 1 << 62, Length: ^uint32(0)}.append(nil))
	f.Add([]byte{})
	f.Add([]byte{1, 2, 3})
	srv := NewServer(quiet)
	srv.Add(data)
	f.Fuzz(func(t *testing.T, in []byte) {
		rw := &fakeStream{Reader: bytes.NewReader(in)}
		err := srv.serve(rw, nil)
		if err != nil && !errors.Is(err, ErrBadRequest) && !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("error %v is neither ErrBadRequest nor a truncation", err)
		}
		// At most one reply per whole request, each a header and the bytes
		// of the one blob or a short reason.
		if max := (len(in) / requestLen) * (replyHeaderLen + max(len(data), maxReasonBytes)); rw.out > max {
			t.Fatalf("wrote %d bytes for %d input bytes", rw.out, len(in))
		}
	})
}

func FuzzReadReply(f *testing.F) {
	f.Add(append(replyHeader(statusOK, 4), "abcd"...))
	f.Add(append(replyHeader(statusUnknown, 3), "why"...))
	f.Add(replyHeader(statusWrongSize, 1<<31))
	f.Add([]byte{7, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		dst := make([]byte, 4)
		status, reason, err := readReply(bytes.NewReader(in), dst)
		if err != nil {
			return
		}
		if status != statusOK && status != statusUnknown && status != statusWrongSize || len(reason) > maxReasonBytes {
			t.Fatalf("accepted status %d with %d-byte reason", status, len(reason))
		}
	})
}

// A fetch counts each request and reply once on the fetcher's meter and once on the
// server's, with their bytes on the wire.
func TestMetersCountRequestsAndRepliesOnBothSides(t *testing.T) {
	hs := hosts(t, 2)
	srv := NewServer(quiet)
	srv.Meter = &traffic.Meter{}
	serve(hs[0], srv)
	data := randomBytes(t, 3<<20)
	b := srv.Add(data)
	f := newFetcher(t, hs[1], nil)
	f.Meter = &traffic.Meter{}
	if _, err := f.Fetch(t.Context(), []peer.ID{hs[0].ID()}, b, nil); err != nil {
		t.Fatal(err)
	}
	n := uint64(srv.Stats().Requests)
	want := traffic.Counts{FramesOut: n, BytesOut: n * requestLen, FramesIn: n, BytesIn: n*replyHeaderLen + uint64(b.Size)}
	if got := f.Meter.Counts(); got != want {
		t.Errorf("fetcher counted %+v, want %+v", got, want)
	}
	mirror := traffic.Counts{FramesIn: want.FramesOut, BytesIn: want.BytesOut, FramesOut: want.FramesIn, BytesOut: want.BytesIn}
	// The server counts a reply once its write returns, which may be after the
	// fetcher has read it.
	deadline := time.Now().Add(10 * time.Second)
	for srv.Meter.Counts() != mirror {
		if time.Now().After(deadline) {
			t.Fatalf("server counted %+v, want %+v", srv.Meter.Counts(), mirror)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
