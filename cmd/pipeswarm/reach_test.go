package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"testing"
	"time"
)

// TestNodeWithOnlyPrivateAddressesPrintsTheReachabilityLineWithAFix starts a
// node listening on loopback only: it can know at once that nobody outside
// can dial it, and must say so, with the fix, well within a minute.
func TestNodeWithOnlyPrivateAddressesPrintsTheReachabilityLineWithAFix(t *testing.T) {
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "node", "--data-dir", filepath.Join(dir, "n"), "--open",
		"--listen", "/ip4/127.0.0.1/tcp/0", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1")
	cmd.Env = append(os.Environ(), "PIPESWARM_AS_CLI=1")
	stdout, stderr := &syncBuffer{}, &syncBuffer{}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			<-exited
		}
	})
	// Listening on random ports, the fix is to listen on fixed ones and forward those;
	// on fixed ports, to forward the ports it listens on.
	line := regexp.MustCompile(`(?m)^reachability: not reachable: no public address; fix: (?:listen on fixed ports \(--listen /ip4/0.0.0.0/tcp/4001 --listen /ip4/0.0.0.0/udp/4001/quic-v1; the ports now are random and change at every start\), forward TCP and UDP port (\d+)|forward TCP port (\d+) and UDP port \d+) on your router to this machine and pass --announce /ip4/PUBLIC_IP/tcp/(\d+), or name a relay.*$`)
	const within = 60 * time.Second
	for {
		if m := line.FindStringSubmatch(stdout.String()); m != nil {
			if m[1]+m[2] != m[3] {
				t.Errorf("the fix forwards port %s but announces %s", m[1]+m[2], m[3])
			}
			t.Logf("%v after start: %s", time.Since(start).Round(time.Millisecond), m[0])
			return
		}
		if time.Since(start) > within {
			t.Fatalf("no reachability line with a fix within %v; stdout:\n%s\nstderr:\n%s", within, stdout, stderr)
		}
		select {
		case err := <-exited:
			t.Fatalf("node exited (%v); stderr:\n%s", err, stderr)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
