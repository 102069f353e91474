package p2p

import (
	"strings"
	"testing"
)

func TestDialablePrefersCheckedAnnouncedPublicRelayLANThenLoopback(t *testing.T) {
	const id = "12D3KooWAkC88sNgQmYS6s3EBH4yw18uirscCMtJKXUhufsxoe7V"
	full := func(addrs ...string) []string {
		var out []string
		for _, a := range addrs {
			out = append(out, a+"/p2p/"+id)
		}
		return out
	}
	loop := "/ip4/127.0.0.1/tcp/4001"
	loopQUIC := "/ip4/127.0.0.1/udp/4001/quic-v1"
	lanQUIC := "/ip4/192.168.1.20/udp/4001/quic-v1"
	lan := "/ip4/192.168.1.20/tcp/4001"
	pub := "/ip4/203.0.114.7/tcp/4001"
	pub2 := "/ip4/8.8.4.4/tcp/4001"
	relay := "/ip4/8.8.8.8/tcp/4001/p2p/12D3KooWJBqi4npEcgyXvYH8EAg1hUyZjSuMh6ADGvPGHLCmE5tj/p2p-circuit"
	for _, c := range []struct {
		name      string
		addrs     []string
		r         Reachability
		announced []string
		want, why string
	}{
		{"loopback only", full(loopQUIC, loop), Reachability{}, nil, loop, "this machine only"},
		{"LAN before loopback, TCP before QUIC", full(loop, loopQUIC, lanQUIC, lan), Reachability{}, nil, lan, "LAN address"},
		{"relay before LAN", full(loop, lan, relay), Reachability{State: ReachPrivate, Relayed: true}, nil, relay, "through a relay"},
		{"public before relay", full(loop, lan, relay, pub), Reachability{}, nil, pub, "public address (not yet dialled back"},
		{"announced before public", full(loop, pub, pub2), Reachability{}, []string{pub2}, pub2, "--announce"},
		{"checked before announced", full(loop, pub, pub2), Reachability{State: ReachPublic, Addrs: []string{pub}}, []string{pub2}, pub, "dialled back"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, why := Dialable(c.addrs, c.r, c.announced)
			if got != c.want+"/p2p/"+id || !strings.Contains(why, c.why) {
				t.Errorf("Dialable = %s (%s), want %s (%s)", got, why, c.want+"/p2p/"+id, c.why)
			}
		})
	}
	if got, _ := Dialable(nil, Reachability{}, nil); got != "" {
		t.Errorf("no addresses: %q", got)
	}
}

// A node on random ports is told to listen on fixed ones: forwarding a port that
// changes at the next start fixes nothing.
func TestRandomPortsAreAdvisedFixedListenPorts(t *testing.T) {
	o := Observations{Listen: []string{"/ip4/192.168.1.20/tcp/38211", "/ip4/192.168.1.20/udp/41877/quic-v1"}, RandomPorts: true}
	r := Assess(o)
	for _, want := range []string{"--listen /ip4/0.0.0.0/tcp/4001 --listen /ip4/0.0.0.0/udp/4001/quic-v1", "change at every start", "--announce /ip4/PUBLIC_IP/tcp/4001"} {
		if !strings.Contains(r.Fix, want) {
			t.Errorf("fix %q does not say %q", r.Fix, want)
		}
	}
	if strings.Contains(r.Fix, "38211") || strings.Contains(r.Fix, "41877") {
		t.Errorf("fix %q names the random ports", r.Fix)
	}
	o.RandomPorts = false // fixed ports: forwarding them is the fix
	if r := Assess(o); !strings.Contains(r.Fix, "forward TCP port 38211 and UDP port 41877") {
		t.Errorf("fixed ports: fix %q", r.Fix)
	}
	for listen, want := range map[string]bool{"/ip4/0.0.0.0/tcp/0": true, "/ip4/0.0.0.0/udp/0/quic-v1": true, "/ip4/0.0.0.0/tcp/4001": false} {
		if got := randomPorts([]string{listen}); got != want {
			t.Errorf("randomPorts(%s) = %v", listen, got)
		}
	}
	if !randomPorts(nil) {
		t.Error("the default listen addresses are random ports")
	}
}
