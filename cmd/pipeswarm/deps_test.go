package main

import (
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// TestPackageDependenciesFollowTheDesign guards the dependency direction in
// DESIGN.md in one place: the model and the optimiser know nothing of the network or
// the node and do not log; the network layer knows nothing of the model, the
// optimiser or the node; the status page reads what the daemon gives it and knows
// nothing of the daemon, the trainer or the core; the stage-training unit knows
// nothing of what drives it. Within node, shared things sit below what uses them:
// wire (messages and shared types) under ckpt (checkpoint files) under the worker and
// the launcher, which never import each other, under the daemon, which runs workers
// and is imported by neither. A ban ending in "$" bans that package alone, not its
// subpackages.
func TestPackageDependenciesFollowTheDesign(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go tool not in PATH")
	}
	const mod = "github.com/pipeswarm/pipeswarm/"
	banned := map[string][]string{
		"shard/...":   {"libp2p", mod + "node", mod + "p2p", "log/slog"},
		"optim":       {"libp2p", mod + "node", mod + "p2p", mod + "shard", "log/slog", "log"},
		"p2p":         {mod + "shard", mod + "optim", mod + "node"},
		"p2p/traffic": {mod + "shard", mod + "optim", mod + "node"},
		// The clock and the deadline rule are what the cores share with the I/O around
		// them: nothing but the standard library's time, no network, no files, no logs.
		"p2p/clock":   {"libp2p", mod + "p2p$", mod + "shard", mod + "optim", mod + "node", "os", "net", "log/slog", "log"},
		"node/status": {mod + "node/daemon", mod + "node/worker", mod + "node/launcher", mod + "node/core", mod + "node/train", mod + "optim"},
		// The stage-training unit is what the trainer and the worker share: it knows
		// neither of them, nor the decisions of the core.
		"node/stage":    {mod + "node/train", mod + "node/core", mod + "node/worker", mod + "node/launcher", mod + "node/daemon"},
		"node/wire":     {mod + "node/ckpt", mod + "node/worker", mod + "node/launcher", mod + "node/daemon"},
		"node/ckpt":     {mod + "node/worker", mod + "node/launcher", mod + "node/daemon"},
		"node/worker":   {mod + "node/launcher", mod + "node/daemon"},
		"node/launcher": {mod + "node/worker", mod + "node/daemon"},
		"node/daemon":   {mod + "node/launcher"},
		// The launcher's decisions about a run: no network, no wire, no one who
		// carries them out.
		"node/membership": {"libp2p", "net", mod + "p2p$", mod + "node/wire", mod + "node/worker", mod + "node/launcher", mod + "node/daemon", mod + "node/train"},
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
				if exact, ok := strings.CutSuffix(b, "$"); ok {
					if dep == exact {
						t.Errorf("%s depends on %s", pkg, dep)
					}
					continue
				}
				if dep == b || strings.HasPrefix(dep, b+"/") || (b == "libp2p" && strings.Contains(dep, "libp2p")) {
					t.Errorf("%s depends on %s", pkg, dep)
				}
			}
		}
	}
}

// TestNoCgoOutsideTheStandardLibrary: the binary builds without a C compiler (Go then
// turns cgo off) and loads its accelerators at run time, so no package it imports
// outside the standard library has cgo files. With a C compiler present, purego
// links its loader through the system's cgo runtime (its internal/cgo): that one is
// allowed there, and none of this module's packages has cgo files either way. The
// nodlopen build does not import purego at all.
func TestNoCgoOutsideTheStandardLibrary(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go tool not in PATH")
	}
	for _, c := range []struct {
		cgo, tags string
		allowed   []string
	}{
		{"0", "", nil},
		{"1", "", []string{"github.com/ebitengine/purego/internal/cgo"}},
		{"0", "nodlopen", nil},
	} {
		cmd := exec.Command(goTool, "list", "-deps", "-tags", c.tags,
			"-f", "{{if not .Standard}}{{.ImportPath}} {{len .CgoFiles}}{{end}}", ".")
		cmd.Env = append(os.Environ(), "CGO_ENABLED="+c.cgo)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("CGO_ENABLED=%s go list -deps -tags %q: %v", c.cgo, c.tags, err)
		}
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			pkg, n, _ := strings.Cut(line, " ")
			if c.tags == "nodlopen" && strings.HasPrefix(pkg, "github.com/ebitengine/purego") {
				t.Errorf("CGO_ENABLED=0 -tags nodlopen: the binary imports %s", pkg)
			}
			if n != "0" && !slices.Contains(c.allowed, pkg) {
				t.Errorf("CGO_ENABLED=%s -tags %q: %s has %s cgo files", c.cgo, c.tags, pkg, n)
			}
		}
	}
}
