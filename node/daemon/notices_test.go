package daemon

import (
	"testing"

	"github.com/pipeswarm/pipeswarm/p2p"
)

func TestReachabilityNoticesTellTheFirstKnownStateEachChangeAndUnknownOnlyAtTheDeadline(t *testing.T) {
	private := p2p.Reachability{State: p2p.ReachPrivate, Reason: p2p.ReasonNoPublicAddr, Fix: "forward"}
	unknown := p2p.Reachability{State: p2p.ReachUnknown, Reason: p2p.ReasonUnchecked, Fix: "wait"}
	closed := p2p.Reachability{State: p2p.ReachPrivate, Reason: p2p.ReasonPortClosed, Fix: "forward"}
	relayed := closed
	relayed.Relayed, relayed.Addrs = true, []string{"/ip4/11.0.0.1/tcp/1/p2p/R/p2p-circuit/p2p/A"}

	var n notices
	for i, c := range []struct {
		r    p2p.Reachability
		tell bool
	}{
		{private, true},  // known at once
		{unknown, false}, // a peer saw a public address; not checked yet
		{private, false}, // back to what was said
		{closed, true},   // a new reason
		{relayed, true},  // a relay slot
		{relayed, false}, // the same again
	} {
		if got := n.changed(c.r); got != c.tell {
			t.Errorf("step %d (%s): tell = %v, want %v", i, c.r.Reason, got, c.tell)
		}
	}
	if n.deadline() {
		t.Error("the deadline told again what was told")
	}

	var m notices
	if m.changed(unknown) {
		t.Error("unknown told before the deadline")
	}
	if !m.deadline() || m.said.State != p2p.ReachUnknown {
		t.Error("unknown not told at the deadline")
	}
	if m.changed(unknown) {
		t.Error("unknown told twice")
	}
	if !m.changed(closed) {
		t.Error("a known state after the deadline not told")
	}
}
