package corpus

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/p2p/traffic"
)

// DefaultParallel is how many peers a Fetcher with Parallel 0 fetches from
// at once.
const DefaultParallel = 3

// ErrBadFetcher is wrapped by Fetcher.Validate errors.
var ErrBadFetcher = errors.New("corpus: bad fetcher")

// Fetcher fetches blobs from peers that serve them and caches them in
// CacheDir, one file per blob named by its sha256. Its fields are read-only
// once Fetch has been called; Fetch may run concurrently for different
// blobs (the same blob twice at once is refused: see Fetch).
type Fetcher struct {
	Host     host.Host            // required: the host streams are opened from
	CacheDir string               // required: created (0700) if missing
	Log      *slog.Logger         // nil = slog.Default()
	Penalise func(peer.ID, error) // optional: called for a peer that sent a malformed reply or bytes that fail the hash, with an error wrapping p2p.ErrViolation
	Parallel int                  // most peers fetched from at once; 0 = DefaultParallel
	MinRate  int64                // slowest transfer waited for, bytes/s, sets stream deadlines; 0 = DefaultMinRate
	Meter    *traffic.Meter       // optional: counts requests sent and replies received
}

// Validate reports the first bad field, wrapping ErrBadFetcher.
func (f *Fetcher) Validate() error {
	switch {
	case f.Host == nil:
		return fmt.Errorf("%w: Host: missing", ErrBadFetcher)
	case f.CacheDir == "":
		return fmt.Errorf("%w: CacheDir: missing", ErrBadFetcher)
	case f.Parallel < 0:
		return fmt.Errorf("%w: Parallel: %d is negative", ErrBadFetcher, f.Parallel)
	case f.MinRate < 0:
		return fmt.Errorf("%w: MinRate: %d is negative", ErrBadFetcher, f.MinRate)
	}
	return nil
}

func (f *Fetcher) parallel() int {
	if f.Parallel == 0 {
		return DefaultParallel
	}
	return f.Parallel
}

func (f *Fetcher) minRate() int64 {
	if f.MinRate == 0 {
		return DefaultMinRate
	}
	return f.MinRate
}

func (f *Fetcher) log() *slog.Logger {
	l := f.Log
	if l == nil {
		l = slog.Default()
	}
	return l.With("subsystem", "corpus")
}

func (f *Fetcher) penalise(log *slog.Logger, p peer.ID, err error) {
	log.Warn("penalising peer", "peer", p, "err", err)
	if f.Penalise != nil {
		f.Penalise(p, err)
	}
}

// Fetch returns the bytes of b.
//
// If CacheDir/<hash> holds them (same size and sha256) they are read from
// there and no stream is opened. A cached file that does not match is
// removed and the blob fetched again; with no peer to fetch from, the error
// wraps ErrHashMismatch.
//
// Otherwise the blob is downloaded from the peers in from, ChunkBytes at a
// time, into CacheDir/<hash>.part. Peers are taken in order; up to Parallel
// of them serve chunks at once, and when one fails (cannot be reached, does
// not have the blob, breaks the protocol) its chunks go to the others and
// the next unused peer in from takes its place. The .part file always holds
// a prefix of the blob as downloaded (chunks arriving out of order wait in
// memory), so a Fetch that is cancelled or fails keeps what it got, and a
// later Fetch continues from there. When all bytes are in, their sha256 is
// checked and the .part file is synced and renamed to CacheDir/<hash>, and
// the directory synced.
//
// If the sha256 does not match, the .part file is discarded. When a single
// peer served every byte that peer is penalised; when bytes came from several
// peers (or from an earlier Fetch) the blob is fetched again from one peer
// at a time, in order, penalising each whose bytes do not match, until one
// does. If none does, the error wraps ErrHashMismatch and no .part is left.
//
// progress, if not nil, is called on Fetch's goroutine with the bytes
// received so far (resumed bytes included) and b.Size: once at the start and
// after every chunk. It starts again from 0 when a download that failed the
// hash is repeated from another peer.
//
// Fetch holds the whole blob in memory (it returns it), so it allocates
// b.Size bytes up front; b comes from a signed plan and is at most
// MaxBlobBytes.
//
// Cancelling ctx resets the open streams; Fetch returns promptly with an
// error wrapping ctx.Err() and keeps the .part file for a later Fetch.
// Stream deadlines allow each request the time its bytes take at MinRate,
// plus a fixed allowance for round trips.
//
// Only one Fetch of a blob may run at a time per CacheDir: a second one,
// in this process or another, fails at once (the .part file is flock'ed).
// Errors name the blob's hash; they wrap ErrUnknownBlob when the peers
// tried do not have it.
func (f *Fetcher) Fetch(ctx context.Context, from []peer.ID, b Blob, progress func(done, total int64)) ([]byte, error) {
	if err := b.Validate(); err != nil {
		return nil, fmt.Errorf("corpus: fetch: %w", err)
	}
	if err := f.Validate(); err != nil {
		return nil, fmt.Errorf("corpus: fetch %s: %w", b.Hash, err)
	}
	if progress == nil {
		progress = func(int64, int64) {}
	}
	data, err := f.fetch(ctx, from, b, progress)
	if err != nil {
		return nil, fmt.Errorf("corpus: fetch %s: %w", b.Hash, err)
	}
	return data, nil
}

func (f *Fetcher) fetch(ctx context.Context, from []peer.ID, b Blob, progress func(int64, int64)) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	log := f.log().With("blob", b.Hash)
	if err := os.MkdirAll(f.CacheDir, 0o700); err != nil {
		return nil, err
	}
	final := filepath.Join(f.CacheDir, b.Hash)
	data, err := readVerified(ctx, final, b, false)
	var stale error
	switch {
	case err == nil:
		log.Debug("read from cache", "size", b.Size)
		os.Remove(final + ".part") // left by a crash between rename and cleanup; harmless if absent
		progress(b.Size, b.Size)
		return data, nil
	case errors.Is(err, fs.ErrNotExist):
	case errors.Is(err, ErrHashMismatch):
		log.Warn("cached copy does not match; removing it", "err", err)
		if rmErr := os.Remove(final); rmErr != nil {
			return nil, errors.Join(err, rmErr)
		}
		stale = fmt.Errorf("cached copy: %w", err)
	default:
		return nil, err
	}
	data, err = f.download(ctx, log, from, b, final, progress)
	if err != nil && stale != nil {
		err = fmt.Errorf("%w; then: %w", stale, err)
	}
	return data, err
}

// download fetches b into final by way of final.part; see Fetch.
func (f *Fetcher) download(ctx context.Context, log *slog.Logger, from []peer.ID, b Blob, final string, progress func(int64, int64)) (data []byte, err error) {
	peers := f.candidates(from)
	partName := final + ".part"
	part, err := os.OpenFile(partName, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := flock(part); err != nil {
		part.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("another fetch of this blob is using %s", partName)
		}
		return nil, fmt.Errorf("lock %s: %w", partName, err)
	}
	discard := false // part holds bytes that failed the hash
	defer func() {
		if err != nil && (discard || isEmpty(part)) {
			os.Remove(partName) // while still locked, so no other fetch is using it
		}
		part.Close()
	}()

	buf := make([]byte, b.Size)
	prefix, err := loadPrefix(part, buf)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", partName, err)
	}
	if prefix > 0 {
		log.Info("resuming download", "have", prefix, "size", b.Size)
	}
	sources, err := f.round(ctx, log, part, b, buf, prefix, peers, progress)
	if errors.Is(err, ErrHashMismatch) {
		// Someone lied or the resumed bytes were bad. Start again from
		// nothing, one peer at a time, so whoever lies is known.
		errs := []error{err}
		if len(sources) == 1 && prefix == 0 {
			f.penalise(log, sources[0], fmt.Errorf("%w: %w", errWrongBytes, err))
			peers = slices.DeleteFunc(peers, func(p peer.ID) bool { return p == sources[0] })
		} else {
			log.Warn("downloaded bytes do not match; fetching again one peer at a time", "sources", len(sources), "resumed", prefix)
		}
		for _, p := range peers {
			if tErr := part.Truncate(0); tErr != nil {
				discard = true
				return nil, errors.Join(append(errs, tErr)...)
			}
			_, err = f.round(ctx, log, part, b, buf, 0, []peer.ID{p}, progress)
			if err == nil {
				break
			}
			errs = append(errs, err)
			if errors.Is(err, ErrHashMismatch) {
				f.penalise(log, p, fmt.Errorf("%w: %w", errWrongBytes, err))
			} else if ctx.Err() != nil {
				return nil, errors.Join(errs...)
			}
		}
		if err != nil {
			discard = true
			return nil, errors.Join(errs...)
		}
	}
	if err != nil {
		return nil, err
	}
	if err := part.Sync(); err != nil {
		return nil, fmt.Errorf("sync %s: %w", partName, err)
	}
	if err := os.Rename(partName, final); err != nil {
		return nil, err
	}
	if err := syncDir(f.CacheDir); err != nil {
		return nil, err
	}
	log.Info("fetched", "size", b.Size, "resumed", prefix)
	return buf, nil
}

// candidates is from without duplicates or this host, in order.
func (f *Fetcher) candidates(from []peer.ID) []peer.ID {
	var out []peer.ID
	for _, p := range from {
		if p != f.Host.ID() && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}

// isEmpty reports whether f is known to hold no bytes.
func isEmpty(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Size() == 0
}

// loadPrefix reads what part holds into the start of buf and returns its
// length. A part file longer than the blob cannot be a prefix of it and is
// emptied.
func loadPrefix(part *os.File, buf []byte) (int64, error) {
	st, err := part.Stat()
	if err != nil {
		return 0, err
	}
	n := st.Size()
	if n > int64(len(buf)) {
		return 0, part.Truncate(0)
	}
	if _, err := io.ReadFull(io.NewSectionReader(part, 0, n), buf[:n]); err != nil {
		return 0, err
	}
	return n, nil
}

// result is what a worker tells round: a chunk it has read into the buffer
// (chunk >= 0), or that it has stopped (chunk < 0) because the queue was
// empty (err nil) or it failed.
type result struct {
	peer  peer.ID
	chunk int
	err   error
}

// round downloads buf[prefix:] from peers, workers reading chunks straight
// into buf; it alone writes part, appending the contiguous prefix as it
// grows, and hashes it. It returns the peers that served chunks, and nil if
// the whole blob arrived and matches b.
func (f *Fetcher) round(ctx context.Context, log *slog.Logger, part *os.File, b Blob, buf []byte, prefix int64, peers []peer.ID, progress func(int64, int64)) (sources []peer.ID, err error) {
	h := sha256.New()
	h.Write(buf[:prefix])
	span := func(i int) (off, end int64) {
		off = prefix + int64(i)*ChunkBytes
		return off, min(off+ChunkBytes, b.Size)
	}
	nChunks := int((b.Size - prefix + ChunkBytes - 1) / ChunkBytes)
	jobs := make(chan int, nChunks) // never blocks: a worker requeues only a chunk it took
	for i := range nChunks {
		jobs <- i
	}
	results := make(chan result)
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()

	have, received := prefix, prefix // bytes in part; bytes in buf
	done := make([]bool, nChunks)
	next := 0 // first chunk not yet in part
	live := 0
	spare := slices.Clone(peers)
	var errs []error
	var fatal error
	start := func() {
		for live < f.parallel() && len(spare) > 0 && len(jobs) > 0 && fatal == nil && rctx.Err() == nil {
			p := spare[0]
			spare = spare[1:]
			live++
			go func() {
				err := f.work(rctx, p, b, buf, jobs, results, span)
				results <- result{peer: p, chunk: -1, err: err}
			}()
		}
	}
	progress(received, b.Size)
	start()
	for live > 0 {
		r := <-results
		if r.chunk >= 0 {
			if !slices.Contains(sources, r.peer) {
				sources = append(sources, r.peer)
			}
			done[r.chunk] = true
			off, end := span(r.chunk)
			received += end - off
			for fatal == nil && next < nChunks && done[next] {
				off, end := span(next)
				if _, err := part.WriteAt(buf[off:end], off); err != nil {
					fatal = fmt.Errorf("write %s: %w", part.Name(), err)
					cancel()
					break
				}
				h.Write(buf[off:end])
				have = end
				next++
			}
			progress(received, b.Size)
			continue
		}
		live--
		switch {
		case r.err == nil: // found no work; may be needed again if a chunk is requeued
			spare = append(spare, r.peer)
		case rctx.Err() != nil: // stopped by cancel, not the peer's fault
		default:
			log.Debug("peer failed; its chunks go to others", "peer", r.peer, "err", r.err)
			errs = append(errs, r.err)
			if errors.Is(r.err, ErrBadReply) {
				f.penalise(log, r.peer, r.err)
			}
		}
		start()
	}
	switch {
	case fatal != nil:
		return sources, fatal
	case ctx.Err() != nil:
		return sources, ctx.Err()
	case next < nChunks && len(peers) == 0:
		return sources, fmt.Errorf("%d of %d bytes missing and no peers to fetch them from", b.Size-have, b.Size)
	case next < nChunks:
		return sources, fmt.Errorf("%d of %d bytes missing; no peer of %d could serve them: %w", b.Size-have, b.Size, len(peers), errors.Join(errs...))
	}
	if sum := h.Sum(nil); [sha256.Size]byte(sum) != b.sum() {
		return sources, fmt.Errorf("%w: downloaded bytes have sha256 %x", ErrHashMismatch, sum)
	}
	return sources, nil
}

// work fetches chunks from p, one request at a time on one stream, until
// the queue is empty (nil) or something fails; a chunk it could not fetch
// goes back on the queue.
func (f *Fetcher) work(ctx context.Context, p peer.ID, b Blob, buf []byte, jobs chan int, results chan<- result, span func(int) (int64, int64)) error {
	var i int
	select {
	case i = <-jobs:
	default:
		return nil // nothing to do; do not dial
	}
	octx, cancel := context.WithTimeout(ctx, transferTimeout(0, f.minRate()))
	// A launcher reached only through a relay still serves its text.
	st, err := f.Host.NewStream(network.WithAllowLimitedConn(octx, "corpus"), p, Proto)
	cancel()
	if err != nil {
		jobs <- i
		return fmt.Errorf("peer %s: open stream: %w", p, err)
	}
	stop := context.AfterFunc(ctx, func() { st.Reset() })
	defer stop()
	sum := b.sum()
	for {
		off, end := span(i)
		q := request{Sum: sum, Size: uint64(b.Size), Offset: uint64(off), Length: uint32(end - off)}
		if err := f.ask(st, q, buf[off:end]); err != nil {
			jobs <- i
			st.Reset()
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("peer %s: bytes [%d, %d): %w", p, off, end, err)
		}
		results <- result{peer: p, chunk: i}
		select {
		case i = <-jobs:
		default:
			st.Close()
			return nil
		}
	}
}

// ask sends q on st and reads the reply into dst, within a deadline set by
// the bytes involved and MinRate.
func (f *Fetcher) ask(st network.Stream, q request, dst []byte) error {
	st.SetDeadline(time.Now().Add(transferTimeout(requestLen+replyHeaderLen+int64(len(dst)), f.minRate())))
	if _, err := st.Write(q.append(make([]byte, 0, requestLen))); err != nil {
		return fmt.Errorf("write request: %w", err)
	}
	f.Meter.Out(requestLen)
	cr := &traffic.CountingReader{R: st}
	status, reason, err := readReply(cr, dst)
	if err == nil {
		f.Meter.In(cr.N)
	}
	switch {
	case err != nil:
		return err
	case status == statusUnknown:
		return fmt.Errorf("%w: peer says %q", ErrUnknownBlob, reason)
	case status == statusWrongSize:
		return fmt.Errorf("%w: peer says %q", ErrWrongSize, reason)
	}
	return nil
}

func flock(f *os.File) error {
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if !errors.Is(err, syscall.EINTR) {
			return err
		}
	}
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
