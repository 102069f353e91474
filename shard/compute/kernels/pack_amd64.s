//go:build !purego

#include "textflag.h"

// func transpose4x8(dst *float32, dstStride int, src *float32, srcStride int, nblk int)
// Transposes nblk blocks of 4 rows × 8 columns (rows srcStride floats apart, block b
// at column 8b) into 8 rows × 4 columns (rows dstStride floats apart, block b at row
// 8b). AVX only.
TEXT ·transpose4x8(SB), NOSPLIT, $0-40
	MOVQ dst+0(FP), DI
	MOVQ dstStride+8(FP), R8
	SHLQ $2, R8
	MOVQ src+16(FP), SI
	MOVQ srcStride+24(FP), R9
	SHLQ $2, R9
	MOVQ nblk+32(FP), CX
	LEAQ (R9)(R9*2), R10 // 3 source rows
	LEAQ (R8)(R8*2), R11 // 3 destination rows
	MOVQ R8, R12
	SHLQ $2, R12         // 4 destination rows
	TESTQ CX, CX
	JZ tdone

tloop:
	VMOVUPS (SI), Y0
	VMOVUPS (SI)(R9*1), Y1
	VMOVUPS (SI)(R9*2), Y2
	VMOVUPS (SI)(R10*1), Y3
	VUNPCKLPS Y1, Y0, Y4 // r0[0] r1[0] r0[1] r1[1] | columns 4, 5
	VUNPCKHPS Y1, Y0, Y5 // columns 2, 3 | 6, 7
	VUNPCKLPS Y3, Y2, Y6
	VUNPCKHPS Y3, Y2, Y7
	VSHUFPS $0x44, Y6, Y4, Y0 // column 0 | 4
	VSHUFPS $0xEE, Y6, Y4, Y1 // column 1 | 5
	VSHUFPS $0x44, Y7, Y5, Y2 // column 2 | 6
	VSHUFPS $0xEE, Y7, Y5, Y3 // column 3 | 7
	VMOVUPS X0, (DI)
	VMOVUPS X1, (DI)(R8*1)
	VMOVUPS X2, (DI)(R8*2)
	VMOVUPS X3, (DI)(R11*1)
	ADDQ R12, DI
	VEXTRACTF128 $1, Y0, (DI)
	VEXTRACTF128 $1, Y1, (DI)(R8*1)
	VEXTRACTF128 $1, Y2, (DI)(R8*2)
	VEXTRACTF128 $1, Y3, (DI)(R11*1)
	ADDQ R12, DI
	ADDQ $32, SI
	DECQ CX
	JNZ tloop

tdone:
	VZEROUPPER
	RET

// func packRowsAVX512Asm(dst *float32, panelStride int, src *float32, ld int, kc int, panels int, w int, full, tail uint32)
// Fills panels panels of width w ≤ 32 (panelStride floats apart; each kc steps of w
// values) from kc rows of src (ld floats apart), one row at a time so src is read in
// order: step p of panel q is src[p*ld + q*w ...]. The lanes of full are read for
// every panel but the last, those of tail for the last (the others are zero); the
// lanes of full are written. Bits 0..15 of a mask cover the first 16 floats.
TEXT ·packRowsAVX512Asm(SB), NOSPLIT, $0-64
	MOVQ dst+0(FP), DI
	MOVQ panelStride+8(FP), R8
	SHLQ $2, R8
	MOVQ src+16(FP), SI
	MOVQ ld+24(FP), R9
	SHLQ $2, R9
	MOVQ kc+32(FP), CX
	MOVQ panels+40(FP), R10
	MOVQ w+48(FP), R11
	SHLQ $2, R11
	MOVL full+56(FP), AX
	KMOVW AX, K1
	SHRL $16, AX
	KMOVW AX, K2
	MOVL tail+60(FP), AX
	KMOVW AX, K3
	SHRL $16, AX
	KMOVW AX, K4
	TESTQ CX, CX
	JZ rdone
	DECQ R10 // panels before the last
	JS rdone

rrow:
	MOVQ SI, R12
	MOVQ DI, R13
	MOVQ R10, BX
	TESTQ BX, BX
	JZ rlast

rpanel:
	VMOVUPS.Z (R12), K1, Z0
	VMOVUPS.Z 64(R12), K2, Z1
	VMOVUPS Z0, K1, (R13)
	VMOVUPS Z1, K2, 64(R13)
	ADDQ R11, R12
	ADDQ R8, R13
	DECQ BX
	JNZ rpanel

rlast:
	VMOVUPS.Z (R12), K3, Z0
	VMOVUPS.Z 64(R12), K4, Z1
	VMOVUPS Z0, K1, (R13)
	VMOVUPS Z1, K2, 64(R13)
	ADDQ R9, SI
	ADDQ R11, DI
	DECQ CX
	JNZ rrow

rdone:
	VZEROUPPER
	RET
