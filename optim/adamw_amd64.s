//go:build !purego

#include "textflag.h"

// func adamwAVX512(p, grad, m, v *float32, n int, k *adamwStep, keep float32)
// adamwStep.run over n, a multiple of 16, with the same float32 operations in the
// same order, so each element matches the scalar loop bit for bit.
TEXT ·adamwAVX512(SB), NOSPLIT, $0-52
	MOVQ p+0(FP), DI
	MOVQ grad+8(FP), SI
	MOVQ m+16(FP), R8
	MOVQ v+24(FP), R9
	MOVQ n+32(FP), CX
	MOVQ k+40(FP), AX
	VBROADCASTSS 0(AX), Z20  // b1
	VBROADCASTSS 4(AX), Z21  // b2
	VBROADCASTSS 8(AX), Z22  // c1
	VBROADCASTSS 12(AX), Z23 // c2
	VBROADCASTSS 16(AX), Z24 // stepSize
	VBROADCASTSS 20(AX), Z25 // invBC2
	VBROADCASTSS 24(AX), Z26 // eps
	VBROADCASTSS keep+48(FP), Z27
	SHRQ $4, CX
	JZ done

loop:
	VMOVUPS (SI), Z0          // g
	VMULPS (R8), Z20, Z1      // b1·m
	VMULPS Z0, Z22, Z2        // c1·g
	VADDPS Z2, Z1, Z1         // m
	VMOVUPS Z1, (R8)
	VMULPS (R9), Z21, Z3      // b2·v
	VMULPS Z0, Z23, Z4        // c2·g
	VMULPS Z0, Z4, Z4         // c2·g·g
	VADDPS Z4, Z3, Z3         // v
	VMOVUPS Z3, (R9)
	VSQRTPS Z3, Z3
	VMULPS Z25, Z3, Z3        // √v·invBC2
	VADDPS Z26, Z3, Z3        // + eps
	VDIVPS Z3, Z1, Z1         // m/(…)
	VMULPS Z1, Z24, Z1        // stepSize·…
	VMULPS (DI), Z27, Z2      // p·keep
	VSUBPS Z1, Z2, Z2
	VMOVUPS Z2, (DI)
	ADDQ $64, SI
	ADDQ $64, DI
	ADDQ $64, R8
	ADDQ $64, R9
	DECQ CX
	JNZ loop

done:
	VZEROUPPER
	RET
