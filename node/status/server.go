package status

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

//go:embed page.html
var page []byte

// Options configures a Server.
type Options struct {
	Addr     string          // host:port to listen on; port 0 picks a free one
	Unix     string          // or the path of a unix socket to listen on (Addr empty)
	Snapshot func() Snapshot // required: called for every request; must be safe for concurrent calls
	Log      *slog.Logger    // nil: slog.Default()
}

// Validate reports what is wrong with o.
func (o Options) Validate() error {
	switch {
	case o.Unix != "" && o.Addr != "":
		return errors.New("status: Options.Addr and Options.Unix both set; one server listens on one")
	case o.Unix != "":
	default:
		if _, _, err := net.SplitHostPort(o.Addr); err != nil {
			return fmt.Errorf("status: Options.Addr %q: want host:port: %w", o.Addr, err)
		}
	}
	if o.Snapshot == nil {
		return errors.New("status: Options.Snapshot is nil")
	}
	return nil
}

// Server serves a node's status page, /api/status and /metrics over HTTP.
type Server struct {
	ln   net.Listener
	srv  *http.Server
	log  *slog.Logger
	done chan struct{}
	err  error
	unix string // the socket's path, removed on Close; "" for TCP
}

// Listen binds o.Addr and starts serving; Close stops it.
func Listen(o Options) (*Server, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	var ln net.Listener
	var err error
	if o.Unix != "" {
		err = viaDir(o.Unix, func(p string) error {
			ul, err := net.Listen("unix", p)
			if err == nil {
				// Close removes the socket by its real path: p may be a /proc name
				// that is gone by then.
				ul.(*net.UnixListener).SetUnlinkOnClose(false)
				ln = ul
			}
			return err
		})
	} else {
		ln, err = net.Listen("tcp", o.Addr)
	}
	if err != nil {
		return nil, fmt.Errorf("status: listen: %w", err)
	}
	reg := prometheus.NewRegistry()
	if err := reg.Register(newCollector(o.Snapshot)); err != nil {
		ln.Close()
		return nil, fmt.Errorf("status: %w", err)
	}
	s := &Server{ln: ln, log: o.Log, done: make(chan struct{}), unix: o.Unix}
	s.srv = &http.Server{Handler: Handler(o.Snapshot, reg), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			s.err = err
		}
	}()
	if o.Unix == "" {
		s.log.Info("status page up", "url", "http://"+s.Addr()+"/")
	}
	return s, nil
}

// maxUnixPath is the longest path a unix socket can be bound to or dialled on Linux
// (sun_path holds 108 bytes with the terminating NUL).
const maxUnixPath = 107

// viaDir calls f with path, or, if path is too long for a socket address, with a
// short name of it through an open descriptor of its directory (/proc/self/fd/N/NAME),
// so that a data directory deep in a tree still has its socket.
func viaDir(path string, f func(string) error) error {
	if len(path) <= maxUnixPath {
		return f(path)
	}
	dir, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer dir.Close()
	return f(fmt.Sprintf("/proc/self/fd/%d/%s", dir.Fd(), filepath.Base(path)))
}

// Addr is the address the server listens on, with the port it was given (or the
// socket's path).
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Close stops the server, waiting a few seconds for requests in flight.
func (s *Server) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	err := s.srv.Shutdown(ctx)
	if s.unix != "" {
		if rerr := os.Remove(s.unix); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			err = errors.Join(err, rerr)
		}
	}
	if err != nil {
		err = errors.Join(err, s.srv.Close())
	}
	<-s.done
	return errors.Join(err, s.err)
}

// Handler serves the page at /, the snapshot as JSON at /api/status and reg's
// metrics at /metrics.
func Handler(snapshot func() Snapshot, reg *prometheus.Registry) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		// Everything the page needs is in it: nothing to fetch from elsewhere, on
		// purpose (a node at home may have no route to a CDN it should trust).
		w.Header().Set("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:")
		w.Write(page)
	})
	mux.HandleFunc("GET /api/status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		enc := json.NewEncoder(w)
		enc.SetIndent("", " ")
		enc.Encode(snapshot())
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	return mux
}
