package netns

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The test binary doubles as the processes some tests run: with helperEnv set
// it runs that helper instead of the tests.
const (
	helperEnv       = "PSW_NETNS_HELPER"
	helperPrefixEnv = "PSW_NETNS_PREFIX"
)

func TestMain(m *testing.M) {
	if h := os.Getenv(helperEnv); h != "" {
		os.Exit(runHelper(h))
	}
	os.Exit(m.Run())
}

// needNetns skips a test on a machine that cannot build a Net.
func needNetns(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to make network namespaces (run as root, as CI does)")
	}
	for _, tool := range []string{"ip", "tc"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs iproute2: %s not in PATH", tool)
		}
	}
}

var prefixes int

// testPrefix is a prefix no other test or concurrent test binary uses.
func testPrefix() string {
	prefixes++
	return fmt.Sprintf("pst%d%c", os.Getpid()%1000000, 'a'+prefixes%26)
}

func build(t *testing.T, c Config) *Net {
	t.Helper()
	if c.Prefix == "" {
		c.Prefix = testPrefix()
	}
	n, err := Build(t.Context(), c)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return n
}

func profile(t *testing.T, name string) Link {
	t.Helper()
	l, err := Profile(name)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func within(got, want, frac float64) bool { return math.Abs(got-want) <= frac*want }

func TestHomeProfileGivesItsRTTAndBandwidthBothWays(t *testing.T) {
	needNetns(t)
	home := profile(t, "home")
	n := build(t, Config{Nodes: []Link{home, home}})
	r, err := n.Measure(t.Context(), 0, 1, 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("node 0 <-> node 1: %v", r)
	if want := 2 * home.Latency; !within(float64(r.RTT), float64(want), 0.1) {
		t.Errorf("RTT %v, want %v ± 10%%", r.RTT, want)
	}
	// tbf counts Ethernet frames, so TCP's goodput with a 1500-byte MTU is at
	// most 1448/1514 = 95.6% of the rate, and an 8 MiB transfer includes TCP's
	// ramp-up (89.8 of 100 seen once in CI).
	if !within(r.UpMbps, home.Mbps, 0.15) || !within(r.DownMbps, home.Mbps, 0.15) {
		t.Errorf("up %.1f, down %.1f Mbit/s, want %v ± 15%%", r.UpMbps, r.DownMbps, home.Mbps)
	}
}

func TestHubIsOneNodeLatencyAway(t *testing.T) {
	needNetns(t)
	home := profile(t, "home")
	n := build(t, Config{Nodes: []Link{home}})
	r, err := n.Measure(t.Context(), 0, -1, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !within(float64(r.RTT), float64(home.Latency), 0.1) {
		t.Errorf("node-hub RTT %v, want %v ± 10%%", r.RTT, home.Latency)
	}
}

func TestCommandRunsInTheNodesNamespace(t *testing.T) {
	needNetns(t)
	n := build(t, Config{Nodes: []Link{profile(t, "lan"), profile(t, "lan")}})
	for _, i := range []int{-1, 1} {
		out, err := n.Command(t.Context(), i, "ip", "-o", "-4", "addr", "show").Output()
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(out), " "+n.Addr(i)+"/24 ") {
			t.Errorf("Command(%d) sees addresses\n%s\nwant %s", i, out, n.Addr(i))
		}
	}
}

// startOrphan starts, in node i, a shell that leaves a sleep behind and then
// waits; it returns the shell and the sleep's pid.
func startOrphan(t *testing.T, n *Net, i int) (*exec.Cmd, int) {
	t.Helper()
	cmd := n.Command(t.Context(), i, "sh", "-c", "sleep 60 & echo $!; wait")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("reading the sleep's pid: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatalf("sleep pid %q: %v", line, err)
	}
	return cmd, pid
}

func TestCloseLeavesNothingEvenAfterANodeWasKilled(t *testing.T) {
	needNetns(t)
	lan := profile(t, "lan")
	prefix := testPrefix()
	n, err := Build(t.Context(), Config{Nodes: []Link{lan, lan}, Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	hub := n.Command(t.Context(), -1, "sleep", "60")
	if err := hub.Start(); err != nil {
		t.Fatal(err)
	}
	// A node killed with SIGKILL whose child lives on in the namespace.
	sh, orphan := startOrphan(t, n, 1)
	if err := sh.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	sh.Wait()
	if !alive(orphan) {
		t.Fatalf("the orphaned sleep %d died with its parent; the test needs it alive", orphan)
	}

	if err := n.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := n.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := hub.Wait(); err == nil {
		t.Error("the hub's sleep exited normally; Close should have killed it")
	}
	waitDead(t, orphan)
	assertNothingLeft(t, prefix)
	if _, err := n.Measure(t.Context(), 0, 1, 1<<10); err == nil {
		t.Error("Measure after Close succeeded")
	}
}

func alive(pid int) bool { return syscall.Kill(pid, 0) == nil && !zombie(pid) }

func zombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// pid (comm) S ...: the state follows the last ')'.
	s := string(b)
	k := strings.LastIndexByte(s, ')')
	return k >= 0 && k+2 < len(s) && s[k+2] == 'Z'
}

// waitDead waits for pid to end: a killed orphan is reaped by init, soon but
// not at once.
func waitDead(t *testing.T, pid int) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); alive(pid); {
		if time.Now().After(deadline) {
			t.Errorf("process %d is still alive", pid)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// assertNothingLeft checks that nothing named with prefix is left: no
// namespace, no interface in this namespace, no temporary file.
func assertNothingLeft(t *testing.T, prefix string) {
	t.Helper()
	ctx := t.Context()
	names, err := listNamespaces(ctx, "ip")
	if err != nil {
		t.Fatal(err)
	}
	for _, ns := range names {
		if strings.HasPrefix(ns, prefix) {
			t.Errorf("namespace %s is left", ns)
		}
	}
	out, err := exec.CommandContext(ctx, "ip", "-o", "link", "show").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) > 1 && strings.HasPrefix(f[1], prefix) {
			t.Errorf("link left in the root namespace: %s", l)
		}
	}
	if left, _ := filepath.Glob(filepath.Join(os.TempDir(), prefix+"*")); len(left) > 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

// helper starts the test binary as helper h with prefix and returns it and its
// stdout once it has printed "ready".
func helper(t *testing.T, h, prefix string) (*exec.Cmd, *bufio.Scanner) {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+h, helperPrefixEnv+"="+prefix)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait(); Cleanup(prefix) })
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if sc.Text() == "ready" {
			return cmd, sc
		}
	}
	t.Fatalf("helper %s ended before it was ready: %v", h, sc.Err())
	return nil, nil
}

func TestInterruptedHarnessClosesEverything(t *testing.T) {
	needNetns(t)
	prefix := testPrefix()
	cmd, out := helper(t, "interrupt", prefix)
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	var said []string
	for out.Scan() {
		said = append(said, out.Text())
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("helper: %v (said %q)", err, said)
	}
	if want := []string{"closed <nil>", "sleep: signal: killed"}; strings.Join(said, "\n") != strings.Join(want, "\n") {
		t.Errorf("helper said %q, want %q", said, want)
	}
	assertNothingLeft(t, prefix)
}

func TestCleanupRemovesWhatAKilledHarnessLeft(t *testing.T) {
	needNetns(t)
	prefix := testPrefix()
	cmd, _ := helper(t, "hang", prefix)
	cmd.Process.Kill()
	cmd.Wait()
	names, err := listNamespaces(t.Context(), "ip")
	if err != nil {
		t.Fatal(err)
	}
	var left int
	for _, ns := range names {
		if ownedBy(ns, prefix) {
			left++
		}
	}
	if left != 2 {
		t.Fatalf("a SIGKILLed harness left %d namespaces, want its 2 (the test relies on leftovers)", left)
	}
	if err := Cleanup(prefix); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	assertNothingLeft(t, prefix)
}

func runHelper(h string) int {
	if code := runTransferHelper(h); code >= 0 {
		return code
	}
	prefix := os.Getenv(helperPrefixEnv)
	lan, _ := Profile("lan")
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	n, err := Build(ctx, Config{Nodes: []Link{lan}, Prefix: prefix})
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	sleep := n.Command(context.Background(), 0, "sleep", "60")
	if err := sleep.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		n.Close()
		return 1
	}
	fmt.Println("ready")
	switch h {
	case "hang":
		select {}
	case "interrupt":
		<-ctx.Done()
		fmt.Println("closed", n.Close())
		fmt.Println("sleep:", sleep.Wait())
		return 0
	}
	fmt.Fprintln(os.Stderr, "helper: unknown", h)
	return 2
}

func TestLossDropsTheConfiguredFractionOfTheNodesPackets(t *testing.T) {
	needNetns(t)
	lossy := Link{Mbps: 100, Latency: time.Millisecond, Loss: 0.05}
	clean := Link{Mbps: 100, Latency: time.Millisecond}
	n := build(t, Config{Nodes: []Link{lossy, clean}, Seed: 7})
	// TCP across: the line cuts offloaded segments that lose a frame into
	// frames itself, and the receiver must take every frame it sends.
	r, err := n.Measure(t.Context(), 0, 1, 2<<20)
	if err != nil {
		t.Fatalf("TCP over the lossy link: %v", err)
	}
	t.Logf("TCP with 5%% loss one way: %v", r)
	for _, c := range [][2]string{{"Ip", "InHdrErrors"}, {"Ip", "InDiscards"}, {"Tcp", "InCsumErrors"}, {"Tcp", "InErrs"}} {
		for i := range 2 {
			if v, err := snmp(n.Namespace(i), c[0], c[1]); err != nil || v != 0 {
				t.Errorf("node %d: %s %s = %d, %v; want 0", i, c[0], c[1], v, err)
			}
		}
	}

	const sent = 4000
	for _, c := range []struct {
		from, to int
		want     float64
	}{{0, 1, 0.05}, {1, 0, 0}} {
		got, err := udpLoss(t.Context(), n, c.from, c.to, sent)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%d -> %d: %.2f%% of %d datagrams lost", c.from, c.to, 100*got, sent)
		// 3.5 standard deviations of a binomial count, and no loss at all
		// where none is configured.
		if tol := 3.5 * math.Sqrt(c.want*(1-c.want)/sent); math.Abs(got-c.want) > tol {
			t.Errorf("%d -> %d lost %.2f%%, want %.2f%% ± %.2f", c.from, c.to, 100*got, 100*c.want, 100*tol)
		}
	}
}

// udpLoss sends count datagrams from node i to node j and returns the
// fraction that did not arrive.
func udpLoss(ctx context.Context, n *Net, i, j, count int) (float64, error) {
	var rx, tx net.PacketConn
	if err := inNetns(n.Namespace(j), func() (err error) {
		rx, err = net.ListenPacket("udp4", net.JoinHostPort(n.Addr(j), "0"))
		return err
	}); err != nil {
		return 0, err
	}
	defer rx.Close()
	// Room for every datagram, so that only the link loses any: the delay
	// line delivers in bursts, and this process may be descheduled.
	if err := forceReadBuffer(rx, 16<<20); err != nil {
		return 0, err
	}
	if err := inNetns(n.Namespace(i), func() (err error) {
		tx, err = net.ListenPacket("udp4", net.JoinHostPort(n.Addr(i), "0"))
		return err
	}); err != nil {
		return 0, err
	}
	defer tx.Close()
	got := make(chan int)
	go func() {
		seen := 0
		buf := make([]byte, 64)
		for {
			if _, _, err := rx.ReadFrom(buf); err != nil {
				got <- seen
				return
			}
			seen++
		}
	}()
	msg := make([]byte, 32)
	for k := range count {
		if _, err := tx.WriteTo(msg, rx.LocalAddr()); err != nil {
			return 0, err
		}
		if k%100 == 99 { // stay far below every queue's limit
			time.Sleep(time.Millisecond)
		}
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
	}
	time.Sleep(100 * time.Millisecond) // ≫ the 1 ms latency
	rx.Close()
	return 1 - float64(<-got)/float64(count), nil
}

// snmp reads counter proto.name of /proc/net/snmp in namespace ns.
func snmp(ns, proto, name string) (int64, error) {
	var b []byte
	if err := inNetns(ns, func() (err error) {
		b, err = os.ReadFile("/proc/thread-self/net/snmp") // not /proc/net: that is the main thread's
		return err
	}); err != nil {
		return 0, err
	}
	var names []string
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) == 0 || f[0] != proto+":" {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		for k, v := range names {
			if v == name && k < len(f) {
				return strconv.ParseInt(f[k], 10, 64)
			}
		}
	}
	return 0, fmt.Errorf("no %s %s in /proc/net/snmp", proto, name)
}

func forceReadBuffer(c net.PacketConn, size int) error {
	raw, err := c.(*net.UDPConn).SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUFFORCE, size)
	}); err != nil {
		return err
	}
	return serr
}

func TestConfigIsChecked(t *testing.T) {
	ok := Link{Mbps: 10}
	for _, c := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no nodes", Config{}, "Config.Nodes"},
		{"zero bandwidth", Config{Nodes: []Link{{}}}, "Nodes[0].Mbps"},
		{"negative latency", Config{Nodes: []Link{ok, {Mbps: 1, Latency: -1}}}, "Nodes[1].Latency"},
		{"loss of one", Config{Nodes: []Link{{Mbps: 1, Loss: 1}}}, "Nodes[0].Loss"},
		{"long prefix", Config{Nodes: []Link{ok}, Prefix: "abcdefghijklmn"}, "Config.Prefix"},
		{"prefix with a dash", Config{Nodes: []Link{ok}, Prefix: "a-b"}, "Config.Prefix"},
		{"unknown delay mode", Config{Nodes: []Link{ok}, Delay: 9}, "Config.Delay"},
	} {
		_, err := Build(t.Context(), c.cfg)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: Build error %v, want one naming %s", c.name, err, c.want)
		}
	}
}

func TestCleanupOnlyTakesItsOwnPrefix(t *testing.T) {
	for _, c := range []struct {
		ns, prefix string
		want       bool
	}{
		{"psw1-hub", "psw1", true},
		{"psw1-n12", "psw1", true},
		{"psw12-hub", "psw1", false},
		{"psw1-n", "psw1", false},
		{"psw1-hubx", "psw1", false},
		{"psw1", "psw1", false},
		{"psnat1-r0", "psnat1", true}, // BuildNAT's routers and public hosts
		{"psnat1-p3", "psnat1", true},
		{"psnat12-r0", "psnat1", false},
		{"psnat1-x0", "psnat1", false},
	} {
		if got := ownedBy(c.ns, c.prefix); got != c.want {
			t.Errorf("ownedBy(%q, %q) = %v", c.ns, c.prefix, got)
		}
	}
	if err := Cleanup(""); err == nil {
		t.Error("Cleanup(\"\") would match every harness; it should refuse")
	}
}

func TestTBFQueueHoldsOneBandwidthDelayProduct(t *testing.T) {
	// 100 Mbit/s for 50 ms is 625000 bytes; the bucket is 1/250 s of it.
	got := strings.Join(tbfArgs(100, 50*time.Millisecond), " ")
	if want := "tbf rate 100000000bit burst 50000 limit 625000"; got != want {
		t.Errorf("tbfArgs = %q, want %q", got, want)
	}
}
