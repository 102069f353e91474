package netns

import (
	"fmt"
	"slices"
	"time"
)

// profiles are the WAN bench's links (examples/wan holds the real ones), for tests.
var profiles = map[string]Link{
	"lan":              {Mbps: 1000, Latency: 500 * time.Microsecond},
	"home":             {Mbps: 100, Latency: 25 * time.Millisecond},
	"intercontinental": {Mbps: 50, Latency: 75 * time.Millisecond, Loss: 0.001},
	"protocol-nanogpt": {Mbps: 200, Latency: 50 * time.Millisecond},
}

// Profile returns the link of a named profile.
func Profile(name string) (Link, error) {
	l, ok := profiles[name]
	if !ok {
		return Link{}, fmt.Errorf("netns: unknown link profile %q (have %v)", name, ProfileNames())
	}
	return l, nil
}

// ProfileNames lists the profiles, sorted.
func ProfileNames() []string {
	names := make([]string, 0, len(profiles))
	for k := range profiles {
		names = append(names, k)
	}
	slices.Sort(names)
	return names
}
