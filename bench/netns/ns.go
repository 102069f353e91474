package netns

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// nsPath is where `ip netns add` pins a namespace.
func nsPath(ns string) string { return filepath.Join("/run/netns", ns) }

// inNetns runs fn on an OS thread that has entered namespace ns, then returns
// the thread to this process's namespace. Sockets and TUN devices fn creates
// stay in ns; sysctls fn writes under /proc/sys/net are ns's. If the thread
// cannot go back, its goroutine exits still locked, and the Go runtime then
// ends the thread rather than reuse it.
func inNetns(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		back, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netns: own namespace: %w", err)
			return
		}
		defer unix.Close(back)
		target, err := unix.Open(nsPath(ns), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netns: open namespace %s: %w", ns, err)
			return
		}
		err = unix.Setns(target, unix.CLONE_NEWNET)
		unix.Close(target)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netns: enter namespace %s: %w", ns, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(back, unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("netns: leave namespace %s: %w", ns, err))
			return // still locked: the thread dies with this goroutine
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// writeSysctls writes values under /proc/sys, in the calling thread's
// namespace.
func writeSysctls(kv map[string]string) error {
	for k, v := range kv {
		if err := os.WriteFile(filepath.Join("/proc/sys", k), []byte(v), 0); err != nil {
			return fmt.Errorf("netns: sysctl %s: %w", k, err)
		}
	}
	return nil
}

// killAll SIGKILLs every process in namespace ns until none is left. The
// kernel's list is the authority, so processes that were not started by
// Command, forked, or left their process group are found as well.
func killAll(ctx context.Context, ip, ns string) error {
	if _, err := os.Stat(nsPath(ns)); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	self := os.Getpid()
	for {
		out, err := exec.CommandContext(ctx, ip, "netns", "pids", ns).Output()
		if err != nil {
			return fmt.Errorf("netns: ip netns pids %s: %w", ns, err)
		}
		var pids []int
		for _, f := range strings.Fields(string(out)) {
			// This process shows up while one of its threads is inside ns
			// (inNetns on the main thread): never ours.
			if p, err := strconv.Atoi(f); err == nil && p != self {
				pids = append(pids, p)
			}
		}
		if len(pids) == 0 {
			return nil
		}
		for _, p := range pids {
			if err := syscall.Kill(p, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
				return fmt.Errorf("netns: kill %d in %s: %w", p, ns, err)
			}
		}
		// A killed process leaves the list once it is dead (a zombie has no
		// namespace), which is not instantaneous.
		select {
		case <-ctx.Done():
			return fmt.Errorf("netns: processes %v in %s survive SIGKILL: %w", pids, ns, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// listNamespaces lists the names `ip netns list` knows.
func listNamespaces(ctx context.Context, ip string) ([]string, error) {
	out, err := exec.CommandContext(ctx, ip, "netns", "list").Output()
	if err != nil {
		return nil, fmt.Errorf("netns: ip netns list: %w", err)
	}
	var names []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		// "name" or "name (id: 3)"
		if f := strings.Fields(sc.Text()); len(f) > 0 {
			names = append(names, f[0])
		}
	}
	return names, nil
}
