// Package backend is the seam between a stage and the hardware it computes on: every
// operation a stage's forward and backward need (the projections' GEMMs, batched
// attention with its causal softmax, RMSNorm, RoPE, SwiGLU, cross-entropy, the
// embedding gather and scatter, residual adds), and the projections into a residual
// subspace that bracket its optimiser step, over buffers the backend owns. A stage
// holds only Buf handles, so a device backend can keep its tensors in device memory;
// host []float32 meets a Buf only through Mirror, Upload and Download.
//
// Two backends exist, named by precision: cpu32 (float32 throughout) and bf16 (GEMM
// inputs rounded to bfloat16 with float32 accumulation, everything else float32, as
// PyTorch's CPU autocast does it). Their GEMMs come from a provider (gemm.go):
// pipeswarm's own Go kernels, or oneDNN or OpenBLAS when the library is installed,
// loaded at run time without cgo (shard/backend/dl). Every provider cuts every GEMM
// into the same fixed blocks whatever the thread count, so results do not depend on
// it.
package backend

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
)

// Buf is a float32 buffer owned by a backend. Only the backend that made it may read
// or write it; the caller knows only its length.
type Buf interface{ Len() int }

// Backend computes a stage's kernels. Shapes are given as [rows, cols], row-major;
// N = batch·seq tokens, d the model width, F the SwiGLU width, V the vocabulary.
// Kernels panic on a Buf from another backend (a programmer error). A Backend is
// safe for concurrent use by stages that do not share buffers.
type Backend interface {
	Name() string      // "cpu32" or "bf16"
	Precision() string // what the GEMM inputs are rounded to: "fp32" or "bf16"
	Describe() string  // the implementation and ISA in use, for the start-up log
	GEMM() *GEMM       // the provider of its matrix products

	// Alloc returns a zeroed buffer of n values.
	Alloc(n int) Buf
	// Mirror returns a buffer of len(host) values that Upload and Download keep in
	// step with host; a host backend returns host itself, so both are then free.
	Mirror(host []float32) Buf
	// View is b[off : off+n], sharing b's storage.
	View(b Buf, off, n int) Buf
	Upload(dst Buf, src []float32)   // dst ← src, len(src) ≤ dst.Len()
	Download(dst []float32, src Buf) // dst ← src, len(dst) ≤ src.Len()
	Zero(b Buf)

	// Linear: y[N,out] = x[N,in]·Wᵀ, W[out,in].
	Linear(y, x, w Buf, n, in, out int)
	// LinearBackward: dW[out,in] += dyᵀ·x; dx[N,in] = dy·W, or += when accumulate.
	LinearBackward(dx, dw, dy, x, w Buf, n, in, out int, accumulate bool)
	// RMSNorm: out[N,d] = w[d]·x/√(mean(x²)+eps); rstd[N] saved for the backward.
	RMSNorm(out, rstd, x, w Buf, n, d int, eps float32)
	// RMSNormBackward: dx[N,d] += ∂L/∂x, dw[d] += ∂L/∂w from dout and the saved x, rstd.
	RMSNormBackward(dx, dw, dout, x, rstd, w Buf, n, d int)
	// RoPE rotates the q and k thirds of qkv[N,3d] in place by the tables cos, sin
	// [seqLen, headDim/2] (Llama's rotate_half); inverse rotates back, which is the
	// backward pass since the rotation is orthogonal.
	RoPE(qkv, cos, sin Buf, n, seqLen, nHeads, headDim int, inverse bool)
	// Attention: per (batch, head), P = causal softmax(Q·Kᵀ/√hd) into p[B·H,T,T]
	// (zero above the diagonal), att[N,d] = P·V, from the roped q|k|v in qkv[N,3d].
	// It is one operation (two batched GEMMs and a softmax) so a device can fuse it.
	Attention(att, p, qkv Buf, b, t, nHeads, headDim int)
	// AttentionBackward: dqkv[N,3d] from datt[N,d] and the saved p, qkv.
	AttentionBackward(dqkv, datt, p, qkv Buf, b, t, nHeads, headDim int)
	// SwiGLU: m[N,F] = silu(gate)·up, where gu[N,2F] holds gate | up per row.
	SwiGLU(m, gu Buf, n, f int)
	// SwiGLUBackward: dgu[N,2F] from dm[N,F] and the saved gu.
	SwiGLUBackward(dgu, dm, gu Buf, n, f int)
	// Embed: x[N,d] = table[tokens[i]].
	Embed(x, table Buf, tokens []int32, d int)
	// EmbedBackward: dtable[tokens[i]] += dx[i].
	EmbedBackward(dtable, dx Buf, tokens []int32, d int)
	// CrossEntropy returns the mean over N rows of −log softmax(logits)[target] and
	// overwrites logits[N,V] with its gradient times scale: (softmax − onehot)·scale/N.
	CrossEntropy(logits Buf, targets []int32, v int, scale float32) float64
	// Add: dst += src.
	Add(dst, src Buf)

	// ProjectCols: w[d,cols] ← U·(Uᵀ·w), every column of w into span(U), where
	// U[d,k] has orthonormal columns; t[k,cols] is scratch.
	ProjectCols(w, u, t Buf, d, k, cols int)
	// ProjectRows: e[rows,d] ← base + (e − base)·U·Uᵀ, each row's difference from
	// base[rows,d] into span(U) (base nil: zero); t[rows,k] is scratch.
	// Both projections are float32 on every backend: they keep a stage's parameters
	// and gradients in the run's residual subspace, where every replica's must agree.
	ProjectRows(e, base, u, t Buf, rows, d, k int)
}

// ErrUnavailable is wrapped by Open's error for a backend this binary or this CPU
// cannot run.
var ErrUnavailable = errors.New("backend unavailable")

// ErrUnknown is wrapped by Open's error for a name that is no backend.
var ErrUnknown = errors.New("unknown backend")

// Names lists every backend this code base has, available here or not.
var Names = []string{"cpu32", "bf16"}

// ForPrecision names the backend that computes at precision p ("fp32" or "bf16").
func ForPrecision(p string) (string, error) {
	switch p {
	case "fp32":
		return "cpu32", nil
	case "bf16":
		return "bf16", nil
	}
	return "", fmt.Errorf("%w: no backend for precision %q (want fp32 or bf16)", ErrUnknown, p)
}

// PrecisionOf is the precision backend name computes in, whether or not it can run
// here (a launcher picks it for nodes elsewhere).
func PrecisionOf(name string) (string, error) {
	switch name {
	case "cpu32":
		return "fp32", nil
	case "bf16":
		return "bf16", nil
	}
	return "", fmt.Errorf("%w %q (have %s)", ErrUnknown, name, strings.Join(Names, ", "))
}

// Open returns the backend called name with the process's GEMM provider (SetGEMM;
// auto unless set), or an error saying why it cannot run here (and what to install).
func Open(name string) (Backend, error) { return OpenWith(name, processGEMM()) }

var (
	gemmChoiceMu sync.Mutex
	gemmChoice   = "auto"
)

func processGEMM() string {
	gemmChoiceMu.Lock()
	defer gemmChoiceMu.Unlock()
	return gemmChoice
}

// ProcessGEMM is the provider Open gives this process's backends.
func ProcessGEMM() (*GEMM, error) { return OpenGEMM(processGEMM()) }

// SetGEMM makes the provider called name (one of GEMMNames) the one Open gives every
// backend of this process: a node's or a trainer's --gemm. It returns the provider,
// or an error wrapping ErrUnavailable (naming the package to install) or
// ErrUnknownGEMM, leaving the choice as it was.
func SetGEMM(name string) (*GEMM, error) {
	g, err := OpenGEMM(name)
	if err != nil {
		return nil, err
	}
	gemmChoiceMu.Lock()
	defer gemmChoiceMu.Unlock()
	gemmChoice = name
	return g, nil
}

// OpenWith returns the backend called name computing its GEMMs with the provider
// called gemm (one of GEMMNames).
func OpenWith(name, gemm string) (Backend, error) {
	if name != "cpu32" && name != "bf16" {
		return nil, fmt.Errorf("%w %q (have %s)", ErrUnknown, name, strings.Join(Names, ", "))
	}
	g, err := OpenGEMM(gemm)
	if err != nil {
		return nil, err
	}
	if name == "bf16" {
		return openBF16(g)
	}
	return cpu32{g: g}, nil
}

// Available lists the backends Open can return on this machine, in Names order.
func Available() []string {
	var out []string
	for _, n := range Names {
		if _, err := Open(n); err == nil {
			out = append(out, n)
		}
	}
	return out
}

// Precisions lists the precisions (fp32, bf16) of the backends available here.
func Precisions() []string {
	var out []string
	for _, n := range Available() {
		b, _ := Open(n)
		if !slices.Contains(out, b.Precision()) {
			out = append(out, b.Precision())
		}
	}
	return out
}
