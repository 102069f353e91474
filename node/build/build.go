// Package build says which pipeswarm this binary is: module version, VCS commit, Go,
// the GEMM providers and compute backends it finds and the wire protocols it speaks. `pipeswarm version`
// prints it, nodes put it in their heartbeats and on their status page, so that two
// peers can be checked for a match.
package build

import (
	"runtime"
	"runtime/debug"

	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/corpus"
	"github.com/pipeswarm/pipeswarm/p2p/reduce"
	"github.com/pipeswarm/pipeswarm/shard/backend"
)

// Info is this binary's build.
type Info struct {
	Version  string `json:"version"`
	Commit   string `json:"commit,omitempty"`
	Modified bool   `json:"modified,omitempty"`
	Go       string `json:"go"`
	Platform string `json:"platform"`
	// GEMM is the provider --gemm auto picks here, described ("oneDNN 2.6.3 matmul
	// brg:avx512_core (ISA avx512_core_bf16)", "pipeswarm Go kernels, avx512").
	GEMM string `json:"gemm"`
	// Providers are every GEMM provider, with its version and kernels or why it is
	// not available here.
	Providers []backend.ProviderStatus `json:"providers,omitempty"`
	// Backends are the compute backends this binary can run here, "name: what it is"
	// (implementation and ISA), cpu32 first.
	Backends  []string `json:"backends,omitempty"`
	Protocols []string `json:"protocols"`
}

// Read gathers the build information of the running binary.
func Read() Info {
	v := Info{Version: "(devel)", Go: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH, Protocols: Protocols(),
		Providers: backend.Providers()}
	if g, err := backend.OpenGEMM("auto"); err == nil {
		v.GEMM = g.Describe()
	}
	for _, name := range backend.Available() {
		if be, err := backend.Open(name); err == nil {
			v.Backends = append(v.Backends, name+": "+be.Describe())
		}
	}
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

// Protocols are the stream protocols a node speaks, in a fixed order.
func Protocols() []string {
	return []string{string(p2p.ProtoControl), string(p2p.ProtoActivation), string(p2p.ProtoGradient), string(p2p.ProtoWeights), string(reduce.Proto), string(corpus.Proto)}
}

// Short is the version and, when known, the first 12 digits of the commit, with a
// "+" for a modified tree: "v0.3.0", "(devel) 1a2b3c4d5e6f+".
func (i Info) Short() string {
	s := i.Version
	if c := i.Commit; c != "" {
		if len(c) > 12 {
			c = c[:12]
		}
		s += " " + c
		if i.Modified {
			s += "+"
		}
	}
	return s
}
