//go:build cgo && !purego && !nodnnl

package backend

/*
#cgo CFLAGS: -O3
#cgo LDFLAGS: -ldnnl -lgomp
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <oneapi/dnnl/dnnl.h>

// Debian's oneDNN runs on OpenMP; every call from here runs on one thread (the Go side
// splits the work into fixed blocks), and the thread count is per OS thread, so each
// entry point sets it first.
void omp_set_num_threads(int);

static dnnl_engine_t pw_engine;

static int pw_init(void) { return dnnl_engine_create(&pw_engine, dnnl_cpu, 0); }

typedef struct {
	dnnl_primitive_t prim, pack;
	dnnl_memory_desc_t a, bUser, b, c, scratch;
	size_t scratchSize, bSize;
} pw_mm;

// pw_mm_new makes a single-threaded matmul c[M,N] = alpha·op(a)·op(b) + beta·c, c f32,
// row-major with leading dimensions lda, ldb, ldc. With bf16, a is bf16 and b is f32:
// each run packs b into the bf16 layout oneDNN's kernel wants (a reorder that rounds
// as it copies) instead of letting the kernel repack a plain b over and over. Without,
// both are f32 and used as they are.
static int pw_mm_new(pw_mm **out, int bf16, int64_t M, int64_t N, int64_t K, int ta, int tb,
		int64_t lda, int64_t ldb, int64_t ldc, float alpha, float beta, char *impl, int implLen) {
	omp_set_num_threads(1);
	pw_mm *m = calloc(1, sizeof *m);
	if (!m) return dnnl_out_of_memory;
	dnnl_data_type_t dt = bf16 ? dnnl_bf16 : dnnl_f32;
	dnnl_dims_t ad = {M, K}, as = {ta ? 1 : lda, ta ? lda : 1};
	dnnl_dims_t bd = {K, N}, bs = {tb ? 1 : ldb, tb ? ldb : 1};
	dnnl_dims_t cd = {M, N}, cs = {ldc, 1};
	dnnl_status_t st;
	dnnl_matmul_desc_t d;
	dnnl_memory_desc_t bAsked;
	dnnl_primitive_attr_t attr = NULL;
	dnnl_post_ops_t po = NULL;
	dnnl_primitive_desc_t pd = NULL, rpd = NULL;
	if ((st = dnnl_memory_desc_init_by_strides(&m->a, 2, ad, dt, as)) ||
	    (st = dnnl_memory_desc_init_by_strides(&m->bUser, 2, bd, dnnl_f32, bs)) ||
	    (st = dnnl_memory_desc_init_by_strides(&m->c, 2, cd, dnnl_f32, cs)))
		goto fail;
	if (bf16)
		st = dnnl_memory_desc_init_by_tag(&bAsked, 2, bd, dnnl_bf16, dnnl_format_tag_any);
	else
		bAsked = m->bUser;
	if (st ||
	    (st = dnnl_matmul_desc_init(&d, &m->a, &bAsked, NULL, &m->c)) ||
	    (st = dnnl_primitive_attr_create(&attr)) ||
	    // Each call brings its own scratchpad: oneDNN's shared one is not safe for
	    // primitives running at once on several threads.
	    (st = dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user)))
		goto fail;
	if (alpha != 1 && (st = dnnl_primitive_attr_set_output_scales(attr, 1, 0, &alpha)))
		goto fail;
	if (beta != 0 && ((st = dnnl_post_ops_create(&po)) || (st = dnnl_post_ops_append_sum(po, beta)) ||
	                  (st = dnnl_primitive_attr_set_post_ops(attr, po))))
		goto fail;
	if ((st = dnnl_primitive_desc_create(&pd, &d, attr, pw_engine, NULL)))
		goto fail;
	const char *s = NULL;
	if (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &s) == dnnl_success && s) {
		strncpy(impl, s, implLen - 1);
		impl[implLen - 1] = 0;
	}
	m->scratch = *dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
	m->scratchSize = dnnl_memory_desc_get_size(&m->scratch);
	m->b = *dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
	if (bf16) {
		m->bSize = dnnl_memory_desc_get_size(&m->b);
		if ((st = dnnl_reorder_primitive_desc_create(&rpd, &m->bUser, pw_engine, &m->b, pw_engine, NULL)) ||
		    (st = dnnl_primitive_create(&m->pack, rpd)))
			goto fail;
		dnnl_primitive_desc_destroy(rpd);
		rpd = NULL;
	}
	if ((st = dnnl_primitive_create(&m->prim, pd)))
		goto fail;
	dnnl_primitive_desc_destroy(pd);
	dnnl_primitive_attr_destroy(attr);
	if (po) dnnl_post_ops_destroy(po);
	*out = m;
	return 0;
fail:
	if (m->pack) dnnl_primitive_destroy(m->pack);
	if (rpd) dnnl_primitive_desc_destroy(rpd);
	if (pd) dnnl_primitive_desc_destroy(pd);
	if (attr) dnnl_primitive_attr_destroy(attr);
	if (po) dnnl_post_ops_destroy(po);
	free(m);
	return st;
}

// Each OS thread keeps its stream, a scratchpad and a packed-b buffer, grown to the
// largest asked.
static __thread dnnl_stream_t pw_stream;
static __thread void *pw_scratch, *pw_packed;
static __thread size_t pw_scratchSize, pw_packedSize;

static int pw_grow(void **buf, size_t *have, size_t want) {
	if (*have >= want) return 0;
	free(*buf);
	*have = (want + 63) / 64 * 64;
	if (!(*buf = aligned_alloc(64, *have))) {
		*have = 0;
		return dnnl_out_of_memory;
	}
	return 0;
}

static int pw_mm_run(pw_mm *m, void *a, void *b, float *c) {
	omp_set_num_threads(1);
	dnnl_memory_t ma = NULL, mb = NULL, mu = NULL, mc = NULL, ms = NULL;
	dnnl_status_t st;
	int nargs = 3;
	if (!pw_stream && (st = dnnl_stream_create(&pw_stream, pw_engine, dnnl_stream_default_flags)))
		return st;
	dnnl_stream_t s = pw_stream;
	if (m->pack) {
		if ((st = pw_grow(&pw_packed, &pw_packedSize, m->bSize)) ||
		    (st = dnnl_memory_create(&mu, &m->bUser, pw_engine, b)) ||
		    (st = dnnl_memory_create(&mb, &m->b, pw_engine, pw_packed)))
			goto out;
		dnnl_exec_arg_t rargs[2] = {{DNNL_ARG_FROM, mu}, {DNNL_ARG_TO, mb}};
		if ((st = dnnl_primitive_execute(m->pack, s, 2, rargs)))
			goto out;
	} else if ((st = dnnl_memory_create(&mb, &m->b, pw_engine, b)))
		goto out;
	if ((st = dnnl_memory_create(&ma, &m->a, pw_engine, a)) ||
	    (st = dnnl_memory_create(&mc, &m->c, pw_engine, c)))
		goto out;
	dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}};
	if (m->scratchSize > 0) {
		if ((st = pw_grow(&pw_scratch, &pw_scratchSize, m->scratchSize)) ||
		    (st = dnnl_memory_create(&ms, &m->scratch, pw_engine, pw_scratch)))
			goto out;
		args[nargs++] = (dnnl_exec_arg_t){DNNL_ARG_SCRATCHPAD, ms};
	}
	if ((st = dnnl_primitive_execute(m->prim, s, nargs, args)) == dnnl_success)
		st = dnnl_stream_wait(s);
out:
	if (ma) dnnl_memory_destroy(ma);
	if (mb) dnnl_memory_destroy(mb);
	if (mu) dnnl_memory_destroy(mu);
	if (mc) dnnl_memory_destroy(mc);
	if (ms) dnnl_memory_destroy(ms);
	return st;
}

// pw_to_bf16 rounds src[rows, cols] (row stride ld) to bfloat16, nearest-even, into the
// contiguous dst[rows, cols]. Branch-free so the compiler vectorises it; the one
// instruction AVX512-BF16 has for it (vcvtneps2bf16) rounds the same way.
static void pw_to_bf16(uint16_t *restrict dst, const float *restrict src, int64_t rows, int64_t cols, int64_t ld) {
	for (int64_t r = 0; r < rows; r++) {
		const float *s = src + r * ld;
		uint16_t *d = dst + r * cols;
		for (int64_t j = 0; j < cols; j++) {
			uint32_t u;
			memcpy(&u, &s[j], 4);
			uint32_t rounded = (u + 0x7fff + ((u >> 16) & 1)) >> 16;
			uint32_t nan = (u >> 16) | 0x40; // a NaN stays a NaN
			d[j] = (uint16_t)((u & 0x7fffffff) > 0x7f800000 ? nan : rounded);
		}
	}
}

static int pw_isa(void) { return (int)dnnl_get_effective_cpu_isa(); }
static const char *pw_version(void) {
	static char v[32];
	const dnnl_version_t *x = dnnl_version();
	snprintf(v, sizeof v, "%d.%d.%d", x->major, x->minor, x->patch);
	return v;
}
*/
import "C"

import (
	"fmt"
	"sync"
	"unsafe"

	"github.com/pipeswarm/pipeswarm/shard/compute"
)

// bf16 is mixed precision as PyTorch's CPU autocast does it: the inputs of every GEMM
// (projections and attention) are rounded to bfloat16 and multiplied by oneDNN with
// float32 accumulation into float32 outputs; norms, RoPE, softmax, SwiGLU and the
// loss are float32 (the host kernels cpu32 uses), and so are the master weights,
// gradients and everything a stage stores.
type bf16 struct {
	hostMemory
	desc string
}

var (
	dnnlOnce sync.Once
	dnnlBF16 *bf16
	dnnlErr  error

	mmMu    sync.Mutex
	mmCache = map[mmKey]mmEntry{}
)

func init() {
	// cpu32 multiplies with oneDNN's float32 matmul when oneDNN works on this CPU.
	impl, err := dnnlStart()
	if err != nil {
		return
	}
	fp32GEMM.gemm = func(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
		gemm32(true, transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
	}
	fp32GEMM.serial = func(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
		gemm32(false, transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
	}
	fp32GEMM.describe = func() string {
		return fmt.Sprintf("oneDNN %s matmul %s (ISA %s)", C.GoString(C.pw_version()), impl, isaName(int(C.pw_isa())))
	}
}

var (
	startOnce sync.Once
	startImpl string
	startErr  error
)

// dnnlStart creates oneDNN's CPU engine and one float32 matmul, reporting its kernel.
func dnnlStart() (string, error) {
	startOnce.Do(func() {
		if st := C.pw_init(); st != 0 {
			startErr = fmt.Errorf("oneDNN has no CPU engine (status %d)", int(st))
			return
		}
		_, startImpl, startErr = matmul(mmKey{m: 512, n: 768, k: 256, transB: true, lda: 256, ldb: 256, ldc: 768, alpha: 1})
	})
	return startImpl, startErr
}

func openBF16() (Backend, error) {
	dnnlOnce.Do(func() {
		if _, err := dnnlStart(); err != nil {
			dnnlErr = fmt.Errorf("%w: bf16: %v", ErrUnavailable, err)
			return
		}
		// A block-sized linear shows which kernel oneDNN picks on this CPU; a CPU it
		// cannot do bf16 on fails here rather than mid-step.
		_, impl, err := matmul(mmKey{bf16: true, m: 512, n: 768, k: 256, transB: true, lda: 256, ldb: 256, ldc: 768, alpha: 1})
		if err != nil {
			dnnlErr = fmt.Errorf("%w: bf16: oneDNN %s cannot multiply bf16 matrices on this CPU (ISA %s): %v",
				ErrUnavailable, C.GoString(C.pw_version()), isaName(int(C.pw_isa())), err)
			return
		}
		dnnlBF16 = &bf16{desc: fmt.Sprintf("bf16 GEMM inputs, float32 accumulation; oneDNN %s, ISA %s, matmul %s",
			C.GoString(C.pw_version()), isaName(int(C.pw_isa())), impl)}
	})
	if dnnlErr != nil {
		return nil, dnnlErr
	}
	return dnnlBF16, nil
}

func isaName(isa int) string {
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

func (*bf16) Name() string       { return "bf16" }
func (*bf16) Precision() string  { return "bf16" }
func (b *bf16) Describe() string { return b.desc }

// mmKey is one matmul shape; oneDNN compiles a primitive per shape, kept for the
// life of the process (a stage uses a few dozen: each projection both ways, each
// block shape, the attention products).
type mmKey struct {
	bf16           bool
	m, n, k        int
	transA, transB bool
	lda, ldb, ldc  int
	alpha, beta    float32
}

func matmul(key mmKey) (*C.pw_mm, string, error) {
	mmMu.Lock()
	defer mmMu.Unlock()
	if e, ok := mmCache[key]; ok {
		return e.mm, e.impl, nil
	}
	var impl [128]C.char
	var m *C.pw_mm
	st := C.pw_mm_new(&m, cbool(key.bf16), C.int64_t(key.m), C.int64_t(key.n), C.int64_t(key.k),
		cbool(key.transA), cbool(key.transB), C.int64_t(key.lda), C.int64_t(key.ldb), C.int64_t(key.ldc),
		C.float(key.alpha), C.float(key.beta), &impl[0], C.int(len(impl)))
	if st != 0 {
		return nil, "", fmt.Errorf("oneDNN matmul %+v: status %d", key, int(st))
	}
	name := C.GoString(&impl[0])
	mmCache[key] = mmEntry{m, name}
	return m, name, nil
}

type mmEntry struct {
	mm   *C.pw_mm
	impl string // the implementation oneDNN chose, e.g. brg:avx512_core_bf16
}

func cbool(b bool) C.int {
	if b {
		return 1
	}
	return 0
}

// scratch16 holds bf16 copies of GEMM operands; pooled, as attention asks for small
// ones hundreds of times a step.
var scratch16 = sync.Pool{New: func() any { return new([]uint16) }}

func getScratch(n int) *[]uint16 {
	p := scratch16.Get().(*[]uint16)
	if cap(*p) < n {
		*p = make([]uint16, n)
	}
	*p = (*p)[:n]
	return p
}

// toBF16 rounds x[rows, cols] (row stride ld) into the contiguous dst, split over the
// workers by rows (each value is rounded alone, so the split changes nothing).
func toBF16(dst []uint16, x []float32, rows, cols, ld int, parallel bool) {
	if rows == 0 || cols == 0 {
		return
	}
	conv := func(lo, hi int) {
		C.pw_to_bf16((*C.uint16_t)(unsafe.Pointer(&dst[lo*cols])), (*C.float)(unsafe.Pointer(&x[lo*ld])),
			C.int64_t(hi-lo), C.int64_t(cols), C.int64_t(ld))
	}
	if !parallel {
		conv(0, rows)
		return
	}
	compute.ParallelFor(rows, conv)
}

// gemm16 is c = alpha·op(a)·op(b) + beta·c with a and b rounded to bf16, in
// compute.Blocks's fixed blocks, each one single-threaded oneDNN call. parallel
// spreads the blocks over the workers (false inside a ParallelFor body).
func gemm16(parallel, transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	if m == 0 || n == 0 {
		return
	}
	// Each block's call packs its part of b.
	pa := getScratch(m * k)
	defer scratch16.Put(pa)
	a16 := *pa
	// a is stored m×k, or k×m when transposed; oneDNN reads it either way (rounding
	// it into its transpose first measured slower).
	lda16 := k
	if transA {
		toBF16(a16, a, k, m, lda, parallel)
		lda16 = m
	} else {
		toBF16(a16, a, m, k, lda, parallel)
	}
	run := func(r0, rows, c0, cols int) {
		aOff := r0 * k // row r0 of a
		if transA {
			aOff = r0 // column r0 of the stored a
		}
		bOff := c0
		if transB {
			bOff = c0 * ldb
		}
		mm, _, err := matmul(mmKey{bf16: true, m: rows, n: cols, k: k, transA: transA, transB: transB,
			lda: lda16, ldb: ldb, ldc: ldc, alpha: alpha, beta: beta})
		if err != nil {
			panic(fmt.Sprintf("backend: bf16: %v", err)) // every shape of a valid stage is supported
		}
		if st := C.pw_mm_run(mm, unsafe.Pointer(&a16[aOff]), unsafe.Pointer(&b[bOff]), (*C.float)(unsafe.Pointer(&c[r0*ldc+c0]))); st != 0 {
			panic(fmt.Sprintf("backend: bf16: oneDNN matmul failed: status %d", int(st)))
		}
	}
	if !parallel {
		run(0, m, 0, n)
		return
	}
	compute.Blocks(m, n, k, run)
}

// gemm32 is gemm16 without the rounding: oneDNN's float32 matmul in the same blocks.
func gemm32(parallel, transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	if m == 0 || n == 0 {
		return
	}
	run := func(r0, rows, c0, cols int) {
		aOff := r0 * lda
		if transA {
			aOff = r0
		}
		bOff := c0
		if transB {
			bOff = c0 * ldb
		}
		mm, _, err := matmul(mmKey{m: rows, n: cols, k: k, transA: transA, transB: transB,
			lda: lda, ldb: ldb, ldc: ldc, alpha: alpha, beta: beta})
		if err != nil {
			panic(fmt.Sprintf("backend: fp32: %v", err))
		}
		if st := C.pw_mm_run(mm, unsafe.Pointer(&a[aOff]), unsafe.Pointer(&b[bOff]), (*C.float)(unsafe.Pointer(&c[r0*ldc+c0]))); st != 0 {
			panic(fmt.Sprintf("backend: fp32: oneDNN matmul failed: status %d", int(st)))
		}
	}
	if !parallel {
		run(0, m, 0, n)
		return
	}
	compute.Blocks(m, n, k, run)
}

func (*bf16) Linear(y, x, w Buf, n, in, out int) {
	gemm16(true, false, true, n, out, in, 1, hostOf(x), in, hostOf(w), in, 0, hostOf(y), out)
}

func (*bf16) LinearBackward(dx, dw, dy, x, w Buf, n, in, out int, accumulate bool) {
	gemm16(true, true, false, out, in, n, 1, hostOf(dy), out, hostOf(x), in, 1, hostOf(dw), in)
	var beta float32
	if accumulate {
		beta = 1
	}
	gemm16(true, false, false, n, in, out, 1, hostOf(dy), out, hostOf(w), in, beta, hostOf(dx), in)
}

// serial16 is gemm16 on the calling goroutine, for the attention kernels' per-head GEMMs.
func serial16(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	gemm16(false, transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

func (*bf16) Attention(att, p, qkv Buf, b, t, nHeads, headDim int) {
	attention(hostOf(att), hostOf(p), hostOf(qkv), b, t, nHeads, headDim, serial16)
}

func (*bf16) AttentionBackward(dqkv, datt, p, qkv Buf, b, t, nHeads, headDim int) {
	attentionBackward(hostOf(dqkv), hostOf(datt), hostOf(p), hostOf(qkv), b, t, nHeads, headDim, serial16)
}
