//go:build !purego

#include "textflag.h"

// Element-wise kernels with AVX-512. The exponential repeats compute.Exp's float32
// operations one for one (no fused multiply-adds), so each lane equals the scalar
// result bit for bit.

DATA expc<>+0(SB)/4, $0x3fb8aa3b // log2e
DATA expc<>+4(SB)/4, $0x4b400000 // magic
DATA expc<>+8(SB)/4, $0x3f318000 // ln2hi
DATA expc<>+12(SB)/4, $0xb95e8083 // ln2lo
DATA expc<>+16(SB)/4, $0x39500d01 // c7
DATA expc<>+20(SB)/4, $0x3ab60b61 // c6
DATA expc<>+24(SB)/4, $0x3c088889 // c5
DATA expc<>+28(SB)/4, $0x3d2aaaab // c4
DATA expc<>+32(SB)/4, $0x3e2aaaab // c3
DATA expc<>+36(SB)/4, $0x3f000000 // c2
DATA expc<>+40(SB)/4, $0x3f800000 // one
DATA expc<>+44(SB)/4, $0x42b170a4 // hi
DATA expc<>+48(SB)/4, $0xc2aea8f6 // lo
DATA expc<>+52(SB)/4, $0x7f800000 // +Inf
DATA expc<>+56(SB)/4, $0x80000000 // sign bit
GLOBL expc<>(SB), RODATA|NOPTR, $60

// EXPCONSTS loads the exponential's constants into Z16..Z30.
#define EXPCONSTS \
	VBROADCASTSS expc<>+0(SB), Z16; \
	VBROADCASTSS expc<>+4(SB), Z17; \
	VBROADCASTSS expc<>+8(SB), Z18; \
	VBROADCASTSS expc<>+12(SB), Z19; \
	VBROADCASTSS expc<>+16(SB), Z20; \
	VBROADCASTSS expc<>+20(SB), Z21; \
	VBROADCASTSS expc<>+24(SB), Z22; \
	VBROADCASTSS expc<>+28(SB), Z23; \
	VBROADCASTSS expc<>+32(SB), Z24; \
	VBROADCASTSS expc<>+36(SB), Z25; \
	VBROADCASTSS expc<>+40(SB), Z26; \
	VBROADCASTSS expc<>+44(SB), Z27; \
	VBROADCASTSS expc<>+48(SB), Z28; \
	VBROADCASTSS expc<>+52(SB), Z29; \
	VBROADCASTSS expc<>+56(SB), Z30; \

// EXP sets Z4 = e^Z0 as compute.Exp does, with Z1..Z3 and K1, K2 as scratch.
#define EXP \
	VMULPS Z16, Z0, Z1; \
	VADDPS Z17, Z1, Z1; \
	VSUBPS Z17, Z1, Z2; \
	VMULPS Z18, Z2, Z3; \
	VSUBPS Z3, Z0, Z3; \
	VMULPS Z19, Z2, Z1; \
	VSUBPS Z1, Z3, Z3; \
	VMULPS Z3, Z20, Z4; \
	VADDPS Z21, Z4, Z4; \
	VMULPS Z3, Z4, Z4; \
	VADDPS Z22, Z4, Z4; \
	VMULPS Z3, Z4, Z4; \
	VADDPS Z23, Z4, Z4; \
	VMULPS Z3, Z4, Z4; \
	VADDPS Z24, Z4, Z4; \
	VMULPS Z3, Z4, Z4; \
	VADDPS Z25, Z4, Z4; \
	VMULPS Z3, Z4, Z4; \
	VADDPS Z26, Z4, Z4; \
	VMULPS Z3, Z4, Z4; \
	VADDPS Z26, Z4, Z4; \
	VSCALEFPS Z2, Z4, Z4; \
	VCMPPS $0x1e, Z27, Z0, K1; \
	VMOVAPS Z29, K1, Z4; \
	VCMPPS $0x05, Z28, Z0, K2; \
	VMOVAPS.Z Z4, K2, Z4

// func expAVX512(dst, src *float32, n int)
// dst[i] = e^src[i] for n a multiple of 16.
TEXT ·expAVX512(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX
	SHRQ $4, CX
	JZ expdone
	EXPCONSTS

exploop:
	VMOVUPS (SI), Z0
	EXP
	VMOVUPS Z4, (DI)
	ADDQ $64, SI
	ADDQ $64, DI
	DECQ CX
	JNZ exploop

expdone:
	VZEROUPPER
	RET

// func swigluAVX512(m, gate, u *float32, n int)
// m[i] = g[i] / (1 + e^-g[i]) · u[i] for n a multiple of 16.
TEXT ·swigluAVX512(SB), NOSPLIT, $0-32
	MOVQ m+0(FP), DI
	MOVQ gate+8(FP), SI
	MOVQ u+16(FP), DX
	MOVQ n+24(FP), CX
	SHRQ $4, CX
	JZ swdone
	EXPCONSTS

swloop:
	VMOVUPS (SI), Z5
	VXORPS Z30, Z5, Z0
	EXP
	VADDPS Z26, Z4, Z4
	VDIVPS Z4, Z5, Z5
	VMULPS (DX), Z5, Z5
	VMOVUPS Z5, (DI)
	ADDQ $64, SI
	ADDQ $64, DX
	ADDQ $64, DI
	DECQ CX
	JNZ swloop

swdone:
	VZEROUPPER
	RET

// func swigluBackwardAVX512(dg, du, dm, gate, u *float32, n int)
// With s = 1/(1 + e^-g): du = dm·g·s, dg = dm·u·s·(1 + g·(1 − s)), n a multiple of 16.
TEXT ·swigluBackwardAVX512(SB), NOSPLIT, $0-48
	MOVQ dg+0(FP), DI
	MOVQ du+8(FP), R8
	MOVQ dm+16(FP), R9
	MOVQ gate+24(FP), SI
	MOVQ u+32(FP), DX
	MOVQ n+40(FP), CX
	SHRQ $4, CX
	JZ swbdone
	EXPCONSTS

swbloop:
	VMOVUPS (SI), Z5
	VXORPS Z30, Z5, Z0
	EXP
	VADDPS Z26, Z4, Z4
	VDIVPS Z4, Z26, Z6   // s
	VMOVUPS (R9), Z7     // dm
	VMULPS Z5, Z7, Z8
	VMULPS Z6, Z8, Z8    // du = dm·g·s
	VMOVUPS Z8, (R8)
	VMULPS (DX), Z7, Z9
	VMULPS Z6, Z9, Z9    // dm·u·s
	VSUBPS Z6, Z26, Z10  // 1 − s
	VMULPS Z10, Z5, Z10  // g·(1 − s)
	VADDPS Z26, Z10, Z10 // 1 + g·(1 − s)
	VMULPS Z10, Z9, Z9
	VMOVUPS Z9, (DI)
	ADDQ $64, SI
	ADDQ $64, DX
	ADDQ $64, R9
	ADDQ $64, R8
	ADDQ $64, DI
	DECQ CX
	JNZ swbloop

swbdone:
	VZEROUPPER
	RET

// func maxAVX512(x *float32, n int) float32
// The largest of x[:n], n a positive multiple of 16 (NaN aside).
TEXT ·maxAVX512(SB), NOSPLIT, $0-20
	MOVQ x+0(FP), SI
	MOVQ n+8(FP), CX
	SHRQ $4, CX
	VMOVUPS (SI), Z0
	ADDQ $64, SI
	DECQ CX
	JZ maxreduce

maxloop:
	VMAXPS (SI), Z0, Z0
	ADDQ $64, SI
	DECQ CX
	JNZ maxloop

maxreduce:
	VEXTRACTF64X4 $1, Z0, Y1
	VMAXPS Y1, Y0, Y0
	VEXTRACTF128 $1, Y0, X1
	VMAXPS X1, X0, X0
	VPERMILPS $0x4e, X0, X1
	VMAXPS X1, X0, X0
	VPERMILPS $0xb1, X0, X1
	VMAXPS X1, X0, X0
	VMOVSS X0, ret+16(FP)
	VZEROUPPER
	RET

// func expSubSumAVX512(x *float32, n int, m float32, part *float32)
// x[i] = e^(x[i] − m) for n a multiple of 16; part[l] = the sum, in order, of the new
// x[16b + l].
TEXT ·expSubSumAVX512(SB), NOSPLIT, $0-32
	MOVQ x+0(FP), SI
	MOVQ n+8(FP), CX
	VBROADCASTSS m+16(FP), Z6
	MOVQ part+24(FP), DI
	VPXORD Z7, Z7, Z7
	SHRQ $4, CX
	JZ essdone
	EXPCONSTS

essloop:
	VMOVUPS (SI), Z0
	VSUBPS Z6, Z0, Z0
	EXP
	VMOVUPS Z4, (SI)
	VADDPS Z4, Z7, Z7
	ADDQ $64, SI
	DECQ CX
	JNZ essloop

essdone:
	VMOVUPS Z7, (DI)
	VZEROUPPER
	RET

// func scaleAVX512(x *float32, n int, s float32)
// x[i] *= s for n a multiple of 16.
TEXT ·scaleAVX512(SB), NOSPLIT, $0-20
	MOVQ x+0(FP), SI
	MOVQ n+8(FP), CX
	VBROADCASTSS s+16(FP), Z1
	SHRQ $4, CX
	JZ scdone

scloop:
	VMULPS (SI), Z1, Z0
	VMOVUPS Z0, (SI)
	ADDQ $64, SI
	DECQ CX
	JNZ scloop

scdone:
	VZEROUPPER
	RET

// func dotAVX512(a, b *float32, n int, part *float32)
// part[l] = the sum, in order, of a[16j + l]·b[16j + l] (each product rounded, then
// added) for n a multiple of 16.
TEXT ·dotAVX512(SB), NOSPLIT, $0-32
	MOVQ a+0(FP), SI
	MOVQ b+8(FP), DX
	MOVQ n+16(FP), CX
	MOVQ part+24(FP), DI
	VPXORD Z2, Z2, Z2
	SHRQ $4, CX
	JZ dotdone

dotloop:
	VMOVUPS (SI), Z0
	VMULPS (DX), Z0, Z0
	VADDPS Z0, Z2, Z2
	ADDQ $64, SI
	ADDQ $64, DX
	DECQ CX
	JNZ dotloop

dotdone:
	VMOVUPS Z2, (DI)
	VZEROUPPER
	RET

// func softmaxGradAVX512(dp, p *float32, n int, scale, dot float32)
// dp[i] = scale·p[i]·(dp[i] − dot) for n a multiple of 16.
TEXT ·softmaxGradAVX512(SB), NOSPLIT, $0-32
	MOVQ dp+0(FP), DI
	MOVQ p+8(FP), SI
	MOVQ n+16(FP), CX
	VBROADCASTSS scale+24(FP), Z5
	VBROADCASTSS dot+28(FP), Z6
	SHRQ $4, CX
	JZ sgdone

sgloop:
	VMULPS (SI), Z5, Z0
	VMOVUPS (DI), Z1
	VSUBPS Z6, Z1, Z1
	VMULPS Z1, Z0, Z0
	VMOVUPS Z0, (DI)
	ADDQ $64, SI
	ADDQ $64, DI
	DECQ CX
	JNZ sgloop

sgdone:
	VZEROUPPER
	RET

// func rmsScaleAVX512(out, w, x *float32, n int, r float32)
// out[i] = w[i]·(x[i]·r) for n a multiple of 16.
TEXT ·rmsScaleAVX512(SB), NOSPLIT, $0-36
	MOVQ out+0(FP), DI
	MOVQ w+8(FP), DX
	MOVQ x+16(FP), SI
	MOVQ n+24(FP), CX
	VBROADCASTSS r+32(FP), Z5
	SHRQ $4, CX
	JZ rsdone

rsloop:
	VMULPS (SI), Z5, Z0
	VMULPS (DX), Z0, Z0
	VMOVUPS Z0, (DI)
	ADDQ $64, SI
	ADDQ $64, DX
	ADDQ $64, DI
	DECQ CX
	JNZ rsloop

rsdone:
	VZEROUPPER
	RET

// func rmsBackwardDotAVX512(dw, w, g, x *float32, n int, r float32, part *float32)
// For n a multiple of 16: part[l] = the sum, in order, of w·g·x over elements 16j + l,
// and dw[i] += g[i]·x[i]·r.
TEXT ·rmsBackwardDotAVX512(SB), NOSPLIT, $0-56
	MOVQ dw+0(FP), DI
	MOVQ w+8(FP), R8
	MOVQ gr+16(FP), R9
	MOVQ x+24(FP), SI
	MOVQ n+32(FP), CX
	VBROADCASTSS r+40(FP), Z5
	MOVQ part+48(FP), AX
	VPXORD Z6, Z6, Z6
	SHRQ $4, CX
	JZ rbddone

rbdloop:
	VMOVUPS (R9), Z0       // g
	VMOVUPS (SI), Z1       // x
	VMULPS (R8), Z0, Z2    // w·g
	VMULPS Z1, Z2, Z2      // ·x
	VADDPS Z2, Z6, Z6
	VMULPS Z1, Z0, Z3      // g·x
	VMULPS Z5, Z3, Z3      // ·r
	VADDPS (DI), Z3, Z3
	VMOVUPS Z3, (DI)
	ADDQ $64, DI
	ADDQ $64, R8
	ADDQ $64, R9
	ADDQ $64, SI
	DECQ CX
	JNZ rbdloop

rbddone:
	VMOVUPS Z6, (AX)
	VZEROUPPER
	RET

// func rmsBackwardDxAVX512(dx, w, g, x *float32, n int, r, c float32)
// dx[i] += r·w[i]·g[i] − c·x[i] for n a multiple of 16.
TEXT ·rmsBackwardDxAVX512(SB), NOSPLIT, $0-48
	MOVQ dx+0(FP), DI
	MOVQ w+8(FP), R8
	MOVQ gr+16(FP), R9
	MOVQ x+24(FP), SI
	MOVQ n+32(FP), CX
	VBROADCASTSS r+40(FP), Z5
	VBROADCASTSS c+44(FP), Z6
	SHRQ $4, CX
	JZ rbxdone

rbxloop:
	VMULPS (R8), Z5, Z0    // r·w
	VMULPS (R9), Z0, Z0    // ·g
	VMULPS (SI), Z6, Z1    // c·x
	VSUBPS Z1, Z0, Z0
	VADDPS (DI), Z0, Z0
	VMOVUPS Z0, (DI)
	ADDQ $64, DI
	ADDQ $64, R8
	ADDQ $64, R9
	ADDQ $64, SI
	DECQ CX
	JNZ rbxloop

rbxdone:
	VZEROUPPER
	RET
