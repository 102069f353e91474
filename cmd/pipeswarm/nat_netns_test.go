package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/bench/netns"
)

// natSpec is a 2-stage run small enough for a few seconds of CPU.
const natSpec = `name: nat
seed: 5
eval_interval: 10
model: {vocab: 256, d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 2, micro_batches: 2}
train: {batch_size: 4, steps: 30, lr: 0.003, warmup: 2}
data: {val_fraction: 0.01}
`

// natProc is a pipeswarm process in a namespace, its output kept.
type natProc struct {
	name           string
	cmd            *exec.Cmd
	stdout, stderr *syncBuffer
	exited         chan error
	started        time.Time
}

func startIn(t *testing.T, net *netns.NATNet, ns, name string, args ...string) *natProc {
	t.Helper()
	cmd := net.Command(t.Context(), ns, os.Args[0], args...)
	cmd.Env = append(os.Environ(), "PIPESWARM_AS_CLI=1")
	return startProc(t, name, cmd)
}

// startProc starts cmd, a process named name in the test's logs, keeping its output;
// it is killed when the test ends, and its output logged if the test failed.
func startProc(t *testing.T, name string, cmd *exec.Cmd) *natProc {
	t.Helper()
	p := &natProc{name: name, cmd: cmd, stdout: &syncBuffer{}, stderr: &syncBuffer{}, exited: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = p.stdout, p.stderr
	p.started = time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		if t.Failed() {
			t.Logf("%s stdout:\n%s\n%s stderr (tail):\n%s", name, p.stdout, name, tail(p.stderr.String(), 16000))
		}
	})
	return p
}

// waitOut polls p's stdout for a line matching re, until within has passed
// since p started; it returns the match and when it was first seen.
func (p *natProc) waitOut(t *testing.T, re *regexp.Regexp, within time.Duration) ([]string, time.Duration) {
	t.Helper()
	deadline := p.started.Add(within)
	for {
		if m := re.FindStringSubmatch(p.stdout.String()); m != nil {
			return m, time.Since(p.started)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s printed no line matching %q within %v", p.name, re, within)
		}
		select {
		case err := <-p.exited:
			t.Fatalf("%s exited (%v) before printing a line matching %q", p.name, err, re)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// TestNodesBehindNATsTrainThroughARelayAndHolePunching puts two nodes behind
// separate NATs (MASQUERADE routers), a relay node and the launcher on a public
// segment, and trains a 2-stage run across the NATs. Both NATed nodes must say
// they are not reachable, reserve a slot on the relay, and finish the run; their
// tensor streams must end on direct connections after hole punching, or, if the
// NAT forbids it, run through the relay and say so.
func TestNodesBehindNATsTrainThroughARelayAndHolePunching(t *testing.T) {
	needNetns(t)
	if _, err := exec.LookPath("iptables"); err != nil {
		t.Skip("the NAT test needs iptables (apt-get install iptables); skipped")
	}
	// Linux MASQUERADE keeps the inside port where it can (the mapping does not
	// depend on the destination): hole punching must pass it. With
	// --random-fully every connection gets a new port, as behind a symmetric
	// NAT: the run must go through the relay and say so.
	t.Run("port-preserving NAT", func(t *testing.T) { natRun(t, false) })
	t.Run("symmetric NAT", func(t *testing.T) { natRun(t, true) })
}

func natRun(t *testing.T, randomPorts bool) {
	net, err := netns.BuildNAT(t.Context(), netns.NATConfig{Public: 2, Private: 2, RandomPorts: randomPorts})
	if err != nil {
		t.Fatal(err)
	}
	closeAtEnd(t, net)
	dir := t.TempDir()
	keyPath, launcherID, specPath := launcherKeyAndSpec(t, dir, natSpec)
	listen := []string{"--listen", "/ip4/0.0.0.0/tcp/4001", "--listen", "/ip4/0.0.0.0/udp/4001/quic-v1", "--threads", "1"}
	peerID := regexp.MustCompile(`(?m)^peer ID (\S+)$`)

	relay := startIn(t, net, net.PublicNamespace(0), "relay", append([]string{"node", "--data-dir", filepath.Join(dir, "relay"), "--relay", "--open"}, listen...)...)
	relayID, _ := relay.waitOut(t, peerID, 30*time.Second)
	relayAddr := fmt.Sprintf("/ip4/%s/udp/4001/quic-v1/p2p/%s", net.PublicAddr(0), relayID[1])

	var nated []*natProc
	for i := range 2 {
		nated = append(nated, startIn(t, net, net.PrivateNamespace(i), fmt.Sprintf("node%d", i),
			append([]string{"node", "--data-dir", filepath.Join(dir, fmt.Sprintf("node%d", i)), "--trust", launcherID, "--bootstrap", relayAddr}, listen...)...))
	}
	notReachable := regexp.MustCompile(`(?m)^reachability: not reachable: ([^;]+); .*fix: (.*)$`)
	onRelay := regexp.MustCompile(`(?m)^reachability: not reachable: [^;]+; reachable through a relay at (\S+p2p-circuit/p2p/\S+);`)
	var circuits []string
	for _, p := range nated {
		m, at := p.waitOut(t, notReachable, 60*time.Second)
		t.Logf("%s, %v after start: not reachable: %s; fix: %s", p.name, at.Round(time.Millisecond), m[1], m[2])
		r, at := p.waitOut(t, onRelay, 60*time.Second)
		if !strings.Contains(r[1], net.PublicAddr(0)) {
			t.Fatalf("%s reserved at %s, want the relay at %s", p.name, r[1], net.PublicAddr(0))
		}
		t.Logf("%s, %v after start: reserved on the relay: %s", p.name, at.Round(time.Millisecond), r[1])
		circuits = append(circuits, r[1])
	}
	for i, p := range nated {
		// Seen from the public segment, a NATed node is its router.
		if !strings.Contains(p.stderr.String(), net.RouterAddr(i)) {
			t.Errorf("%s never learned its public address %s from the peers that observed it", p.name, net.RouterAddr(i))
		}
	}

	// The launcher knows the NATed nodes only by their relayed addresses.
	out := filepath.Join(dir, "out")
	launchStart := time.Now()
	launcher := startIn(t, net, net.PublicNamespace(1), "launcher", "launch", specPath, "--key", keyPath, "--out", out, "--quiet",
		"--peer", circuits[0], "--peer", circuits[1])
	select {
	case err := <-launcher.exited:
		if err != nil {
			t.Fatalf("launch failed: %v", err)
		}
	case <-time.After(90 * time.Second):
		t.Fatal("the run did not finish in 90 s")
	}
	t.Logf("run finished in %v: %s", time.Since(launchStart).Round(time.Millisecond), strings.TrimSpace(firstLine(launcher.stdout.String())))

	// Each NATed node's tensor streams with the other: where they ended, and
	// how hole punching went.
	punched := regexp.MustCompile(`msg="hole punch: direct connection" .*peer=(\S+) took=(\S+) plain_dial=false`)
	for i, p := range nated {
		other := nated[1-i]
		otherID := peerID.FindStringSubmatch(other.stdout.String())[1]
		relayed, seen := lastPath(p.stderr.String(), otherID)
		if !seen {
			t.Errorf("%s logged no tensor stream path to %s", p.name, other.name)
			continue
		}
		var took []string
		for _, m := range punched.FindAllStringSubmatch(p.stderr.String(), -1) {
			if m[1] == otherID {
				took = append(took, m[2])
			}
		}
		switch {
		case relayed && !strings.Contains(p.stderr.String(), "through a relay: slow"):
			t.Errorf("%s ran through the relay without saying so", p.name)
		case relayed && !randomPorts:
			t.Errorf("%s: tensor streams to %s stayed on the relay behind a port-preserving NAT", p.name, other.name)
		case relayed:
			t.Logf("%s: tensor streams to %s ran through the relay, and the node said so (hole punching failed, as it must)", p.name, other.name)
		case len(took) == 0:
			t.Errorf("%s: tensor streams to %s are direct, but no hole punch made that connection", p.name, other.name)
		default:
			t.Logf("%s: tensor streams to %s ended on a direct connection; hole punch (DCUtR attempt) took %v", p.name, other.name, took)
		}
		if randomPorts && !relayed {
			t.Errorf("%s: a direct connection to %s through a NAT with random ports", p.name, other.name)
		}
		// The relay and the launcher saw the node's QUIC port behind two
		// different router ports.
		if m := regexp.MustCompile(`(?m)^reachability: not reachable: symmetric NAT.*$`).FindString(p.stdout.String()); m != "" {
			t.Logf("%s said: %s", p.name, m)
		} else if randomPorts {
			t.Errorf("%s never said it is behind a symmetric NAT", p.name)
		}
	}
	if os.Getenv("NAT_DEBUG") != "" {
		t.Fail()
	}
}

// lastPath reports whether the last tensor stream path logged towards peer was
// relayed, and whether any was logged.
func lastPath(log, peer string) (relayed, seen bool) {
	sc := bufio.NewScanner(strings.NewReader(log))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if strings.Contains(l, `msg="tensor stream path"`) && strings.Contains(l, "peer="+peer) {
			seen, relayed = true, strings.Contains(l, "relayed=true")
		}
	}
	return relayed, seen
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}
