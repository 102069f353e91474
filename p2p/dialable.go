package p2p

import (
	"slices"
	"strings"

	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// Dialable picks, from a host's full addresses (each ending in /p2p/<id>), the one
// other machines can most likely dial, and says in a few words why that one: an
// address a peer dialled back (r public) first, then one the operator announced,
// another public one, one through a relay, a LAN one, and loopback last. Within a
// kind, IPv4 before IPv6 and TCP before QUIC, as routers and firewalls pass them
// more often. "" if there is none.
func Dialable(full []string, r Reachability, announced []string) (addr, why string) {
	type cand struct {
		addr string
		rank int
	}
	const (
		checked = iota
		announcedRank
		public
		relayed
		lan
		loopback
	)
	reasons := map[int]string{
		checked:       "a public address a peer dialled back",
		announcedRank: "the address announced with --announce (not yet dialled back by a peer)",
		public:        "a public address (not yet dialled back by a peer)",
		relayed:       "through a relay: this node is not reachable directly, and relayed traffic is slow",
		lan:           "a LAN address: reachable from this network only, as no public address is known",
		loopback:      "loopback: reachable from this machine only",
	}
	plain := func(s string) string {
		if i := strings.LastIndex(s, "/p2p/"); i > 0 && !strings.Contains(s[i:], "p2p-circuit") {
			return s[:i]
		}
		return s
	}
	var cs []cand
	for _, s := range full {
		a, err := ma.NewMultiaddr(plain(s))
		if err != nil {
			continue
		}
		rank := lan
		switch p := plain(s); {
		case r.State == ReachPublic && slices.ContainsFunc(r.Addrs, func(x string) bool { return plain(x) == p }):
			rank = checked
		case slices.ContainsFunc(announced, func(x string) bool { return plain(x) == p }):
			rank = announcedRank
		case strings.Contains(p, "/p2p-circuit"):
			rank = relayed
		case manet.IsIPLoopback(a):
			rank = loopback
		case manet.IsPublicAddr(a):
			rank = public
		}
		cs = append(cs, cand{s, rank})
	}
	score := func(c cand) int {
		n := c.rank * 4
		if strings.HasPrefix(c.addr, "/ip6/") {
			n += 2
		}
		if !strings.Contains(c.addr, "/tcp/") {
			n++
		}
		return n
	}
	slices.SortStableFunc(cs, func(a, b cand) int { return score(a) - score(b) })
	if len(cs) == 0 {
		return "", ""
	}
	return cs[0].addr, reasons[cs[0].rank]
}
