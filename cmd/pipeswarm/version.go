package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"

	"github.com/pipeswarm/pipeswarm/node/build"
)

func runVersion(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("version", "version [--json]", `
Print the build: module version, VCS commit, Go version, the GEMM providers found here
(pipeswarm's Go kernels; oneDNN and OpenBLAS when installed) with their versions and
kernels, the one --gemm auto picks, and the wire protocols this binary speaks.`, stderr)
	asJSON := fs.Bool("json", false, "print one JSON object")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		fmt.Fprintf(stderr, "pipeswarm version: unexpected arguments %q\n", pos)
		return errUsage
	}
	v := build.Read()
	if *asJSON {
		return json.NewEncoder(stdout).Encode(v)
	}
	commit := v.Commit
	if commit == "" {
		commit = "unknown"
	} else if v.Modified {
		commit += " (modified)"
	}
	fmt.Fprintf(stdout, "pipeswarm %s\ncommit    %s\ngo        %s %s\ngemm      %s (--gemm auto)\n", v.Version, commit, v.Go, v.Platform, v.GEMM)
	for _, p := range v.Providers {
		if p.Error != "" {
			fmt.Fprintf(stdout, "  %-9s not available: %s\n", p.Name, p.Error)
		} else {
			fmt.Fprintf(stdout, "  %-9s %s\n", p.Name, p.Describe)
		}
	}
	for _, b := range v.Backends {
		fmt.Fprintf(stdout, "backend   %s\n", b)
	}
	fmt.Fprintf(stdout, "protocols %v\n", v.Protocols)
	return nil
}
