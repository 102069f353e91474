package p2p

import (
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"

	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// Reachability is what the host knows of whether other peers can dial it.
type Reachability struct {
	State   string   `json:"state"`            // "unknown", "public" or "private"
	Addrs   []string `json:"addrs"`            // addresses others should dial (public, announced or relayed)
	Reason  string   `json:"reason,omitempty"` // why not reachable: "no public address", "port closed", "symmetric NAT", ...
	Fix     string   `json:"fix,omitempty"`    // what the operator should do
	Relayed bool     `json:"relayed"`          // reachable only through a relay reservation
}

// Reachability states.
const (
	ReachUnknown = "unknown"
	ReachPublic  = "public"
	ReachPrivate = "private"
)

// Reasons a host is not (known to be) reachable.
const (
	ReasonNoPublicAddr = "no public address"
	ReasonPortClosed   = "port closed"
	ReasonSymmetricNAT = "symmetric NAT"
	ReasonUnchecked    = "not checked yet"
)

// Line is the one line an operator reads: "reachable at ADDR" or
// "not reachable: REASON; fix: FIX", and whether a relay carries the traffic.
func (r Reachability) Line() string {
	switch r.State {
	case ReachPublic:
		return "reachable at " + strings.Join(r.Addrs, ", ")
	case ReachPrivate:
		s := "not reachable: " + r.Reason
		if r.Relayed && len(r.Addrs) > 0 {
			s += "; reachable through a relay at " + r.Addrs[0]
		}
		return s + "; fix: " + r.Fix
	}
	return "reachability unknown: " + r.Reason + "; fix: " + r.Fix
}

// Equal reports whether r and o would print the same and advertise the same.
func (r Reachability) Equal(o Reachability) bool {
	return r.State == o.State && r.Reason == o.Reason && r.Fix == o.Fix && r.Relayed == o.Relayed && slices.Equal(r.Addrs, o.Addrs)
}

// Observed is one address peers saw this host dial or answer from.
type Observed struct {
	Local     string // the listen address the connections used (/ip4/A/tcp/N or /ip4/A/udp/N/quic-v1)
	External  string // the address the peers saw, same form
	Observers int    // distinct observers (by IP)
}

// Observations is what a host knows of its own addresses: the input of Assess.
type Observations struct {
	Listen    []string          // addresses bound on this machine's interfaces, with their ports
	Announced []string          // addresses the operator said others should dial (--announce)
	Found     []string          // other public addresses libp2p found: router port mappings, addresses many peers observed
	Observed  []Observed        // what peers saw, one entry per (local, external) pair
	Checked   map[string]bool   // AutoNAT v2 verdicts so far: address -> a peer could dial it back
	Relayed   []string          // circuit addresses through relays that hold a reservation for this host
	Relays    bool              // relays are known (configured or bootstrap), so one will be tried
	Errors    map[string]string // why an address could not be checked (no AutoNAT v2 server, ...), for the unknown case
	// AllowPrivate counts private and loopback addresses as candidates too: a
	// swarm on one LAN, or tests on one machine.
	AllowPrivate bool
	// RandomPorts: the host was told to listen on port 0, so its ports change at every
	// start and forwarding them is no fix; the advice is to listen on fixed ones.
	RandomPorts bool
}

// Assess turns observations into a Reachability with its reason and fix. It does
// no I/O. A single AutoNAT v2 verdict per address counts: any address a peer
// dialled back makes the host public; otherwise any refused one makes it private.
func Assess(o Observations) Reachability {
	cands := candidates(o)
	var reachable, refused, unchecked []string
	for _, a := range cands {
		switch ok, checked := o.Checked[a]; {
		case !checked:
			unchecked = append(unchecked, a)
		case ok:
			reachable = append(reachable, a)
		default:
			refused = append(refused, a)
		}
	}
	if len(reachable) > 0 {
		return Reachability{State: ReachPublic, Addrs: reachable}
	}
	r := Reachability{State: ReachPrivate, Addrs: []string{}}
	if len(o.Relayed) > 0 {
		r.Relayed = true
		r.Addrs = slices.Clone(o.Relayed)
	}
	tcp, udp := listenPorts(o.Listen)
	if o.RandomPorts {
		tcp, udp = 0, 0
	}
	public := publicIP(o)
	switch {
	case symmetric(o.Observed):
		r.Reason = ReasonSymmetricNAT
		r.Fix = "this NAT maps each connection to a new port, so hole punching cannot pass it; " + forward(tcp, udp, public)
	case len(cands) == 0:
		r.Reason = ReasonNoPublicAddr
		r.Fix = forward(tcp, udp, public)
	case len(refused) > 0:
		r.Reason = ReasonPortClosed
		r.Fix = forward(tcp, udp, public)
	default:
		r.State = ReachUnknown
		r.Reason = ReasonUnchecked + ": no peer that runs AutoNAT v2 has dialled " + strings.Join(unchecked, ", ") + " back"
		for _, a := range unchecked {
			if e := o.Errors[a]; e != "" {
				r.Reason += " (" + e + ")"
				break
			}
		}
		r.Fix = "connect to pipeswarm peers (--bootstrap) so they can check it; if they cannot reach it, " + forward(tcp, udp, public)
	}
	r.Fix += relayClause(r, o.Relays)
	return r
}

// candidates are the public addresses others might dial: announced first, then
// public interface addresses, what libp2p found, and what peers observed.
func candidates(o Observations) []string {
	var out []string
	add := func(s string) {
		a, err := ma.NewMultiaddr(s)
		if err != nil || manet.IsIPUnspecified(a) || !(manet.IsPublicAddr(a) || o.AllowPrivate) {
			return
		}
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	for _, s := range o.Announced {
		add(s)
	}
	for _, s := range o.Listen {
		add(s)
	}
	for _, s := range o.Found {
		add(s)
	}
	for _, ob := range o.Observed {
		add(ob.External)
	}
	return out
}

// symmetric reports whether one local port was seen behind more than one
// external port of the same IP by different observers: a NAT whose mapping
// depends on the destination, which hole punching cannot predict.
func symmetric(obs []Observed) bool {
	ports := map[string]map[string]bool{} // local + external IP -> external ports
	for _, ob := range obs {
		ip, port, ok := ipPort(ob.External)
		if !ok {
			continue
		}
		k := ob.Local + " " + ip
		if ports[k] == nil {
			ports[k] = map[string]bool{}
		}
		ports[k][port] = true
	}
	for _, ps := range ports {
		if len(ps) > 1 {
			return true
		}
	}
	return false
}

// forward is the port-forwarding advice for the listen ports.
func forward(tcp, udp int, public string) string {
	if public == "" {
		public = "PUBLIC_IP"
	}
	switch {
	case tcp > 0 && udp > 0:
		return fmt.Sprintf("forward TCP port %d and UDP port %d on your router to this machine and pass --announce /ip4/%s/tcp/%d", tcp, udp, public, tcp)
	case tcp > 0:
		return fmt.Sprintf("forward TCP port %d on your router to this machine and pass --announce /ip4/%s/tcp/%d", tcp, public, tcp)
	case udp > 0:
		return fmt.Sprintf("forward UDP port %d on your router to this machine and pass --announce /ip4/%s/udp/%d/quic-v1", udp, public, udp)
	}
	return "listen on fixed ports (--listen /ip4/0.0.0.0/tcp/4001 --listen /ip4/0.0.0.0/udp/4001/quic-v1; the ports now are random and change at every start), " +
		"forward TCP and UDP port 4001 on your router to this machine and pass --announce /ip4/" + public + "/tcp/4001"
}

func relayClause(r Reachability, relays bool) string {
	switch {
	case r.Relayed:
		return "; until then peers reach this node through its relay (slow), and direct connections by hole punching where the NAT allows"
	case relays:
		return ", or a relay will be used"
	}
	return ", or name a relay (relays: in the config, or a bootstrap peer that serves one)"
}

// listenPorts returns the first TCP and UDP (QUIC) port this host listens on.
func listenPorts(listen []string) (tcp, udp int) {
	for _, s := range listen {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			continue
		}
		if v, err := a.ValueForProtocol(ma.P_TCP); err == nil && tcp == 0 {
			tcp, _ = strconv.Atoi(v)
		}
		if v, err := a.ValueForProtocol(ma.P_UDP); err == nil && udp == 0 {
			udp, _ = strconv.Atoi(v)
		}
	}
	return tcp, udp
}

// publicIP is the host's public IPv4 address as announced or observed, if known.
func publicIP(o Observations) string {
	for _, s := range slices.Concat(o.Announced, o.Found, externals(o.Observed)) {
		if ip, _, ok := ipPort(s); ok && net.ParseIP(ip).To4() != nil {
			if a, err := ma.NewMultiaddr(s); err == nil && manet.IsPublicAddr(a) {
				return ip
			}
		}
	}
	return ""
}

func externals(obs []Observed) []string {
	out := make([]string, len(obs))
	for i, ob := range obs {
		out[i] = ob.External
	}
	return out
}

// ipPort splits /ip4|ip6/IP/tcp|udp/PORT/... into its IP and port.
func ipPort(s string) (ip, port string, ok bool) {
	a, err := ma.NewMultiaddr(s)
	if err != nil || len(a) < 2 {
		return "", "", false
	}
	switch a[0].Code() {
	case ma.P_IP4, ma.P_IP6:
	default:
		return "", "", false
	}
	switch a[1].Code() {
	case ma.P_TCP, ma.P_UDP:
	default:
		return "", "", false
	}
	return a[0].Value(), a[1].Value(), true
}
