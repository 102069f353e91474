// Package datadir is the data directory of a `pipeswarm node` daemon: its identity key, the
// addresses it listens on, one directory per run it takes part in, and the lock that keeps
// two nodes from sharing it.
//
//	<dir>/lock            held (flock) while a node runs; holds its pid
//	<dir>/identity.key    the node's libp2p private key
//	<dir>/addrs           the multiaddrs the node listens on, one a line
//	<dir>/status_addr     host:port of its status page, while it serves one
//	<dir>/status.sock     its status (as /api/status) on a unix socket, while it runs
//	<dir>/runs/<run ID>/  checkpoints and logs of one run
//
// Files are replaced by writing a temporary file whose name starts with "." and renaming it
// over the old one, so a crash leaves either the old file or the new, plus perhaps a
// temporary file that CleanTemp removes at the next start.
package datadir

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ErrLocked is wrapped by the error Open returns when another process holds the directory.
var ErrLocked = errors.New("data directory locked")

// Dir is an open, locked data directory. Close it to let another node use it.
type Dir struct {
	Path string // absolute

	lock *os.File // nil once closed
}

// Open creates the directory at path (mode 0700) if it does not exist and locks it for this
// process. If another process holds the lock, the error wraps ErrLocked and names that
// process's pid. The lock is an flock on path/lock, so the kernel releases it when the
// process dies however it dies; a lock file left behind by a killed node does not block the
// next.
func Open(path string) (*Dir, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("open data directory: %w", err)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return nil, fmt.Errorf("open data directory: %w", err)
	}
	d := &Dir{Path: abs}
	f, err := d.lockFile()
	if err != nil {
		return nil, err
	}
	d.lock = f
	return d, nil
}

// lockFile opens and locks Path/lock and writes our pid into it.
func (d *Dir) lockFile() (*os.File, error) {
	name := filepath.Join(d.Path, "lock")
	// A node that closes removes the lock file while it still holds the lock. If we opened
	// the file just before that, we lock a file no longer in the directory, and a third
	// process could lock a new one beside us; so after locking, check that the file is still
	// the one the name points to, and try again if not.
	for range 10 {
		f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return nil, fmt.Errorf("open data directory: %w", err)
		}
		if err := flock(f); err != nil {
			f.Close()
			if errors.Is(err, syscall.EWOULDBLOCK) {
				return nil, &lockedError{dir: d.Path, pid: readPID(name)}
			}
			return nil, fmt.Errorf("lock data directory %s: %w", d.Path, err)
		}
		if !sameFile(f, name) {
			f.Close()
			continue
		}
		pid := []byte(strconv.Itoa(os.Getpid()) + "\n")
		if err := f.Truncate(0); err != nil {
			f.Close()
			return nil, fmt.Errorf("lock data directory %s: %w", d.Path, err)
		}
		if _, err := f.WriteAt(pid, 0); err != nil {
			f.Close()
			return nil, fmt.Errorf("lock data directory %s: %w", d.Path, err)
		}
		return f, nil
	}
	return nil, fmt.Errorf("lock data directory %s: lock file keeps being replaced", d.Path)
}

func flock(f *os.File) error {
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if !errors.Is(err, syscall.EINTR) {
			return err
		}
	}
}

// sameFile reports whether the open file f is the file now at name.
func sameFile(f *os.File, name string) bool {
	open, err := f.Stat()
	if err != nil {
		return false
	}
	now, err := os.Stat(name)
	return err == nil && os.SameFile(open, now)
}

// readPID returns the pid written in the lock file, or 0 if there is none yet.
func readPID(name string) int {
	b, err := os.ReadFile(name)
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0
	}
	return pid
}

// lockedError says which process holds a data directory.
type lockedError struct {
	dir string
	pid int // 0 if unknown
}

func (e *lockedError) Error() string {
	pid := "pid unknown"
	if e.pid > 0 {
		pid = "pid " + strconv.Itoa(e.pid)
	}
	return fmt.Sprintf("data directory %s is in use by another pipeswarm node (%s)", e.dir, pid)
}

func (e *lockedError) Unwrap() error { return ErrLocked }

// Close removes the lock file and releases the lock. Closing twice is a no-op.
func (d *Dir) Close() error {
	if d.lock == nil {
		return nil
	}
	f := d.lock
	d.lock = nil
	// Remove before unlocking, so that whoever locks next creates a fresh file.
	rmErr := os.Remove(filepath.Join(d.Path, "lock"))
	if errors.Is(rmErr, fs.ErrNotExist) {
		rmErr = nil
	}
	closeErr := f.Close() // releases the flock
	if err := errors.Join(rmErr, closeErr); err != nil {
		return fmt.Errorf("close data directory %s: %w", d.Path, err)
	}
	return nil
}

// KeyPath is where the node's identity key lives.
func (d *Dir) KeyPath() string { return filepath.Join(d.Path, "identity.key") }

// AddrsPath is where WriteAddrs records the addresses the node listens on.
func (d *Dir) AddrsPath() string { return filepath.Join(d.Path, "addrs") }

// StatusAddrPath is where WriteStatusAddr records the status server's address.
func (d *Dir) StatusAddrPath() string { return filepath.Join(d.Path, "status_addr") }

// StatusSockPath is the unix socket a running node serves its status on, so that
// `pipeswarm status --data-dir DIR` finds it with no port configured.
func (d *Dir) StatusSockPath() string { return filepath.Join(d.Path, "status.sock") }

// WriteStatusAddr replaces StatusAddrPath with addr (host:port) and a newline,
// atomically.
func (d *Dir) WriteStatusAddr(addr string) error {
	if addr == "" || strings.ContainsAny(addr, "\r\n") {
		return fmt.Errorf("write status_addr: %q is not one address", addr)
	}
	if err := writeFileAtomic(d.StatusAddrPath(), []byte(addr+"\n")); err != nil {
		return fmt.Errorf("write status_addr: %w", err)
	}
	return nil
}

// RemoveStatusAddr removes StatusAddrPath, so that nobody dials a status server that
// has stopped. A missing file is not an error.
func (d *Dir) RemoveStatusAddr() error {
	if err := os.Remove(d.StatusAddrPath()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove status_addr: %w", err)
	}
	return nil
}

// RunDir is the directory of one run's checkpoints and logs. It is not created here; the
// caller creates it when it first writes there. runID must be a single path element.
func (d *Dir) RunDir(runID string) string {
	if runID == "" || runID == "." || runID == ".." || strings.ContainsAny(runID, `/\`) {
		panic(fmt.Sprintf("datadir: run ID %q is not a single path element", runID))
	}
	return filepath.Join(d.Path, "runs", runID)
}

// ListenPath holds the listen addresses a node chose on its first start (ports picked
// by the system), so that it listens on the same ports after a restart.
func (d *Dir) ListenPath() string { return filepath.Join(d.Path, "listen") }

// ReadListen returns the listen addresses kept in ListenPath, none if there are none.
func (d *Dir) ReadListen() []string {
	b, err := os.ReadFile(d.ListenPath())
	if err != nil {
		return nil
	}
	return strings.Fields(string(b))
}

// WriteListen keeps addrs in ListenPath, one a line.
func (d *Dir) WriteListen(addrs []string) error {
	if err := writeFileAtomic(d.ListenPath(), []byte(strings.Join(addrs, "\n")+"\n")); err != nil {
		return fmt.Errorf("write listen: %w", err)
	}
	return nil
}

// WriteAddrs replaces AddrsPath with addrs, one a line, atomically: a reader sees the old
// list or the new, never part of one.
func (d *Dir) WriteAddrs(addrs []string) error {
	var b strings.Builder
	for _, a := range addrs {
		if strings.ContainsAny(a, "\r\n") {
			return fmt.Errorf("write addrs: %q spans lines", a)
		}
		b.WriteString(a + "\n")
	}
	if err := writeFileAtomic(d.AddrsPath(), []byte(b.String())); err != nil {
		return fmt.Errorf("write addrs: %w", err)
	}
	return nil
}

// writeFileAtomic writes data to a temporary file beside name and renames it over name.
func writeFileAtomic(name string, data []byte) error {
	dir := filepath.Dir(name)
	f, err := os.CreateTemp(dir, "."+filepath.Base(name)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, name)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	// Make the rename itself durable.
	if dh, err := os.Open(dir); err == nil {
		err = dh.Sync()
		dh.Close()
		return err
	}
	return nil
}

// CleanTemp removes what a crash may have left under Path: every file or directory whose
// name starts with "." (a directory's contents go with it). It returns how many it removed.
// Call it after Open and before anything in this process starts writing.
func (d *Dir) CleanTemp() (int, error) {
	n := 0
	err := filepath.WalkDir(d.Path, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == d.Path || !strings.HasPrefix(e.Name(), ".") {
			return nil
		}
		if err := os.RemoveAll(p); err != nil {
			return err
		}
		n++
		if e.IsDir() {
			return filepath.SkipDir
		}
		return nil
	})
	if err != nil {
		return n, fmt.Errorf("clean temporary files in %s: %w", d.Path, err)
	}
	return n, nil
}

// AcceptedPath holds the signed plans a node has accepted whose expiry has not
// passed, so that a restart does not make it accept one of them again.
func (d *Dir) AcceptedPath() string { return filepath.Join(d.Path, "accepted") }

// Accepted is one accepted plan: its run, its rejoin nonce (0 for the first), its
// expiry.
type Accepted struct {
	Run     uint64    `json:"run"`
	Nonce   uint64    `json:"nonce,omitempty"`
	Expires time.Time `json:"expires"`
}

// ReadAccepted returns the plans kept in AcceptedPath that expire after now; none if
// the file is absent. A file that does not parse is an error naming it.
func (d *Dir) ReadAccepted(now time.Time) ([]Accepted, error) {
	b, err := os.ReadFile(d.AcceptedPath())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read accepted plans: %w", err)
	}
	var all []Accepted
	if err := json.Unmarshal(b, &all); err != nil {
		return nil, fmt.Errorf("read accepted plans %s: %w (remove the file to start afresh)", d.AcceptedPath(), err)
	}
	return slices.DeleteFunc(all, func(a Accepted) bool { return !a.Expires.After(now) }), nil
}

// WriteAccepted replaces AcceptedPath with plans, atomically and durably.
func (d *Dir) WriteAccepted(plans []Accepted) error {
	b, err := json.Marshal(plans)
	if err != nil {
		return fmt.Errorf("write accepted plans: %w", err)
	}
	if err := writeFileAtomic(d.AcceptedPath(), b); err != nil {
		return fmt.Errorf("write accepted plans: %w", err)
	}
	return nil
}
