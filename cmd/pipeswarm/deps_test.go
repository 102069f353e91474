package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestPackageDependenciesFollowTheDesign guards the dependency direction in
// DESIGN.md in one place: the model and the optimiser know nothing of the network or
// the node and do not log; the network layer knows nothing of the model, the
// optimiser or the node.
func TestPackageDependenciesFollowTheDesign(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go tool not in PATH")
	}
	const mod = "github.com/pipeswarm/pipeswarm/"
	banned := map[string][]string{
		"shard/...": {"libp2p", mod + "node", mod + "p2p", "log/slog"},
		"optim":     {"libp2p", mod + "node", mod + "p2p", mod + "shard", "log/slog", "log"},
		"p2p":       {mod + "shard", mod + "optim", mod + "node"},
	}
	for pkg, bans := range banned {
		out, err := exec.Command(goTool, "list", "-deps", "../../"+pkg).Output()
		if err != nil {
			t.Fatalf("go list -deps %s: %v", pkg, err)
		}
		for _, dep := range strings.Fields(string(out)) {
			if strings.HasPrefix(dep, mod+strings.TrimSuffix(pkg, "/...")) {
				continue // the package itself and its subpackages
			}
			for _, b := range bans {
				if dep == b || strings.HasPrefix(dep, b+"/") || (b == "libp2p" && strings.Contains(dep, "libp2p")) {
					t.Errorf("%s depends on %s", pkg, dep)
				}
			}
		}
	}
}
