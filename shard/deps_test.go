package shard

import (
	"os/exec"
	"strings"
	"testing"
)

// TestImportsNoNetworkingOrNodeCode guards the dependency direction: shard is the
// model only, usable without libp2p or the node, and it does not log.
func TestImportsNoNetworkingOrNodeCode(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go tool not in PATH")
	}
	out, err := exec.Command(goTool, "list", "-deps", "./...").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	const mod = "github.com/pipeswarm/pipeswarm/"
	for _, dep := range strings.Fields(string(out)) {
		if strings.Contains(dep, "libp2p") || strings.HasPrefix(dep, mod+"node") || strings.HasPrefix(dep, mod+"p2p") || dep == "log/slog" {
			t.Errorf("shard depends on %s", dep)
		}
	}
}
