package main

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
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
// and is imported by neither. Within p2p, the host's package is under the protocols
// built on it, and the leaves import nothing of the module. A ban ending in "$" bans
// that package alone, not its subpackages; a package checked ending in "$" gets no
// leave to import its own subpackages.
func TestPackageDependenciesFollowTheDesign(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go tool not in PATH")
	}
	const mod = "github.com/pipeswarm/pipeswarm/"
	module := strings.TrimSuffix(mod, "/") // bans every package of the module but the one checked
	banned := map[string][]string{
		"shard/...":   {"libp2p", mod + "node", mod + "p2p", "log/slog"},
		"optim":       {"libp2p", mod + "node", mod + "p2p", mod + "shard", "log/slog", "log"},
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
		// Within p2p: the host's package builds on the codecs alone; the protocols on
		// top of it (corpus, reduce) know nothing of each other; the clock, the
		// codecs, the traffic meter, the simulated network and the link probe are
		// leaves, and nothing in p2p runs on the simulated network or the probe.
		"p2p$":       {mod + "p2p/corpus", mod + "p2p/reduce", mod + "p2p/simlink", mod + "p2p/probe", mod + "p2p/traffic", mod + "p2p/clock"},
		"p2p/...":    {mod + "shard", mod + "optim", mod + "node", mod + "bench", mod + "cmd"},
		"p2p/corpus": {mod + "p2p/reduce", mod + "p2p/simlink", mod + "p2p/probe", mod + "p2p/clock"},
		"p2p/reduce": {mod + "p2p/corpus", mod + "p2p/simlink", mod + "p2p/probe"},
		// The clock and the deadline rule are what the cores share with the I/O around
		// them: nothing but the standard library's time, no network, no files, no logs.
		"p2p/clock":   {module, "libp2p", "os", "net", "log/slog", "log"},
		"p2p/codec":   {module},
		"p2p/traffic": {module},
		"p2p/simlink": {module},
		"p2p/probe":   {module},
	}
	for pkg, bans := range banned {
		out, err := exec.Command(goTool, "list", "-deps", "../../"+strings.TrimSuffix(pkg, "$")).Output()
		if err != nil {
			t.Fatalf("go list -deps %s: %v", pkg, err)
		}
		path, alone := strings.CutSuffix(strings.TrimSuffix(pkg, "/..."), "$")
		for _, dep := range strings.Fields(string(out)) {
			if dep == mod+path || !alone && strings.HasPrefix(dep, mod+path+"/") {
				continue // the package itself and, unless it ends in "$", its subpackages
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

// TestCoreDecidesWithoutIOClocksOrGoroutines: node/core is the stage's decisions as
// a pure function of the events it is handed. It reads no clock (the time comes in
// its events), does no I/O, starts no goroutine and touches no channel or lock; of
// p2p/clock it uses the deadline rule's arithmetic, never a Clock.
func TestCoreDecidesWithoutIOClocksOrGoroutines(t *testing.T) {
	const dir = "../../node/core"
	bannedImports := []string{"os", "io", "net", "bufio", "syscall", "log", "sync", "context", "runtime", "path/filepath",
		"github.com/libp2p", "github.com/pipeswarm/pipeswarm/p2p$"}
	bannedCalls := map[string][]string{
		"time":  {"Now", "Since", "Until", "After", "AfterFunc", "NewTimer", "NewTicker", "Tick", "Sleep"},
		"clock": {"Clock", "Timer", "Ticker", "Real", "Or", "Manual", "NewManual"},
	}
	files, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no Go files in %s: %v", dir, err)
	}
	fset := token.NewFileSet()
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, imp := range f.Imports {
			path, _ := strconv.Unquote(imp.Path.Value)
			for _, b := range bannedImports {
				if exact, ok := strings.CutSuffix(b, "$"); ok && path == exact || !ok && (path == b || strings.HasPrefix(path, b+"/")) {
					t.Errorf("%s imports %s", fset.Position(imp.Pos()), path)
				}
			}
		}
		ast.Inspect(f, func(n ast.Node) bool {
			switch n := n.(type) {
			case *ast.GoStmt:
				t.Errorf("%s starts a goroutine", fset.Position(n.Pos()))
			case *ast.ChanType, *ast.SelectStmt, *ast.SendStmt:
				t.Errorf("%s uses a channel", fset.Position(n.Pos()))
			case *ast.UnaryExpr:
				if n.Op == token.ARROW {
					t.Errorf("%s receives from a channel", fset.Position(n.Pos()))
				}
			case *ast.SelectorExpr:
				if pkg, ok := n.X.(*ast.Ident); ok && slices.Contains(bannedCalls[pkg.Name], n.Sel.Name) {
					t.Errorf("%s uses %s.%s", fset.Position(n.Pos()), pkg.Name, n.Sel.Name)
				}
			}
			return true
		})
	}
}
