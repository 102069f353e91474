package datadir

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// holdEnv, when set, makes the test binary a child that opens the data directory it names,
// prints "locked", and holds the lock until its stdin closes or it is killed.
const holdEnv = "PIPESWARM_DATADIR_TEST_HOLD"

func TestMain(m *testing.M) {
	if dir := os.Getenv(holdEnv); dir != "" {
		os.Exit(hold(dir))
	}
	os.Exit(m.Run())
}

func hold(dir string) int {
	d, err := Open(dir)
	if err != nil {
		fmt.Println("error:", err)
		return 2
	}
	fmt.Println("locked")
	io.Copy(io.Discard, os.Stdin) // until the parent goes away
	d.Close()
	return 0
}

// startHolder runs this test binary as a child process that holds dir's lock, and returns
// once it does.
func startHolder(t *testing.T, dir string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), holdEnv+"="+dir)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if line != "locked\n" {
		t.Fatalf("child: %q, %v", line, err)
	}
	return cmd
}

func TestLockHeldByAnotherProcessRefusesOpenUntilItDies(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "node")
	child := startHolder(t, dir)

	_, err := Open(dir)
	want := fmt.Sprintf("data directory %s is in use by another pipeswarm node (pid %d)", dir, child.Process.Pid)
	if !errors.Is(err, ErrLocked) || err.Error() != want {
		t.Fatalf("Open while the child holds the lock: %v\nwant %q", err, want)
	}

	// The child dies without closing anything: the kernel drops its lock.
	if err := child.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	child.Wait()
	d, err := Open(dir)
	if err != nil {
		t.Fatalf("Open after the holder died: %v", err)
	}
	defer d.Close()
	if pid := readPID(filepath.Join(dir, "lock")); pid != os.Getpid() {
		t.Errorf("lock file names pid %d, want ours %d", pid, os.Getpid())
	}
}

func TestLockIsReleasedByClose(t *testing.T) {
	dir := t.TempDir()
	d, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	// flock locks belong to the open file, so a second Open in the same process conflicts too.
	if _, err := Open(dir); !errors.Is(err, ErrLocked) ||
		!strings.HasSuffix(err.Error(), "(pid "+strconv.Itoa(os.Getpid())+")") {
		t.Fatalf("second Open: %v, want ErrLocked naming our pid", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "lock")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lock file after Close: %v, want it removed", err)
	}
	if err := d.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	d2, err := Open(dir)
	if err != nil {
		t.Fatalf("Open after Close: %v", err)
	}
	d2.Close()
}

func TestOpenCreatesPrivateDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "b")
	d, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		t.Errorf("mode %v, want no access for group or others", fi.Mode().Perm())
	}
	if !filepath.IsAbs(d.Path) {
		t.Errorf("Path %q is not absolute", d.Path)
	}
}

func TestOpenRelativePathGivesAbsolutePaths(t *testing.T) {
	t.Chdir(t.TempDir())
	d, err := Open("node-data")
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	wd, _ := os.Getwd()
	want := filepath.Join(wd, "node-data")
	for got, w := range map[string]string{
		d.Path:           want,
		d.KeyPath():      filepath.Join(want, "identity.key"),
		d.AddrsPath():    filepath.Join(want, "addrs"),
		d.RunDir("0a1b"): filepath.Join(want, "runs", "0a1b"),
	} {
		if got != w {
			t.Errorf("got %q, want %q", got, w)
		}
	}
}

func TestRunDirRefusesIDsThatLeaveTheDirectory(t *testing.T) {
	d := &Dir{Path: "/x"}
	for _, id := range []string{"", ".", "..", "../y", "a/b"} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("RunDir(%q) did not panic", id)
				}
			}()
			d.RunDir(id)
		}()
	}
}

func TestWriteAddrsReplacesTheListAtomically(t *testing.T) {
	d, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for _, addrs := range [][]string{
		{"/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/udp/4001/quic-v1"},
		{"/ip4/10.0.0.2/tcp/5000"},
		{},
	} {
		if err := d.WriteAddrs(addrs); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(d.AddrsPath())
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Fields(string(b)); !slices.Equal(got, addrs) {
			t.Errorf("addrs file %q, want %q", b, addrs)
		}
	}
	if names := entries(t, d.Path); !slices.Equal(names, []string{"addrs", "lock"}) {
		t.Errorf("directory holds %v, want only addrs and lock: no temp file left", names)
	}
	if err := d.WriteAddrs([]string{"/ip4/1.2.3.4/tcp/1\n/ip4/5.6.7.8/tcp/1"}); err == nil {
		t.Errorf("an address with a newline was written")
	}
}

func TestCleanTempRemovesDotFilesLeftByACrash(t *testing.T) {
	d, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	run := d.RunDir("0a1b")
	for _, name := range []string{
		filepath.Join(d.Path, ".addrs.tmp-123"),
		filepath.Join(run, ".step-100.safetensors.tmp-9"),
		filepath.Join(run, ".partial", "a"),
		filepath.Join(run, ".partial", "b"),
		filepath.Join(d.Path, "identity.key"),
		filepath.Join(run, "step-100.safetensors"),
	} {
		if err := os.MkdirAll(filepath.Dir(name), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(name, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	n, err := d.CleanTemp()
	if err != nil || n != 3 {
		t.Errorf("CleanTemp = %d, %v; want 3 (two files, one directory)", n, err)
	}
	if names := entries(t, d.Path); !slices.Equal(names, []string{"identity.key", "lock", "runs"}) {
		t.Errorf("data directory holds %v", names)
	}
	if names := entries(t, run); !slices.Equal(names, []string{"step-100.safetensors"}) {
		t.Errorf("run directory holds %v", names)
	}
	if n, err := d.CleanTemp(); n != 0 || err != nil {
		t.Errorf("second CleanTemp = %d, %v; want nothing left to do", n, err)
	}
}

func entries(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

func TestStatusAddrIsWrittenAtomicallyAndRemoved(t *testing.T) {
	d, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for _, a := range []string{"127.0.0.1:41234", "[::1]:9090"} {
		if err := d.WriteStatusAddr(a); err != nil {
			t.Fatal(err)
		}
		if b, err := os.ReadFile(d.StatusAddrPath()); err != nil || string(b) != a+"\n" {
			t.Errorf("status_addr holds %q (%v), want %q", b, err, a+"\n")
		}
	}
	if names := entries(t, d.Path); !slices.Equal(names, []string{"lock", "status_addr"}) {
		t.Errorf("directory holds %v, want only lock and status_addr: no temp file left", names)
	}
	if err := d.WriteStatusAddr("a:1\nb:2"); err == nil {
		t.Error("an address spanning lines was written")
	}
	if err := d.RemoveStatusAddr(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(d.StatusAddrPath()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("status_addr still there after RemoveStatusAddr: %v", err)
	}
	if err := d.RemoveStatusAddr(); err != nil {
		t.Errorf("removing a missing status_addr: %v", err)
	}
}
