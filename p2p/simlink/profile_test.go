package simlink

import (
	"fmt"
	"time"
)

// The WAN bench's links (examples/wan holds the real ones), for tests.
var profiles = map[string]Link{
	"lan":              {Mbps: 1000, Latency: 500 * time.Microsecond},
	"home":             {Mbps: 100, Latency: 25 * time.Millisecond},
	"intercontinental": {Mbps: 50, Latency: 75 * time.Millisecond, Loss: 0.001},
	"protocol-nanogpt": {Mbps: 200, Latency: 50 * time.Millisecond},
}

// Profile returns the named link profile: lan, home, intercontinental or
// protocol-nanogpt (see ProfileNames).
func Profile(name string) (Link, error) {
	l, ok := profiles[name]
	if !ok {
		return Link{}, fmt.Errorf("%w: no profile %q (have %v)", ErrBadLink, name, ProfileNames())
	}
	return l, nil
}

// ProfileNames lists the profiles, fastest first.
func ProfileNames() []string { return []string{"lan", "protocol-nanogpt", "home", "intercontinental"} }
