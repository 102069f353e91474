package main

import (
	"flag"
	"fmt"
	"log/slog"
	"strings"

	"github.com/pipeswarm/pipeswarm/shard/backend"
)

// gemmUsage is the --gemm flag's help, shared by the commands that compute.
var gemmUsage = "GEMM provider: " + strings.Join(backend.GEMMNames, ", ") +
	" (auto: pipeswarm's Go kernels, or oneDNN where libdnnl loads on a CPU with AVX2 but not AVX-512; OpenBLAS only when asked)"

func addGEMMFlag(fs *flag.FlagSet) *string { return fs.String("gemm", "auto", gemmUsage) }

// useGEMM makes name the process's GEMM provider and logs, once, a library that auto
// looked for and did not find.
func useGEMM(name string, log *slog.Logger) error {
	if name == "" {
		name = "auto"
	}
	g, err := backend.SetGEMM(name)
	if err != nil {
		return fmt.Errorf("--gemm %s: %w", name, err)
	}
	if name == "auto" {
		if _, note := backend.AutoGEMM(); note != "" {
			log.Info(note)
		}
	}
	log.Debug("GEMM provider", "gemm", g.Name, "impl", g.Describe())
	return nil
}
