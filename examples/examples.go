// Package examples holds run specs and node configs that work as they are. They are
// embedded in the binary so `pipeswarm train` runs with no file at all, and every
// command that takes a spec takes one of them by name ("tiny4") from any directory.
package examples

import (
	"embed"
	"fmt"
	"io/fs"
	"slices"
	"strings"
)

// FS holds every example file by its base name (tiny.yaml, small.yaml, ...).
//
//go:embed *.yaml
var FS embed.FS

// WAN holds the WAN bench's link profiles as wan/NAME.yaml (lan, home,
// intercontinental, protocol-nanogpt). They are not run specs.
//
//go:embed wan/*.yaml
var WAN embed.FS

// Default is the spec `pipeswarm train` uses when given none.
const Default = "tiny.yaml"

// NodeConfig is the example node config; every other file in FS is a run spec.
const NodeConfig = "node.yaml"

// Specs lists the names of the built-in run specs (the file names without .yaml),
// sorted.
func Specs() []string {
	files, _ := fs.Glob(FS, "*.yaml")
	var out []string
	for _, f := range files {
		if f != NodeConfig {
			out = append(out, strings.TrimSuffix(f, ".yaml"))
		}
	}
	slices.Sort(out)
	return out
}

// Spec returns the text of the built-in run spec called name ("tiny4" or
// "tiny4.yaml"), and the path it is known by in messages ("examples/tiny4.yaml").
func Spec(name string) (src []byte, path string, err error) {
	base := strings.TrimSuffix(name, ".yaml")
	if !slices.Contains(Specs(), base) {
		return nil, "", fmt.Errorf("%q is not a built-in example (built in: %s)", name, strings.Join(Specs(), ", "))
	}
	src, err = fs.ReadFile(FS, base+".yaml")
	return src, "examples/" + base + ".yaml", err
}
