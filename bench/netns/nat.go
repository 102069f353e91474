package netns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"time"
)

// NATConfig describes a small internet: a public segment (a bridge) with
// hosts on it, and private hosts each on its own LAN behind its own NAT
// router (iptables MASQUERADE) whose outside is on the public segment.
//
//	private i -- veth -- router i (MASQUERADE) -- public bridge -- public hosts
type NATConfig struct {
	// Prefix starts every namespace and interface name; interface names are
	// Prefix plus at most five characters and must fit Linux's 15. Empty
	// means "psnat" and the process id.
	Prefix  string
	Public  int // hosts on the public segment
	Private int // hosts behind NATs, one router each
	// RandomPorts makes the routers pick a random source port for every
	// connection (MASQUERADE --random-fully): a NAT whose mapping depends on
	// the destination ("symmetric"), which hole punching cannot pass.
	RandomPorts bool
	Log         *slog.Logger
}

// ErrNoIptables is returned by BuildNAT on a machine without iptables.
var ErrNoIptables = errors.New("netns: NAT needs iptables in PATH")

// The public segment uses addresses outside every private and documentation
// range, since libp2p only hole punches, relays to and checks public
// addresses. The namespaces have no route out of this machine, so no real
// host with these addresses is ever reached.
const (
	natPublicNet = "11.201.0"
	natPublicLen = "/24"
)

// NATNet is a built NAT network.
type NATNet struct {
	cfg NATConfig
	log *slog.Logger
	ip  string
	ipt string

	mu      sync.Mutex
	closed  bool
	closeEr error
	made    []string
}

// BuildNAT makes the network c describes. On error it removes what it made.
func BuildNAT(ctx context.Context, c NATConfig) (*NATNet, error) {
	if c.Prefix == "" {
		c.Prefix = "psnat" + strconv.Itoa(os.Getpid()%100000)
	}
	if !prefixRunes.MatchString(c.Prefix) || len(c.Prefix)+5 > 15 {
		return nil, fmt.Errorf("netns: NATConfig.Prefix %q: want letters, digits and _, at most 10 of them", c.Prefix)
	}
	if c.Public < 1 || c.Public > 50 || c.Private < 1 || c.Private > 50 {
		return nil, fmt.Errorf("netns: NATConfig: %d public and %d private hosts, want 1 to 50 of each", c.Public, c.Private)
	}
	if os.Geteuid() != 0 {
		return nil, ErrNotRoot
	}
	ip, err := exec.LookPath("ip")
	if err != nil {
		return nil, ErrNoTools
	}
	ipt, err := exec.LookPath("iptables")
	if err != nil {
		return nil, ErrNoIptables
	}
	n := &NATNet{cfg: c, log: c.Log, ip: ip, ipt: ipt}
	if n.log == nil {
		n.log = slog.New(slog.DiscardHandler)
	}
	if err := n.build(ctx); err != nil {
		if cerr := n.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("netns: teardown after failed build: %w", cerr))
		}
		return nil, err
	}
	n.log.Info("NAT network built", "prefix", c.Prefix, "public", c.Public, "private", c.Private, "random_ports", c.RandomPorts)
	return n, nil
}

// PublicNamespace is public host i's namespace.
func (n *NATNet) PublicNamespace(i int) string { return n.cfg.Prefix + "-p" + strconv.Itoa(i) }

// PrivateNamespace is private host i's namespace.
func (n *NATNet) PrivateNamespace(i int) string { return n.cfg.Prefix + "-n" + strconv.Itoa(i) }

// RouterNamespace is the namespace of private host i's NAT router.
func (n *NATNet) RouterNamespace(i int) string { return n.cfg.Prefix + "-r" + strconv.Itoa(i) }

func (n *NATNet) hub() string { return n.cfg.Prefix + "-hub" }

// PublicAddr is public host i's address.
func (n *NATNet) PublicAddr(i int) string { return natPublicNet + "." + strconv.Itoa(10+i) }

// RouterAddr is the public address of private host i's router: what peers
// see private host i as.
func (n *NATNet) RouterAddr(i int) string { return natPublicNet + "." + strconv.Itoa(100+i) }

// PrivateAddr is private host i's address on its LAN.
func (n *NATNet) PrivateAddr(i int) string { return "192.168." + strconv.Itoa(10+i) + ".2" }

func (n *NATNet) lanGateway(i int) string { return "192.168." + strconv.Itoa(10+i) + ".1" }

func (n *NATNet) build(ctx context.Context) error {
	p := n.cfg.Prefix
	br := p + "br"
	if err := n.addNS(ctx, n.hub()); err != nil {
		return err
	}
	for _, s := range [][]string{
		{"-n", n.hub(), "link", "add", br, "type", "bridge"},
		{"-n", n.hub(), "link", "set", br, "up"},
	} {
		if err := n.run(ctx, n.ip, s...); err != nil {
			return err
		}
	}
	// attach links namespace ns to the bridge by a veth named in (inside ns)
	// and out (on the bridge), with address addr inside.
	attach := func(ns, in, out, addr string) error {
		for _, s := range [][]string{
			{"link", "add", in, "netns", ns, "type", "veth", "peer", "name", out, "netns", n.hub()},
			{"-n", n.hub(), "link", "set", out, "master", br, "up"},
			{"-n", ns, "addr", "add", addr + natPublicLen, "dev", in},
			{"-n", ns, "link", "set", in, "up"},
		} {
			if err := n.run(ctx, n.ip, s...); err != nil {
				return err
			}
		}
		return nil
	}
	for i := range n.cfg.Public {
		ns := n.PublicNamespace(i)
		if err := n.addNS(ctx, ns); err != nil {
			return err
		}
		if err := attach(ns, p+"p"+strconv.Itoa(i), p+"hp"+strconv.Itoa(i), n.PublicAddr(i)); err != nil {
			return fmt.Errorf("netns: public host %d: %w", i, err)
		}
	}
	for i := range n.cfg.Private {
		if err := n.buildPrivate(ctx, i, attach); err != nil {
			return fmt.Errorf("netns: private host %d: %w", i, err)
		}
	}
	return nil
}

func (n *NATNet) buildPrivate(ctx context.Context, i int, attach func(ns, in, out, addr string) error) error {
	p, is := n.cfg.Prefix, strconv.Itoa(i)
	router, host := n.RouterNamespace(i), n.PrivateNamespace(i)
	for _, ns := range []string{router, host} {
		if err := n.addNS(ctx, ns); err != nil {
			return err
		}
	}
	wan, lan, hostIf := p+"rw"+is, p+"rl"+is, p+"n"+is
	if err := attach(router, wan, p+"hr"+is, n.RouterAddr(i)); err != nil {
		return err
	}
	steps := [][]string{
		{n.ip, "link", "add", lan, "netns", router, "type", "veth", "peer", "name", hostIf, "netns", host},
		{n.ip, "-n", router, "addr", "add", n.lanGateway(i) + "/24", "dev", lan},
		{n.ip, "-n", router, "link", "set", lan, "up"},
		{n.ip, "-n", host, "addr", "add", n.PrivateAddr(i) + "/24", "dev", hostIf},
		{n.ip, "-n", host, "link", "set", hostIf, "up"},
		{n.ip, "-n", host, "route", "add", "default", "via", n.lanGateway(i)},
	}
	masq := []string{n.ip, "netns", "exec", router, n.ipt, "-t", "nat", "-A", "POSTROUTING", "-o", wan, "-j", "MASQUERADE"}
	if n.cfg.RandomPorts {
		masq = append(masq, "--random-fully")
	}
	// Like a home router, drop what nobody inside asked for, silently. Dropped
	// before conntrack confirms it, an early packet of a hole punch leaves no
	// entry behind that would make the router map the inside host's own
	// outgoing packet to another port.
	firewall := []string{n.ip, "netns", "exec", router, n.ipt, "-A", "INPUT", "-i", wan, "-m", "conntrack", "--ctstate", "NEW,INVALID", "-j", "DROP"}
	forward := []string{n.ip, "netns", "exec", router, n.ipt, "-A", "FORWARD", "-i", wan, "-m", "conntrack", "--ctstate", "NEW,INVALID", "-j", "DROP"}
	steps = append(steps, masq, firewall, forward)
	for _, s := range steps {
		if err := n.run(ctx, s[0], s[1:]...); err != nil {
			return err
		}
	}
	return inNetns(router, func() error {
		return writeSysctls(map[string]string{"net/ipv4/ip_forward": "1"})
	})
}

// addNS makes namespace ns with loopback up and no IPv6.
func (n *NATNet) addNS(ctx context.Context, ns string) error {
	if _, err := os.Stat(nsPath(ns)); err == nil {
		return fmt.Errorf("netns: namespace %s exists (a leftover? netns.Cleanup(%q) removes it)", ns, n.cfg.Prefix)
	}
	n.mu.Lock()
	n.made = append(n.made, ns)
	n.mu.Unlock()
	if err := n.run(ctx, n.ip, "netns", "add", ns); err != nil {
		return err
	}
	if err := n.run(ctx, n.ip, "-n", ns, "link", "set", "lo", "up"); err != nil {
		return err
	}
	return inNetns(ns, func() error {
		return writeSysctls(map[string]string{
			"net/ipv6/conf/all/disable_ipv6":     "1",
			"net/ipv6/conf/default/disable_ipv6": "1",
		})
	})
}

func (n *NATNet) run(ctx context.Context, name string, args ...string) error {
	return runLogged(ctx, n.log, name, args...)
}

// Command returns a command that runs name in namespace ns (one of this
// network's), in its own process group, killed with the group when ctx ends
// and when the harness dies (as Net.Command).
func (n *NATNet) Command(ctx context.Context, ns string, name string, args ...string) *exec.Cmd {
	return nsCommand(ctx, n.ip, ns, name, args...)
}

// Close kills every process in the namespaces and deletes them. It is
// idempotent: later calls return the first call's error.
func (n *NATNet) Close() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return n.closeEr
	}
	n.closed = true
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	errs := killNamespaces(ctx, n.ip, n.made)
	errs = append(errs, deleteNamespaces(ctx, n.log, n.ip, n.made)...)
	n.closeEr = errors.Join(errs...)
	n.log.Info("NAT network closed", "prefix", n.cfg.Prefix, "err", n.closeEr)
	return n.closeEr
}
