package p2p

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDoesNotImportShardOptimOrNode guards the dependency direction in
// DESIGN.md: the network layer knows nothing of the model, the optimiser
// or the node.
func TestDoesNotImportShardOptimOrNode(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go tool not in PATH")
	}
	out, err := exec.Command(goTool, "list", "-deps", "-f", "{{.ImportPath}}", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	const mod = "github.com/pipeswarm/pipeswarm/"
	for _, dep := range strings.Fields(string(out)) {
		for _, banned := range []string{"shard", "optim", "node"} {
			if dep == mod+banned || strings.HasPrefix(dep, mod+banned+"/") {
				t.Errorf("p2p depends on %s", dep)
			}
		}
	}
}
