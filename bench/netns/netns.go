package netns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// Link is one node's access link to the hub.
type Link struct {
	Mbps    float64       // bandwidth each way on the node's access link
	Latency time.Duration // one-way latency a packet from this node incurs
	Loss    float64       // fraction of packets from this node dropped (0..1)
}

// DelayMode chooses what adds latency and loss.
type DelayMode int

const (
	DelayAuto  DelayMode = iota // netem if the kernel has it, else DelayTUN
	DelayNetem                  // tc netem; Build fails without it
	DelayTUN                    // a delay line in this process behind a TUN device
)

func (m DelayMode) String() string {
	switch m {
	case DelayAuto:
		return "auto"
	case DelayNetem:
		return "netem"
	case DelayTUN:
		return "tun"
	}
	return "DelayMode(" + strconv.Itoa(int(m)) + ")"
}

// Config describes the emulated network.
type Config struct {
	Nodes []Link // one per node namespace

	// Prefix starts the name of every namespace and interface Build makes, so
	// that Cleanup can find them; interface names are Prefix plus at most four
	// characters and must fit Linux's 15. Empty means "psw" and the process id.
	Prefix string

	Delay DelayMode // zero: netem if available, else the TUN delay line
	Seed  uint64    // seeds the TUN delay line's loss (netem's loss is not seeded)
	Log   *slog.Logger
}

// Errors Build returns for a machine that cannot run it.
var (
	ErrNotRoot = errors.New("netns: needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)")
	ErrNoTools = errors.New("netns: needs iproute2 (ip and tc) in PATH")
	ErrNoNetem = errors.New("netns: kernel has no netem qdisc")
)

var (
	errClosed   = errors.New("netns: closed")
	prefixRunes = regexp.MustCompile(`^[A-Za-z0-9_]+$`)
)

const (
	subnet   = "10.201.0.0/24"
	hubIP    = "10.201.0.1"
	maxNodes = 253 // addresses .2 to .254
	mtu      = 1500
	// rtTable routes what the delay line writes back out of the veth.
	rtTable = 7073
)

// Net is a built network. Its methods may be called from any goroutine; Close
// may run concurrently with them (from a signal handler) and makes them fail.
type Net struct {
	cfg    Config
	log    *slog.Logger
	ip, tc string
	delay  DelayMode // DelayNetem or DelayTUN, as Build found

	mu      sync.Mutex
	closed  bool
	closeEr error
	made    []string // namespaces made, in creation order
	lines   []*delayLine
}

// Build makes the network described by c. On error it removes what it made.
func Build(ctx context.Context, c Config) (*Net, error) {
	if err := c.validate(); err != nil {
		return nil, err
	}
	if os.Geteuid() != 0 {
		return nil, ErrNotRoot
	}
	ip, err1 := exec.LookPath("ip")
	tc, err2 := exec.LookPath("tc")
	if err1 != nil || err2 != nil {
		return nil, ErrNoTools
	}
	n := &Net{cfg: c, log: c.Log, ip: ip, tc: tc}
	if n.log == nil {
		n.log = slog.New(slog.DiscardHandler)
	}
	if err := n.build(ctx); err != nil {
		if cerr := n.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("netns: teardown after failed build: %w", cerr))
		}
		return nil, err
	}
	n.log.Info("netns built", "prefix", c.Prefix, "nodes", len(c.Nodes), "delay", n.delay)
	return n, nil
}

func (c *Config) validate() error {
	if c.Prefix == "" {
		c.Prefix = "psw" + strconv.Itoa(os.Getpid())
	}
	if len(c.Nodes) == 0 || len(c.Nodes) > maxNodes {
		return fmt.Errorf("netns: Config.Nodes: %d nodes, want 1 to %d", len(c.Nodes), maxNodes)
	}
	if !prefixRunes.MatchString(c.Prefix) {
		return fmt.Errorf("netns: Config.Prefix %q: want letters, digits and _", c.Prefix)
	}
	// Longest interface name: prefix + "h" + the largest node index.
	if l := len(c.Prefix) + 1 + len(strconv.Itoa(len(c.Nodes)-1)); l > 15 || len(c.Prefix)+2 > 15 {
		return fmt.Errorf("netns: Config.Prefix %q: interface names would be %d characters, Linux allows 15", c.Prefix, l)
	}
	for i, l := range c.Nodes {
		if !(l.Mbps > 0) || math.IsInf(l.Mbps, 0) {
			return fmt.Errorf("netns: Config.Nodes[%d].Mbps = %v, want > 0", i, l.Mbps)
		}
		if l.Latency < 0 || l.Latency > time.Minute {
			return fmt.Errorf("netns: Config.Nodes[%d].Latency = %v, want 0 to 1m", i, l.Latency)
		}
		if !(l.Loss >= 0 && l.Loss < 1) {
			return fmt.Errorf("netns: Config.Nodes[%d].Loss = %v, want 0 <= loss < 1", i, l.Loss)
		}
	}
	if c.Delay < DelayAuto || c.Delay > DelayTUN {
		return fmt.Errorf("netns: Config.Delay = %v", c.Delay)
	}
	return nil
}

// Names. Namespaces end in "-hub" or "-n<i>" after the prefix so that
// Cleanup("psw1") does not match "psw12-hub".
func (n *Net) nsName(i int) string {
	if i < 0 {
		return n.cfg.Prefix + "-hub"
	}
	return n.cfg.Prefix + "-n" + strconv.Itoa(i)
}
func (n *Net) bridge() string        { return n.cfg.Prefix + "br" }
func (n *Net) nodeVeth(i int) string { return n.cfg.Prefix + "n" + strconv.Itoa(i) }
func (n *Net) hubVeth(i int) string  { return n.cfg.Prefix + "h" + strconv.Itoa(i) }
func (n *Net) tunName(i int) string  { return n.cfg.Prefix + "t" + strconv.Itoa(i) }

// Addr is node i's IPv4 address; -1 is the hub's.
func (n *Net) Addr(i int) string {
	n.checkIndex(i)
	if i < 0 {
		return hubIP
	}
	return "10.201.0." + strconv.Itoa(i+2)
}

// HubAddr is the hub namespace's address, reachable from every node without
// shaping on the hub's side: the place for a launcher or rendezvous process.
func (n *Net) HubAddr() string { return hubIP }

// Prefix is the prefix of everything Build made, Config.Prefix or its
// default: what Cleanup takes.
func (n *Net) Prefix() string { return n.cfg.Prefix }

// Delay says what adds latency and loss: DelayNetem or DelayTUN.
func (n *Net) Delay() DelayMode { return n.delay }

// Namespace is the name of node i's network namespace (-1: the hub's), as
// `ip netns` knows it.
func (n *Net) Namespace(i int) string {
	n.checkIndex(i)
	return n.nsName(i)
}

func (n *Net) checkIndex(i int) {
	if i < -1 || i >= len(n.cfg.Nodes) {
		panic(fmt.Sprintf("netns: node %d out of range [-1, %d)", i, len(n.cfg.Nodes)))
	}
}

func (n *Net) build(ctx context.Context) error {
	hub := n.nsName(-1)
	if err := n.addNamespace(ctx, hub); err != nil {
		return err
	}
	br := n.bridge()
	if err := n.run(ctx, n.ip, "-n", hub, "link", "add", br, "type", "bridge"); err != nil {
		return err
	}
	if err := n.run(ctx, n.ip, "-n", hub, "addr", "add", hubIP+"/24", "dev", br); err != nil {
		return err
	}
	if err := n.run(ctx, n.ip, "-n", hub, "link", "set", br, "up"); err != nil {
		return err
	}
	n.delay = n.cfg.Delay
	if n.delay != DelayTUN {
		switch netem := n.probeNetem(ctx, hub, br); {
		case netem:
			n.delay = DelayNetem
		case n.delay == DelayNetem:
			return ErrNoNetem
		default:
			n.delay = DelayTUN
		}
	}
	for i := range n.cfg.Nodes {
		if err := n.buildNode(ctx, i); err != nil {
			return fmt.Errorf("netns: node %d: %w", i, err)
		}
	}
	return nil
}

// probeNetem reports whether a netem qdisc can be added (and removes it).
func (n *Net) probeNetem(ctx context.Context, ns, dev string) bool {
	if err := n.run(ctx, n.tc, "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "delay", "1ms"); err != nil {
		n.log.Debug("netem probe failed, using the TUN delay line", "err", err)
		return false
	}
	if err := n.run(ctx, n.tc, "-n", ns, "qdisc", "del", "dev", dev, "root"); err != nil {
		n.log.Warn("removing netem probe", "err", err)
	}
	return true
}

func (n *Net) addNamespace(ctx context.Context, ns string) error {
	if _, err := os.Stat(nsPath(ns)); err == nil {
		return fmt.Errorf("netns: namespace %s exists (a leftover? netns.Cleanup(%q) removes it)", ns, n.cfg.Prefix)
	}
	// Recorded first: a cancelled `ip netns add` may still have made it.
	n.mu.Lock()
	n.made = append(n.made, ns)
	n.mu.Unlock()
	if err := n.run(ctx, n.ip, "netns", "add", ns); err != nil {
		return err
	}
	if err := n.run(ctx, n.ip, "-n", ns, "link", "set", "lo", "up"); err != nil {
		return err
	}
	// Before any interface exists, so that they inherit the defaults: no IPv6
	// chatter; no reverse-path filter, as replies come in by the veth while
	// the route back is the TUN; and TCP buffers for long fat links (the
	// kernel default caps a flow's window at 4-6 MB), with no metrics cached
	// across connections so that each measurement starts alike.
	return inNetns(ns, func() error {
		return writeSysctls(map[string]string{
			"net/ipv6/conf/all/disable_ipv6":     "1",
			"net/ipv6/conf/default/disable_ipv6": "1",
			"net/ipv4/conf/all/rp_filter":        "0",
			"net/ipv4/conf/default/rp_filter":    "0",
			"net/ipv4/tcp_rmem":                  "4096 131072 33554432",
			"net/ipv4/tcp_wmem":                  "4096 16384 33554432",
			"net/ipv4/tcp_no_metrics_save":       "1",
		})
	})
}

func (n *Net) buildNode(ctx context.Context, i int) error {
	hub, ns := n.nsName(-1), n.nsName(i)
	if err := n.addNamespace(ctx, ns); err != nil {
		return err
	}
	veth, hveth := n.nodeVeth(i), n.hubVeth(i)
	addr := n.Addr(i)
	steps := [][]string{
		{n.ip, "link", "add", veth, "netns", ns, "mtu", strconv.Itoa(mtu), "type", "veth", "peer", "name", hveth, "netns", hub, "mtu", strconv.Itoa(mtu)},
		{n.ip, "-n", hub, "link", "set", hveth, "master", n.bridge(), "up"},
		// noprefixroute: the route to the subnet is added below, by the TUN
		// or by the veth.
		{n.ip, "-n", ns, "addr", "add", addr + "/24", "dev", veth, "noprefixroute"},
		{n.ip, "-n", ns, "link", "set", veth, "up"},
	}
	for _, s := range steps {
		if err := n.run(ctx, s[0], s[1:]...); err != nil {
			return err
		}
	}
	// The same shaping each way: download on the hub's end, upload on the
	// node's.
	tbf := tbfArgs(n.cfg.Nodes[i].Mbps, n.rttBound(i))
	if err := n.run(ctx, n.tc, append([]string{"-n", hub, "qdisc", "add", "dev", hveth, "root", "handle", "1:"}, tbf...)...); err != nil {
		return err
	}
	if n.delay == DelayNetem {
		return n.netemNode(ctx, i, tbf)
	}
	if err := n.run(ctx, n.tc, append([]string{"-n", ns, "qdisc", "add", "dev", veth, "root", "handle", "1:"}, tbf...)...); err != nil {
		return err
	}
	return n.tunNode(ctx, i)
}

// rttBound is the longest round trip node i can have to another node.
func (n *Net) rttBound(i int) time.Duration {
	var most time.Duration
	for j, l := range n.cfg.Nodes {
		if j != i || len(n.cfg.Nodes) == 1 {
			most = max(most, l.Latency)
		}
	}
	return n.cfg.Nodes[i].Latency + most
}

// tbfArgs shapes to mbps with a bucket of rate/250 s (at least a few full
// frames) and a queue of one bandwidth-delay product for rtt (at least a
// bucket and 100 frames, so a short link still absorbs bursts).
func tbfArgs(mbps float64, rtt time.Duration) []string {
	bytesPerSec := mbps * 1e6 / 8
	burst := max(int64(bytesPerSec/250), 4*(mtu+14))
	limit := max(int64(bytesPerSec*rtt.Seconds()), burst, 100*(mtu+14))
	return []string{"tbf",
		"rate", strconv.FormatInt(int64(mbps*1e6), 10) + "bit",
		"burst", strconv.FormatInt(burst, 10),
		"limit", strconv.FormatInt(limit, 10)}
}

func (n *Net) netemNode(ctx context.Context, i int, tbf []string) error {
	ns, veth, link := n.nsName(i), n.nodeVeth(i), n.cfg.Nodes[i]
	netem := []string{"-n", ns, "qdisc", "add", "dev", veth, "root", "handle", "1:", "netem",
		"delay", strconv.FormatInt(link.Latency.Microseconds(), 10) + "us",
		"limit", "1000000"}
	if link.Loss > 0 {
		netem = append(netem, "loss", "random", strconv.FormatFloat(link.Loss*100, 'f', -1, 64)+"%")
	}
	steps := [][]string{
		append([]string{n.tc}, netem...),
		append([]string{n.tc, "-n", ns, "qdisc", "add", "dev", veth, "parent", "1:1", "handle", "2:"}, tbf...),
		{n.ip, "-n", ns, "route", "add", subnet, "dev", veth, "src", n.Addr(i)},
	}
	for _, s := range steps {
		if err := n.run(ctx, s[0], s[1:]...); err != nil {
			return err
		}
	}
	return nil
}

func (n *Net) tunNode(ctx context.Context, i int) error {
	ns, veth, tun, addr := n.nsName(i), n.nodeVeth(i), n.tunName(i), n.Addr(i)
	link := n.cfg.Nodes[i]
	rng := rand.New(rand.NewPCG(n.cfg.Seed, uint64(i)))
	d, err := openDelayLine(ns, tun, link.Latency, link.Loss, rng, n.log.With("node", i))
	if err != nil {
		return err
	}
	n.mu.Lock()
	n.lines = append(n.lines, d)
	n.mu.Unlock()
	table := strconv.Itoa(rtTable)
	steps := [][]string{
		{n.ip, "-n", ns, "link", "set", tun, "mtu", strconv.Itoa(mtu), "txqueuelen", "1000", "up"},
		// What the node sends goes into the TUN...
		{n.ip, "-n", ns, "route", "add", subnet, "dev", tun, "src", addr},
		// ...and what the delay line writes back comes out of it and is
		// forwarded out of the veth.
		{n.ip, "-n", ns, "route", "add", subnet, "dev", veth, "src", addr, "table", table},
		{n.ip, "-n", ns, "rule", "add", "iif", tun, "table", table, "pref", "100"},
	}
	for _, s := range steps {
		if err := n.run(ctx, s[0], s[1:]...); err != nil {
			return err
		}
	}
	// Forwarding, for packets that come back from the line; accept_local,
	// as they come from this namespace's own address; no reverse-path
	// filter on the interfaces, which have their own setting beside "all".
	return inNetns(ns, func() error {
		return writeSysctls(map[string]string{
			"net/ipv4/ip_forward":                    "1",
			"net/ipv4/conf/" + tun + "/accept_local": "1",
			"net/ipv4/conf/" + veth + "/rp_filter":   "0",
			"net/ipv4/conf/" + tun + "/rp_filter":    "0",
		})
	})
}

// run runs a command, its output going into the error.
func (n *Net) run(ctx context.Context, name string, args ...string) error {
	return runLogged(ctx, n.log, name, args...)
}

// runLogged runs a command, its output going into the error.
func runLogged(ctx context.Context, log *slog.Logger, name string, args ...string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("netns: %w", err)
	}
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	log.Debug("run", "cmd", name, "args", args, "err", err)
	if err != nil {
		return fmt.Errorf("netns: %s %v: %w: %s", name, args, err, trimOutput(out))
	}
	return nil
}

// nsCommand is a command that runs name in namespace ns, in its own process group,
// killed with the group when ctx ends and when the harness dies.
func nsCommand(ctx context.Context, ip, ns, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, ip, append([]string{"netns", "exec", ns, name}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	return cmd
}

// killNamespaces kills every process in the namespaces made.
func killNamespaces(ctx context.Context, ip string, made []string) []error {
	var errs []error
	for _, ns := range made {
		if err := killAll(ctx, ip, ns); err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

// deleteNamespaces deletes the namespaces made, the last made first (nodes before the
// hub, so that its bridge never sees a dangling port); those already gone are skipped.
func deleteNamespaces(ctx context.Context, log *slog.Logger, ip string, made []string) []error {
	var errs []error
	for k := len(made) - 1; k >= 0; k-- {
		if _, err := os.Stat(nsPath(made[k])); errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err := runLogged(ctx, log, ip, "netns", "del", made[k]); err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

func trimOutput(b []byte) string {
	const most = 400
	if len(b) > most {
		b = b[:most]
	}
	return string(b)
}

// Command returns a command that runs name in node i's namespace (i = -1: the
// hub's). It runs in its own process group, so that a Ctrl-C at the terminal
// reaches the harness, which decides; ctx's cancellation and Close kill the
// group; and it gets SIGKILL if the harness dies. (The parent-death signal
// follows the OS thread that started it, which Go keeps alive unless a
// goroutine exits while locked to its thread.)
func (n *Net) Command(ctx context.Context, i int, name string, args ...string) *exec.Cmd {
	n.checkIndex(i)
	return nsCommand(ctx, n.ip, n.nsName(i), name, args...)
}

// Close kills every process in the namespaces, stops the delay lines and
// deletes the namespaces (and so every veth, TUN and qdisc). It is idempotent:
// later calls return the first call's error.
func (n *Net) Close() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return n.closeEr
	}
	n.closed = true
	// Build's context may be what was cancelled; teardown needs its own.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	errs := killNamespaces(ctx, n.ip, n.made)
	for _, d := range n.lines {
		d.close()
	}
	errs = append(errs, deleteNamespaces(ctx, n.log, n.ip, n.made)...)
	n.closeEr = errors.Join(errs...)
	n.log.Info("netns closed", "prefix", n.cfg.Prefix, "err", n.closeEr)
	return n.closeEr
}

// Cleanup removes what a harness with this prefix left behind when it could
// not Close (it was SIGKILLed): kills the processes in its namespaces and
// deletes them.
func Cleanup(prefix string) error {
	if !prefixRunes.MatchString(prefix) {
		return fmt.Errorf("netns: Cleanup: prefix %q: want letters, digits and _", prefix)
	}
	ip, err := exec.LookPath("ip")
	if err != nil {
		return ErrNoTools
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	names, err := listNamespaces(ctx, ip)
	if err != nil {
		return err
	}
	var errs []error
	for _, ns := range names {
		if !ownedBy(ns, prefix) {
			continue
		}
		if err := killAll(ctx, ip, ns); err != nil {
			errs = append(errs, err)
		}
		if out, err := exec.CommandContext(ctx, ip, "netns", "del", ns).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("netns: ip netns del %s: %w: %s", ns, err, trimOutput(out)))
		}
	}
	return errors.Join(errs...)
}

var ownName = regexp.MustCompile(`^-(hub|[npr][0-9]+)$`)

// ownedBy reports whether namespace ns is one Build or BuildNAT makes for prefix.
func ownedBy(ns, prefix string) bool {
	return len(ns) > len(prefix) && ns[:len(prefix)] == prefix && ownName.MatchString(ns[len(prefix):])
}
