package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"runtime"
	"runtime/debug"

	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/corpus"
	"github.com/pipeswarm/pipeswarm/p2p/reduce"
	"github.com/pipeswarm/pipeswarm/shard/compute"
)

// versionInfo is what `pipeswarm version` reports: enough to tell two builds apart and
// whether two nodes speak the same protocols.
type versionInfo struct {
	Version   string   `json:"version"`
	Commit    string   `json:"commit,omitempty"`
	Modified  bool     `json:"modified,omitempty"`
	Go        string   `json:"go"`
	Platform  string   `json:"platform"`
	BLAS      string   `json:"blas"`
	Protocols []string `json:"protocols"`
}

func buildVersion() versionInfo {
	v := versionInfo{Version: "(devel)", Go: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH, BLAS: compute.Backend(),
		Protocols: []string{string(p2p.ProtoControl), string(p2p.ProtoActivation), string(p2p.ProtoGradient), string(reduce.Proto), string(corpus.Proto)}}
	if bi, ok := debug.ReadBuildInfo(); ok {
		if bi.Main.Version != "" {
			v.Version = bi.Main.Version
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				v.Commit = s.Value
			case "vcs.modified":
				v.Modified = s.Value == "true"
			}
		}
	}
	return v
}

func runVersion(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("version", "version [--json]", `
Print the build: module version, VCS commit, Go version, the BLAS compute runs on, and
the wire protocols this binary speaks.`, stderr)
	asJSON := fs.Bool("json", false, "print one JSON object")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		fmt.Fprintf(stderr, "pipeswarm version: unexpected arguments %q\n", pos)
		return errUsage
	}
	v := buildVersion()
	if *asJSON {
		return json.NewEncoder(stdout).Encode(v)
	}
	commit := v.Commit
	if commit == "" {
		commit = "unknown"
	} else if v.Modified {
		commit += " (modified)"
	}
	fmt.Fprintf(stdout, "pipeswarm %s\ncommit    %s\ngo        %s %s\nblas      %s\nprotocols %v\n", v.Version, commit, v.Go, v.Platform, v.BLAS, v.Protocols)
	return nil
}
