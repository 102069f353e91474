//go:build !purego

package optim

import (
	"unsafe"

	"golang.org/x/sys/cpu"
)

//go:noescape
func adamwAVX512(p, grad, m, v *float32, n int, k *adamwStep, keep float32)

// vecAVX512 says whether AdamW steps whole blocks of 16 with AVX-512; tests turn it
// off to compare with the scalar loop.
var vecAVX512 = cpu.X86.HasAVX512F

// The assembly reads adamwStep's first seven fields as consecutive float32s.
var _ = [1]struct{}{}[unsafe.Offsetof(adamwStep{}.eps)-24]

// runVec steps the leading whole blocks of 16 and returns how many elements it did.
func (k *adamwStep) runVec(p, g, m, v []float32, keep float32) int {
	n := len(p) &^ 15
	if !vecAVX512 || n == 0 {
		return 0
	}
	adamwAVX512(&p[0], &g[0], &m[0], &v[0], n, k, keep)
	return n
}
