package backend

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"unsafe"

	"golang.org/x/sys/cpu"

	"github.com/pipeswarm/pipeswarm/shard/backend/dl"
	"github.com/pipeswarm/pipeswarm/shard/backend/onednn"
	"github.com/pipeswarm/pipeswarm/shard/backend/openblas"
	"github.com/pipeswarm/pipeswarm/shard/compute"
)

// GEMM is a provider of the CPU backends' matrix products: pipeswarm's own Go
// kernels, or a library found at run time (oneDNN, OpenBLAS) plus the kernels that
// drive it. Every provider computes each of compute.Blocks's fixed blocks in one
// single-threaded call, so its results do not depend on the thread count; providers
// differ from each other by float32 rounding only.
type GEMM struct {
	Name    string // the --gemm value: go, onednn, openblas
	Library string // the library and its version ("oneDNN 2.6.3"), "" for the Go kernels
	ISA     string // the kernels or instruction set it runs: avx512, avx512_core_bf16, SkylakeX
	desc    string

	sgemm compute.SgemmFunc // float32, single-threaded
	// sgemm16 is a single-threaded GEMM of inputs rounded to bf16 with float32
	// accumulation, where the provider has its own; the bf16 backend rounds the
	// inputs itself for sgemm otherwise.
	sgemm16 compute.SgemmFunc
	dnnl    *onednn.Lib // set for oneDNN, which also multiplies bf16 natively
}

// Describe is the provider for the start-up log: "pipeswarm Go kernels, avx512",
// "oneDNN 2.6.3 matmul brg:avx512_core (ISA avx512_core_bf16)".
func (g *GEMM) Describe() string { return g.desc }

// provider is one entry of the registry: a name, the package that installs its
// library, and how to open it. A new accelerator (a GPU's driver and BLAS) is one
// more entry: a package that binds its library through shard/backend/dl, and a
// Backend whose kernels call it.
type provider struct {
	name string
	pkg  string // Debian package that installs the library; "" when none is needed
	open func() (*GEMM, error)
}

var providers = []provider{
	{"go", "", openGo},
	{"onednn", onednn.Package, openOneDNN},
	{"openblas", openblas.Package, openOpenBLAS},
}

// GEMMNames lists the --gemm values: auto and every provider, available here or not.
var GEMMNames = []string{"auto", "go", "onednn", "openblas"}

// ErrUnknownGEMM is wrapped by the error for a --gemm value that is no provider.
var ErrUnknownGEMM = errors.New("unknown GEMM provider")

var (
	gemmMu     sync.Mutex
	gemmOpened = map[string]gemmResult{}
)

type gemmResult struct {
	g   *GEMM
	err error
}

// OpenGEMM returns the provider called name ("auto" resolves by AutoGEMM), or an
// error wrapping ErrUnavailable that names the package to install. A provider is
// opened once per process.
func OpenGEMM(name string) (*GEMM, error) {
	if name == "auto" || name == "" {
		name, _ = AutoGEMM()
	}
	gemmMu.Lock()
	defer gemmMu.Unlock()
	if r, ok := gemmOpened[name]; ok {
		return r.g, r.err
	}
	for _, p := range providers {
		if p.name != name {
			continue
		}
		g, err := p.open()
		if err != nil {
			err = fmt.Errorf("%w: %w", ErrUnavailable, err)
			if p.pkg != "" && dl.Available {
				err = fmt.Errorf("%w; install it: apt-get install %s", err, p.pkg)
			}
		}
		gemmOpened[name] = gemmResult{g, err}
		return g, err
	}
	return nil, fmt.Errorf("%w %q (want one of %s)", ErrUnknownGEMM, name, strings.Join(GEMMNames, ", "))
}

// AutoGEMM is what --gemm auto picks, by a fixed rule that never measures (a run
// must be repeatable, and train and the nodes compute alike): the Go kernels on a CPU
// with AVX-512 (level with oneDNN's float32 matmul on the block's products, and with
// AVX512-BF16 faster than its bf16 one); oneDNN where it loads on a CPU with AVX2 but
// not AVX-512 (the Go kernels' AVX2 path is the less tuned); else the Go kernels.
// OpenBLAS only when asked: it takes some VMs' CPUs for a Prescott and runs its SSE3
// kernels there. note says why oneDNN was not taken where the rule wanted it ("" else).
func AutoGEMM() (name, note string) {
	if runtime.GOARCH != "amd64" || cpu.X86.HasAVX512F || !cpu.X86.HasAVX2 {
		return "go", ""
	}
	if !dl.Available {
		return "go", ""
	}
	if _, err := OpenGEMM("onednn"); err != nil {
		return "go", fmt.Sprintf("GEMM: %v; computing with pipeswarm's Go kernels", err)
	}
	return "onednn", ""
}

// ProviderStatus is what `pipeswarm version` lists for a provider.
type ProviderStatus struct {
	Name     string `json:"name"`
	Describe string `json:"describe,omitempty"`
	Error    string `json:"error,omitempty"`
}

// Providers reports every provider, available here or not, in registry order.
func Providers() []ProviderStatus {
	var out []ProviderStatus
	for _, p := range providers {
		s := ProviderStatus{Name: p.name}
		if g, err := OpenGEMM(p.name); err != nil {
			s.Error = err.Error()
		} else {
			s.Describe = g.Describe()
		}
		out = append(out, s)
	}
	return out
}

func openGo() (*GEMM, error) {
	isa := goKernelISA()
	return &GEMM{Name: "go", ISA: isa, desc: "pipeswarm Go kernels, " + isa, sgemm: goSgemm, sgemm16: compute.GoSgemmBF16}, nil
}

// goSgemm and goKernelISA are pipeswarm's own float32 kernels.
var goSgemm compute.SgemmFunc = compute.GoSgemm

func goKernelISA() string { return compute.GoKernelISA() }

// probe is a block-sized projection: which kernel a library picks for it shows
// in the start-up log, and a library that cannot run here fails at open, not mid-step.
var probe = onednn.Key{M: 512, N: 768, K: 256, TransB: true, LDA: 256, LDB: 256, LDC: 768, Alpha: 1}

func openOneDNN() (*GEMM, error) {
	l, err := onednn.Load()
	if err != nil {
		return nil, err
	}
	mm, err := l.Matmul(probe)
	if err != nil {
		return nil, err
	}
	return &GEMM{Name: "onednn", Library: "oneDNN " + l.Version, ISA: l.ISA, dnnl: l,
		desc: fmt.Sprintf("oneDNN %s matmul %s (ISA %s)", l.Version, mm.Impl, l.ISA),
		sgemm: func(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
			dnnlGemm(l, false, transA, transB, m, n, k, alpha, unsafe.Pointer(unsafe.SliceData(a)), lda, b, ldb, beta, c, ldc)
		}}, nil
}

// dnnlGemm runs one single-threaded oneDNN matmul; a is float32, or bf16 when bf16.
func dnnlGemm(l *onednn.Lib, bf16 bool, transA, transB bool, m, n, k int, alpha float32, a unsafe.Pointer, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	if m == 0 || n == 0 {
		return
	}
	mm, err := l.Matmul(onednn.Key{BF16: bf16, M: m, N: n, K: k, TransA: transA, TransB: transB,
		LDA: lda, LDB: ldb, LDC: ldc, Alpha: alpha, Beta: beta})
	if err != nil {
		panic(fmt.Sprintf("backend: %v", err)) // every shape of a valid stage is supported
	}
	if err := l.Run(mm, a, unsafe.Pointer(unsafe.SliceData(b)), unsafe.Pointer(unsafe.SliceData(c))); err != nil {
		panic(fmt.Sprintf("backend: %v", err))
	}
}

func openOpenBLAS() (*GEMM, error) {
	l, err := openblas.Load()
	if err != nil {
		return nil, err
	}
	return &GEMM{Name: "openblas", Library: "OpenBLAS " + l.Version, ISA: l.Core, desc: l.Describe(), sgemm: l.Sgemm}, nil
}
