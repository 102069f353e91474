package wan

import (
	"slices"
	"strings"
	"testing"
	"time"
)

func TestBuiltInProfilesCarryTheIssueFigures(t *testing.T) {
	want := map[string]Link{
		"lan":              {Mbps: 1000, Latency: 500 * time.Microsecond},
		"home":             {Mbps: 100, Latency: 25 * time.Millisecond},
		"intercontinental": {Mbps: 50, Latency: 75 * time.Millisecond, Loss: 0.001},
		"protocol-nanogpt": {Mbps: 200, Latency: 50 * time.Millisecond},
	}
	if got := Profiles(); len(got) != len(want) {
		t.Fatalf("profiles %v, want %d", got, len(want))
	}
	for name, l := range want {
		p, err := LoadProfile(name)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if p.Name != name || p.Default() != l {
			t.Errorf("%s: %+v, want %+v", name, p.Default(), l)
		}
	}
}

func TestProfileErrorsNameFileLineAndField(t *testing.T) {
	for _, c := range []struct{ src, want string }{
		{"name: x\nbandwidth_mbps: 0\nlatency_ms: 5\n", "x.yaml:2: bandwidth_mbps"},
		{"bandwidth_mbps: 10\nlatency_ms: 5\nloss: 1.5\n", "x.yaml:3: loss"},
		{"bandwidth_mbps: 10\nlatency_ms: -1\n", "x.yaml:2: latency_ms"},
		{"bandwidth_mbps: 10\nlatncy_ms: 5\n", "latncy_ms"},
		{"bandwidth_mbps: 10\nlatency_ms: 5\nlinks: [\"s1r0=ten/5\"]\n", "x.yaml:3: links[0]"},
	} {
		_, err := ParseProfile([]byte(c.src), "x.yaml")
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: error %v, want it to contain %q", c.src, err, c.want)
		}
	}
}

func TestOverridesGiveOneCellItsOwnLink(t *testing.T) {
	p, err := LoadProfile("home")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Override("s2r0=10/40/0.01"); err != nil {
		t.Fatal(err)
	}
	if got := p.Link("s2r0"); got != (Link{Mbps: 10, Latency: 40 * time.Millisecond, Loss: 0.01}) {
		t.Fatalf("s2r0: %+v", got)
	}
	if got := p.Link("s1r0"); got != p.Default() {
		t.Fatalf("s1r0: %+v, want the default", got)
	}
	for _, bad := range []string{"s2=10/40", "s2r0=10", "s2r0=0/40", "launcher=10/40/2"} {
		if err := p.Override(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	if err := p.Adjust(50, -1, -1); err != nil || p.Default().Mbps != 50 || p.Default().Latency != 25*time.Millisecond {
		t.Fatalf("adjust: %v %+v", err, p.Default())
	}
}

func TestUnknownProfileListsTheKnownOnes(t *testing.T) {
	_, err := LoadProfile("dialup")
	if err == nil || !strings.Contains(err.Error(), "home") {
		t.Fatalf("error %v, want the known names", err)
	}
}

func TestChurnScheduleIsCheckedAndOrdered(t *testing.T) {
	got, err := ParseChurn("s1r1:restart@40, s1r1:kill@20")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0] != (Churn{Cell: "s1r1", Action: "kill", Step: 20}) || got[1] != (Churn{Cell: "s1r1", Action: "restart", Step: 40}) {
		t.Fatalf("%v", got)
	}
	for _, bad := range []string{"s1r1:restart@5", "s1r1:kill@5,s1r1:kill@6", "s1:kill@5", "s1r1:nap@5", "s1r1:kill@0", "launcher:kill@3"} {
		if _, err := ParseChurn(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	var fired []string
	c := churner{events: got, do: func(e Churn) { fired = append(fired, e.String()) }}
	c.step(19)
	c.step(25)
	c.step(50)
	if strings.Join(fired, " ") != "s1r1:kill@20 s1r1:restart@40" {
		t.Fatalf("fired %v", fired)
	}
}

func TestRotateKillsEachCellInTurnAndRestartsIt(t *testing.T) {
	got, err := Rotate([]string{"s0r0", "s1r1"}, 100, 350, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	want := []Churn{{"s0r0", "kill", 100, 30 * time.Second}, {"s1r1", "kill", 200, 30 * time.Second}, {"s0r0", "kill", 300, 30 * time.Second}}
	if !slices.Equal(got, want) {
		t.Errorf("%v, want %v", got, want)
	}
	if _, err := Rotate(nil, 100, 350, time.Second); err == nil {
		t.Error("a rotation over no cells was accepted")
	}
}
