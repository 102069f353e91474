// Package onednn multiplies matrices with oneDNN's matmul primitive, loaded at run
// time (Debian: libdnnl2) through shard/backend/dl, without cgo: float32, and bf16
// inputs with float32 accumulation. It speaks oneDNN 2.x's C API (the version
// Debian ships), whose memory descriptors are structs the caller owns; 3.x made them
// opaque handles and is not bound here.
package onednn

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"unsafe"

	"github.com/pipeswarm/pipeswarm/shard/backend/dl"
)

// Package is the Debian package that installs the library.
const Package = "libdnnl2"

// Sizes from oneDNN 2.x's dnnl_types.h (checked against 2.6.3 on x86-64): the
// memory and matmul descriptors are plain structs, 8-byte aligned, that the API
// fills in; Go only needs room for them.
type (
	memDesc    [696 / 8]uint64 // dnnl_memory_desc_t
	matmulDesc [2800 / 8]uint64
	execArg    struct { // dnnl_exec_arg_t
		arg int32
		mem uintptr
	}
	version struct { // dnnl_version_t
		major, minor, patch int32
		hash                uintptr
		cpuRuntime          uint32
		gpuRuntime          uint32
	}
)

const (
	engineCPU       = 1
	dtBF16          = 2
	dtF32           = 3
	tagAny          = 1
	scratchpadUser  = 1
	queryImplInfo   = 8
	queryWeightsMD  = 131
	queryScratchMD  = 136
	argSrc          = 1
	argWeights      = 33
	argDst          = 17
	argFrom         = 1
	argTo           = 17
	argScratchpad   = 80
	streamDefault   = 1
	runtimeOMP      = 2
	oneDNNMajorWant = 2
)

type api struct {
	engineCreate     func(e *uintptr, kind int32, index uintptr) int32
	mdByStrides      func(md *memDesc, ndims int32, dims *[12]int64, dt int32, strides *[12]int64) int32
	mdByTag          func(md *memDesc, ndims int32, dims *[12]int64, dt int32, tag int32) int32
	mdSize           func(md *memDesc) uintptr
	matmulDescInit   func(d *matmulDesc, src, weights, bias, dst *memDesc) int32
	attrCreate       func(a *uintptr) int32
	attrDestroy      func(a uintptr) int32
	attrScratchpad   func(a uintptr, mode int32) int32
	attrOutputScales func(a uintptr, count int64, mask int32, scales *float32) int32
	attrPostOps      func(a uintptr, po uintptr) int32
	postOpsCreate    func(po *uintptr) int32
	postOpsDestroy   func(po uintptr) int32
	postOpsAppendSum func(po uintptr, scale float32) int32
	pdCreate         func(pd *uintptr, op unsafe.Pointer, attr, engine, hint uintptr) int32
	pdDestroy        func(pd uintptr) int32
	pdQuery          func(pd uintptr, what, index int32, result unsafe.Pointer) int32
	pdQueryMD        func(pd uintptr, what, index int32) *memDesc
	reorderPDCreate  func(pd *uintptr, src *memDesc, srcEngine uintptr, dst *memDesc, dstEngine, attr uintptr) int32
	primitiveCreate  func(p *uintptr, pd uintptr) int32
	primitiveDestroy func(p uintptr) int32
	primitiveExecute func(p, stream uintptr, nargs int32, args *execArg) int32
	streamCreate     func(s *uintptr, engine uintptr, flags uint32) int32
	streamWait       func(s uintptr) int32
	memoryCreate     func(m *uintptr, md *memDesc, engine uintptr, handle unsafe.Pointer) int32
	memoryDestroy    func(m uintptr) int32
	effectiveISA     func() int32
	version          func() *version
	ompSetNumThreads func(int32) // from libgomp when oneDNN runs on OpenMP
}

// Lib is oneDNN, loaded, with its CPU engine.
type Lib struct {
	Version string // e.g. 2.6.3
	ISA     string // the instruction set oneDNN dispatches to here, e.g. avx512_core_bf16

	api
	engine uintptr

	mu    sync.Mutex
	cache map[Key]*Matmul
	idle  []*worker
}

var (
	once sync.Once
	lib  *Lib
	err  error
)

// Load opens oneDNN once per process and creates its CPU engine.
func Load() (*Lib, error) {
	once.Do(func() { lib, err = load() })
	return lib, err
}

func load() (*Lib, error) {
	h, err := dl.Open("libdnnl.so.2", "libdnnl.so.3", "libdnnl.so")
	if err != nil {
		return nil, fmt.Errorf("oneDNN not loaded: %w", err)
	}
	l := &Lib{cache: map[Key]*Matmul{}}
	if err := h.Func(&l.version, "dnnl_version"); err != nil {
		return nil, fmt.Errorf("oneDNN: %w", err)
	}
	v := l.version()
	l.Version = fmt.Sprintf("%d.%d.%d", v.major, v.minor, v.patch)
	if v.major != oneDNNMajorWant {
		return nil, fmt.Errorf("oneDNN %s (%s): pipeswarm speaks oneDNN 2.x's API; install %s", l.Version, h.Name, Package)
	}
	if err := h.Funcs(map[string]any{
		"dnnl_engine_create":                      &l.engineCreate,
		"dnnl_memory_desc_init_by_strides":        &l.mdByStrides,
		"dnnl_memory_desc_init_by_tag":            &l.mdByTag,
		"dnnl_memory_desc_get_size":               &l.mdSize,
		"dnnl_matmul_desc_init":                   &l.matmulDescInit,
		"dnnl_primitive_attr_create":              &l.attrCreate,
		"dnnl_primitive_attr_destroy":             &l.attrDestroy,
		"dnnl_primitive_attr_set_scratchpad_mode": &l.attrScratchpad,
		"dnnl_primitive_attr_set_output_scales":   &l.attrOutputScales,
		"dnnl_primitive_attr_set_post_ops":        &l.attrPostOps,
		"dnnl_post_ops_create":                    &l.postOpsCreate,
		"dnnl_post_ops_destroy":                   &l.postOpsDestroy,
		"dnnl_post_ops_append_sum":                &l.postOpsAppendSum,
		"dnnl_primitive_desc_create":              &l.pdCreate,
		"dnnl_primitive_desc_destroy":             &l.pdDestroy,
		"dnnl_primitive_desc_query":               &l.pdQuery,
		"dnnl_primitive_desc_query_md":            &l.pdQueryMD,
		"dnnl_reorder_primitive_desc_create":      &l.reorderPDCreate,
		"dnnl_primitive_create":                   &l.primitiveCreate,
		"dnnl_primitive_destroy":                  &l.primitiveDestroy,
		"dnnl_primitive_execute":                  &l.primitiveExecute,
		"dnnl_stream_create":                      &l.streamCreate,
		"dnnl_stream_wait":                        &l.streamWait,
		"dnnl_memory_create":                      &l.memoryCreate,
		"dnnl_memory_destroy":                     &l.memoryDestroy,
		"dnnl_get_effective_cpu_isa":              &l.effectiveISA,
	}); err != nil {
		return nil, fmt.Errorf("oneDNN %s: %w", l.Version, err)
	}
	// The OpenMP thread count is per OS thread: each call sets it to 1 on the thread
	// it runs on (the caller splits the work into fixed blocks itself).
	if v.cpuRuntime == runtimeOMP {
		gomp, err := dl.Open("libgomp.so.1")
		if err != nil {
			return nil, fmt.Errorf("oneDNN %s runs on OpenMP: %w", l.Version, err)
		}
		if err := gomp.Func(&l.ompSetNumThreads, "omp_set_num_threads"); err != nil {
			return nil, fmt.Errorf("oneDNN %s runs on OpenMP: %w", l.Version, err)
		}
	}
	l.ISA = isaName(l.effectiveISA())
	if st := l.engineCreate(&l.engine, engineCPU, 0); st != 0 {
		return nil, fmt.Errorf("oneDNN %s has no CPU engine: %w", l.Version, status(st))
	}
	return l, nil
}

func isaName(isa int32) string {
	switch isa {
	case 0x1:
		return "sse41"
	case 0x3:
		return "avx"
	case 0x7:
		return "avx2"
	case 0x407:
		return "avx2_vnni"
	case 0x27:
		return "avx512_core"
	case 0x67:
		return "avx512_core_vnni"
	case 0xe7:
		return "avx512_core_bf16"
	case 0x3e7:
		return "avx512_core_amx"
	}
	return fmt.Sprintf("isa 0x%x", isa)
}

// status is a dnnl_status_t other than success.
type status int32

func (s status) Error() string {
	names := map[status]string{1: "out of memory", 2: "invalid arguments", 3: "unimplemented",
		4: "iterator ends", 5: "runtime error", 6: "not required"}
	if n, ok := names[s]; ok {
		return "oneDNN: " + n
	}
	return fmt.Sprintf("oneDNN status %d", int32(s))
}

// Key is one matmul: c[M,N] = Alpha·op(a)·op(b) + Beta·c, row-major with row strides
// LDA, LDB, LDC. With BF16, a is bf16 (uint16) and b float32, which each run packs
// into the bf16 layout oneDNN's kernel wants (a reorder that rounds as it copies);
// without, both are float32. c is float32 either way.
type Key struct {
	BF16           bool
	M, N, K        int
	TransA, TransB bool
	LDA, LDB, LDC  int
	Alpha, Beta    float32
}

// Matmul is a compiled single-threaded matmul primitive for one Key.
type Matmul struct {
	Impl string // the implementation oneDNN chose, e.g. brg:avx512_core_bf16

	prim, pack              uintptr
	a, bUser, b, c, scratch memDesc
	scratchSize, bSize      int
}

// Matmul returns the primitive for k, compiling it the first time (oneDNN compiles a
// primitive per shape; a stage uses a few dozen, kept for the life of the process).
func (l *Lib) Matmul(k Key) (*Matmul, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if m, ok := l.cache[k]; ok {
		return m, nil
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	l.single()
	m, err := l.newMatmul(k)
	if err != nil {
		return nil, fmt.Errorf("oneDNN %s matmul %+v: %w", l.Version, k, err)
	}
	l.cache[k] = m
	return m, nil
}

// Matmuls lists the primitives compiled so far.
func (l *Lib) Matmuls() map[Key]*Matmul {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make(map[Key]*Matmul, len(l.cache))
	for k, m := range l.cache {
		out[k] = m
	}
	return out
}

func (l *Lib) single() {
	if l.ompSetNumThreads != nil {
		l.ompSetNumThreads(1)
	}
}

func dims(a, b int) *[12]int64 { return &[12]int64{int64(a), int64(b)} }

func (l *Lib) newMatmul(k Key) (_ *Matmul, err error) {
	m := &Matmul{}
	dt := int32(dtF32)
	if k.BF16 {
		dt = dtBF16
	}
	as := dims(k.LDA, 1)
	if k.TransA {
		as = dims(1, k.LDA)
	}
	bs := dims(k.LDB, 1)
	if k.TransB {
		bs = dims(1, k.LDB)
	}
	var (
		d         matmulDesc
		bAsked    memDesc
		attr, po  uintptr
		pd, rpd   uintptr
		impl      *byte
		st        int32
		firstFail = func(sts ...int32) int32 {
			for _, s := range sts {
				if s != 0 {
					return s
				}
			}
			return 0
		}
	)
	defer func() {
		if attr != 0 {
			l.attrDestroy(attr)
		}
		if po != 0 {
			l.postOpsDestroy(po)
		}
		if pd != 0 {
			l.pdDestroy(pd)
		}
		if rpd != 0 {
			l.pdDestroy(rpd)
		}
		if err != nil && m.pack != 0 {
			l.primitiveDestroy(m.pack)
		}
	}()
	if st = l.mdByStrides(&m.a, 2, dims(k.M, k.K), dt, as); st != 0 {
		return nil, status(st)
	}
	if st = l.mdByStrides(&m.bUser, 2, dims(k.K, k.N), dtF32, bs); st != 0 {
		return nil, status(st)
	}
	if st = l.mdByStrides(&m.c, 2, dims(k.M, k.N), dtF32, dims(k.LDC, 1)); st != 0 {
		return nil, status(st)
	}
	if k.BF16 {
		if st = l.mdByTag(&bAsked, 2, dims(k.K, k.N), dtBF16, tagAny); st != 0 {
			return nil, status(st)
		}
	} else {
		bAsked = m.bUser
	}
	if st = firstFail(l.matmulDescInit(&d, &m.a, &bAsked, nil, &m.c), l.attrCreate(&attr)); st != 0 {
		return nil, status(st)
	}
	// Each call brings its own scratchpad: oneDNN's shared one is not safe for
	// primitives running at once on several threads.
	if st = l.attrScratchpad(attr, scratchpadUser); st != 0 {
		return nil, status(st)
	}
	if k.Alpha != 1 {
		alpha := k.Alpha
		if st = l.attrOutputScales(attr, 1, 0, &alpha); st != 0 {
			return nil, status(st)
		}
	}
	if k.Beta != 0 {
		if st = l.postOpsCreate(&po); st != 0 {
			return nil, status(st)
		}
		if st = firstFail(l.postOpsAppendSum(po, k.Beta), l.attrPostOps(attr, po)); st != 0 {
			return nil, status(st)
		}
	}
	if st = l.pdCreate(&pd, unsafe.Pointer(&d), attr, l.engine, 0); st != 0 {
		return nil, status(st)
	}
	if l.pdQuery(pd, queryImplInfo, 0, unsafe.Pointer(&impl)) == 0 && impl != nil {
		m.Impl = cString(impl)
	}
	m.scratch = *l.pdQueryMD(pd, queryScratchMD, 0)
	m.scratchSize = int(l.mdSize(&m.scratch))
	m.b = *l.pdQueryMD(pd, queryWeightsMD, 0)
	if k.BF16 {
		m.bSize = int(l.mdSize(&m.b))
		if st = l.reorderPDCreate(&rpd, &m.bUser, l.engine, &m.b, l.engine, 0); st != 0 {
			return nil, status(st)
		}
		if st = l.primitiveCreate(&m.pack, rpd); st != 0 {
			return nil, status(st)
		}
	}
	if st = l.primitiveCreate(&m.prim, pd); st != 0 {
		return nil, status(st)
	}
	return m, nil
}

// cString copies the NUL-terminated C string at p.
func cString(p *byte) string {
	n := 0
	for *(*byte)(unsafe.Add(unsafe.Pointer(p), n)) != 0 {
		n++
	}
	return string(unsafe.Slice(p, n))
}

// worker is a stream with a scratchpad and a packed-b buffer, grown to the largest
// asked; one call uses one at a time.
type worker struct {
	stream          uintptr
	scratch, packed []byte
}

func (l *Lib) getWorker() (*worker, error) {
	l.mu.Lock()
	if n := len(l.idle); n > 0 {
		w := l.idle[n-1]
		l.idle = l.idle[:n-1]
		l.mu.Unlock()
		return w, nil
	}
	l.mu.Unlock()
	w := &worker{}
	if st := l.streamCreate(&w.stream, l.engine, streamDefault); st != 0 {
		return nil, status(st)
	}
	return w, nil
}

func (l *Lib) putWorker(w *worker) {
	l.mu.Lock()
	l.idle = append(l.idle, w)
	l.mu.Unlock()
}

// aligned returns a 64-byte aligned region of at least n bytes of *buf, growing it.
func aligned(buf *[]byte, n int) unsafe.Pointer {
	if len(*buf) < n+64 {
		*buf = make([]byte, n+64)
	}
	p := unsafe.Pointer(unsafe.SliceData(*buf))
	return unsafe.Add(p, (64-uintptr(p)%64)%64)
}

// ErrRun wraps a failed execution.
var ErrRun = errors.New("oneDNN matmul failed")

// Run computes m on the calling thread: a points at op(a)'s first element (uint16 for
// bf16, else float32), b and c at float32 ones; the caller keeps them valid.
func (l *Lib) Run(m *Matmul, a, b, c unsafe.Pointer) error {
	w, err := l.getWorker()
	if err != nil {
		return fmt.Errorf("%w: stream: %w", ErrRun, err)
	}
	defer l.putWorker(w)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	l.single()
	var ma, mb, mu, mc, ms uintptr
	defer func() {
		for _, x := range []uintptr{ma, mb, mu, mc, ms} {
			if x != 0 {
				l.memoryDestroy(x)
			}
		}
	}()
	var st int32
	if m.pack != 0 {
		if st = l.memoryCreate(&mu, &m.bUser, l.engine, b); st != 0 {
			return fmt.Errorf("%w: %w", ErrRun, status(st))
		}
		if st = l.memoryCreate(&mb, &m.b, l.engine, aligned(&w.packed, m.bSize)); st != 0 {
			return fmt.Errorf("%w: %w", ErrRun, status(st))
		}
		rargs := [2]execArg{{argFrom, mu}, {argTo, mb}}
		if st = l.primitiveExecute(m.pack, w.stream, 2, &rargs[0]); st != 0 {
			return fmt.Errorf("%w: packing b: %w", ErrRun, status(st))
		}
	} else if st = l.memoryCreate(&mb, &m.b, l.engine, b); st != 0 {
		return fmt.Errorf("%w: %w", ErrRun, status(st))
	}
	if st = l.memoryCreate(&ma, &m.a, l.engine, a); st != 0 {
		return fmt.Errorf("%w: %w", ErrRun, status(st))
	}
	if st = l.memoryCreate(&mc, &m.c, l.engine, c); st != 0 {
		return fmt.Errorf("%w: %w", ErrRun, status(st))
	}
	args := [4]execArg{{argSrc, ma}, {argWeights, mb}, {argDst, mc}}
	nargs := int32(3)
	if m.scratchSize > 0 {
		if st = l.memoryCreate(&ms, &m.scratch, l.engine, aligned(&w.scratch, m.scratchSize)); st != 0 {
			return fmt.Errorf("%w: %w", ErrRun, status(st))
		}
		args[3] = execArg{argScratchpad, ms}
		nargs = 4
	}
	if st = l.primitiveExecute(m.prim, w.stream, nargs, &args[0]); st == 0 {
		st = l.streamWait(w.stream)
	}
	runtime.KeepAlive(a)
	runtime.KeepAlive(b)
	runtime.KeepAlive(c)
	runtime.KeepAlive(w)
	if st != 0 {
		return fmt.Errorf("%w: %w", ErrRun, status(st))
	}
	return nil
}

// Describe names the library, its version and the ISA it dispatches to.
func (l *Lib) Describe() string { return fmt.Sprintf("oneDNN %s (ISA %s)", l.Version, l.ISA) }
