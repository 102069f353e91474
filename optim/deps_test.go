package optim

import (
	"os/exec"
	"strings"
	"testing"
)

// TestImportsNoNetworkingOrNodeCode guards the dependency direction: optim is
// numerics only and must stay usable without libp2p, node or shard.
func TestImportsNoNetworkingOrNodeCode(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go tool not in PATH")
	}
	out, err := exec.Command(goTool, "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	const mod = "github.com/pipeswarm/pipeswarm/"
	for _, dep := range strings.Fields(string(out)) {
		if strings.Contains(dep, "libp2p") || strings.HasPrefix(dep, mod+"node") || strings.HasPrefix(dep, mod+"shard") || dep == "log" || dep == "log/slog" {
			t.Errorf("optim depends on %s", dep)
		}
	}
}
