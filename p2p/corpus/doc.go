// Package corpus moves a run's training corpus from the launcher to the
// nodes over libp2p. The corpus is split (elsewhere) into blobs, one
// training shard per replica pipeline and one validation split, each named
// by the lowercase hex sha256 of its bytes and its size (Blob). The plan the
// launcher signs lists the blobs each node needs; a node fetches only those,
// verifies them and caches them on disk.
//
//	const Proto protocol.ID = "/pipeswarm/data/1"
//	type Blob struct { Hash string `json:"sha256"`; Size int64 `json:"size"` }
//	func BlobOf(b []byte) Blob
//	func (b Blob) Validate() error
//
//	func NewServer(log *slog.Logger) *Server
//	func (s *Server) Add(data []byte) Blob
//	func (s *Server) HandleStream(st network.Stream)
//	func (s *Server) Stats() ServerStats
//
//	type Fetcher struct { Host; CacheDir; Log; Penalise; Parallel; MinRate }
//	func (f *Fetcher) Validate() error
//	func (f *Fetcher) Fetch(ctx, from []peer.ID, b Blob, progress func(done, total int64)) ([]byte, error)
//	func UseLocal(path string, b Blob) ([]byte, error)
//
// The launcher adds each blob to a Server and registers it:
//
//	srv := corpus.NewServer(log)
//	srv.Penalise = func(p peer.ID, err error) { h.Penalties().Add(p, err.Error()) } // err wraps p2p.ErrViolation
//	b := srv.Add(shard)
//	h.Handle(corpus.Proto, srv.HandleStream)
//
// A node fetches what the plan lists, from the peers that serve it:
//
//	f := &corpus.Fetcher{Host: h, CacheDir: filepath.Join(dir, "corpus"), Log: log}
//	data, err := f.Fetch(ctx, []peer.ID{launcher}, b, nil)
//
// or, pointed at its own copy, uses it if it matches: corpus.UseLocal(path, b).
//
// # Cache
//
// CacheDir/<sha256> holds a verified blob; CacheDir/<sha256>.part a download
// in progress, always a prefix of what the peers sent, which the next Fetch
// of the blob resumes. A blob is verified whole (sha256 and size) before it
// is renamed into place (the file and then the directory are fsynced), and
// again whenever it is read from the cache. The .part names do not start
// with "." so datadir.CleanTemp keeps them.
//
// # Wire format
//
// A fetcher opens a Proto stream and sends fixed-size binary requests, one
// after another, each answered before the next is sent (see wire.go):
// request = sha256 (32 raw bytes), size (u64), offset (u64), length (u32),
// big-endian, with 1 <= length <= ChunkBytes and offset+length <= size <=
// MaxBlobBytes; reply = status (u8) and length (u32), then with status OK
// exactly the bytes asked for, otherwise a short reason ("unknown blob
// <sha256>", or the blob's real size). Every bound is checked before
// anything is allocated. A malformed request resets the stream and the
// server's Penalise is called; a malformed reply (unknown status, a length
// other than asked) makes the fetcher drop and penalise that peer. A server
// that sends wrong bytes is caught by the sha256 check of the whole blob.
//
// Deadlines on both sides are the time the bytes of one request take at a
// minimum rate (DefaultMinRate, or Fetcher.MinRate) plus a fixed allowance;
// a cancelled ctx resets the fetcher's streams at once.
package corpus
