// Package examples holds run specs and node configs that work as they are. They are
// embedded in the binary so `pipeswarm train` runs with no file at all.
package examples

import "embed"

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
