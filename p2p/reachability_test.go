package p2p

import (
	"strings"
	"testing"
)

func TestAssessSaysWhyAHostIsNotReachableAndWhatToDo(t *testing.T) {
	listen := []string{"/ip4/127.0.0.1/tcp/4001", "/ip4/192.168.1.5/tcp/4001", "/ip4/192.168.1.5/udp/4002/quic-v1"}
	nat := Observed{Local: "/ip4/192.168.1.5/tcp/4001", External: "/ip4/11.0.0.9/tcp/4001", Observers: 1}
	for _, c := range []struct {
		name    string
		o       Observations
		state   string
		reason  string
		fix     []string // substrings of Fix
		relayed bool
		addrs   []string
	}{
		{name: "private addresses only", o: Observations{Listen: listen},
			state: ReachPrivate, reason: ReasonNoPublicAddr,
			fix: []string{"forward TCP port 4001 and UDP port 4002", "--announce /ip4/PUBLIC_IP/tcp/4001", "or name a relay"}},
		{name: "private addresses only, relays known", o: Observations{Listen: listen, Relays: true},
			state: ReachPrivate, reason: ReasonNoPublicAddr, fix: []string{"or a relay will be used"}},
		{name: "behind a NAT, not checked yet", o: Observations{Listen: listen, Observed: []Observed{nat}, Relays: true,
			Errors: map[string]string{nat.External: "no AutoNAT v2 server connected"}},
			state: ReachUnknown, reason: ReasonUnchecked, fix: []string{"--bootstrap", "--announce /ip4/11.0.0.9/tcp/4001"}},
		{name: "behind a NAT, dial-back refused", o: Observations{Listen: listen, Observed: []Observed{nat}, Relays: true,
			Checked: map[string]bool{nat.External: false}},
			state: ReachPrivate, reason: ReasonPortClosed, fix: []string{"forward TCP port 4001", "--announce /ip4/11.0.0.9/tcp/4001", "relay will be used"}},
		{name: "behind a NAT, on a relay", o: Observations{Listen: listen, Observed: []Observed{nat}, Relays: true,
			Checked: map[string]bool{nat.External: false}, Relayed: []string{"/ip4/11.0.0.1/tcp/4001/p2p/R/p2p-circuit/p2p/A"}},
			state: ReachPrivate, reason: ReasonPortClosed, fix: []string{"through its relay"}, relayed: true,
			addrs: []string{"/ip4/11.0.0.1/tcp/4001/p2p/R/p2p-circuit/p2p/A"}},
		{name: "port forwarded", o: Observations{Listen: listen, Observed: []Observed{nat}, Checked: map[string]bool{nat.External: true}},
			state: ReachPublic, addrs: []string{nat.External}},
		{name: "announced address checked", o: Observations{Listen: listen, Announced: []string{"/ip4/11.0.0.7/tcp/9000"},
			Checked: map[string]bool{"/ip4/11.0.0.7/tcp/9000": true}},
			state: ReachPublic, addrs: []string{"/ip4/11.0.0.7/tcp/9000"}},
		{name: "a new port for every peer", o: Observations{Listen: listen, Observed: []Observed{nat,
			{Local: nat.Local, External: "/ip4/11.0.0.9/tcp/51234", Observers: 1}}},
			state: ReachPrivate, reason: ReasonSymmetricNAT, fix: []string{"hole punching cannot pass", "forward TCP port 4001"}},
		{name: "public interface address", o: Observations{Listen: []string{"/ip4/11.0.0.3/tcp/4001"}, Checked: map[string]bool{"/ip4/11.0.0.3/tcp/4001": true}},
			state: ReachPublic, addrs: []string{"/ip4/11.0.0.3/tcp/4001"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := Assess(c.o)
			if r.State != c.state || !strings.HasPrefix(r.Reason, c.reason) || r.Relayed != c.relayed {
				t.Fatalf("got %+v, want state %q reason %q relayed %v", r, c.state, c.reason, c.relayed)
			}
			for _, f := range c.fix {
				if !strings.Contains(r.Fix, f) {
					t.Errorf("fix %q does not say %q", r.Fix, f)
				}
			}
			if c.addrs != nil && strings.Join(r.Addrs, " ") != strings.Join(c.addrs, " ") {
				t.Errorf("addrs %v, want %v", r.Addrs, c.addrs)
			}
			if c.state == ReachPublic && (r.Reason != "" || r.Fix != "") {
				t.Errorf("a public host has reason %q and fix %q", r.Reason, r.Fix)
			}
			line := r.Line()
			if c.state == ReachPrivate && !strings.HasPrefix(line, "not reachable: "+c.reason) {
				t.Errorf("line %q", line)
			}
			if c.state == ReachPublic && line != "reachable at "+strings.Join(c.addrs, ", ") {
				t.Errorf("line %q", line)
			}
		})
	}
}

func TestAssessIgnoresOneObserverSeeingOnePortTwice(t *testing.T) {
	// Two observations of the same mapping (TCP and QUIC on different local
	// ports) are not a symmetric NAT.
	o := Observations{Observed: []Observed{
		{Local: "/ip4/192.168.1.5/tcp/4001", External: "/ip4/11.0.0.9/tcp/4001", Observers: 2},
		{Local: "/ip4/192.168.1.5/udp/4002/quic-v1", External: "/ip4/11.0.0.9/udp/4002/quic-v1", Observers: 2},
	}, Checked: map[string]bool{"/ip4/11.0.0.9/tcp/4001": false}}
	if r := Assess(o); r.Reason != ReasonPortClosed {
		t.Fatalf("got %+v, want port closed", r)
	}
}
