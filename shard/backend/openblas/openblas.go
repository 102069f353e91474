// Package openblas multiplies float32 matrices with OpenBLAS's cblas_sgemm, loaded
// at run time (Debian: libopenblas0) through shard/backend/dl, without cgo.
package openblas

import (
	"fmt"
	"strings"
	"sync"
	"unsafe"

	"github.com/pipeswarm/pipeswarm/shard/backend/dl"
)

// Package is the Debian package that installs the library.
const Package = "libopenblas0"

// Lib is OpenBLAS, loaded.
type Lib struct {
	Version string // e.g. 0.3.21
	Core    string // the kernels OpenBLAS chose for this CPU, e.g. SkylakeX (or Prescott on some VMs)

	sgemm func(order, transA, transB, m, n, k int32, alpha float32, a unsafe.Pointer, lda int32,
		b unsafe.Pointer, ldb int32, beta float32, c unsafe.Pointer, ldc int32)
}

var (
	once sync.Once
	lib  *Lib
	err  error
)

// Load opens OpenBLAS once per process and sets it single-threaded: callers split
// their products into fixed blocks themselves (results then do not depend on the
// thread count), and OpenBLAS's pool would only compete with them.
func Load() (*Lib, error) {
	once.Do(func() { lib, err = load() })
	return lib, err
}

func load() (*Lib, error) {
	h, err := dl.Open("libopenblas.so.0", "libopenblas.so")
	if err != nil {
		return nil, fmt.Errorf("OpenBLAS not loaded: %w", err)
	}
	var (
		l          Lib
		setThreads func(int32)
		config     func() string
		corename   func() string
	)
	if err := h.Funcs(map[string]any{"cblas_sgemm": &l.sgemm, "openblas_set_num_threads": &setThreads,
		"openblas_get_config": &config, "openblas_get_corename": &corename}); err != nil {
		return nil, fmt.Errorf("OpenBLAS: %w", err)
	}
	setThreads(1)
	// The config string reads "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY SkylakeX MAX_THREADS=64".
	if f := strings.Fields(config()); len(f) > 1 && f[0] == "OpenBLAS" {
		l.Version = f[1]
	}
	l.Core = corename()
	return &l, nil
}

// Describe names the library, its version and its kernels.
func (l *Lib) Describe() string { return fmt.Sprintf("OpenBLAS %s, %s kernels", l.Version, l.Core) }

const (
	rowMajor = 101
	noTrans  = 111
	trans    = 112
)

func tr(t bool) int32 {
	if t {
		return trans
	}
	return noTrans
}

// Sgemm is c = alpha·op(a)·op(b) + beta·c for row-major matrices on the calling
// thread, as compute.Sgemm.
func (l *Lib) Sgemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	if m == 0 || n == 0 {
		return
	}
	// Bounds: the last element each operand's view reaches must exist.
	ra, ca := m, k
	if transA {
		ra, ca = k, m
	}
	rb, cb := k, n
	if transB {
		rb, cb = n, k
	}
	if k > 0 {
		_ = a[(ra-1)*lda+ca-1]
		_ = b[(rb-1)*ldb+cb-1]
	}
	_ = c[(m-1)*ldc+n-1]
	l.sgemm(rowMajor, tr(transA), tr(transB), int32(m), int32(n), int32(k), alpha, unsafe.Pointer(unsafe.SliceData(a)), int32(lda),
		unsafe.Pointer(unsafe.SliceData(b)), int32(ldb), beta, unsafe.Pointer(unsafe.SliceData(c)), int32(ldc))
}
