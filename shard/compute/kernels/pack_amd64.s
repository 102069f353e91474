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

// func copyRowsAVX512(dst *float32, dstStride int, src *float32, srcStride int, rows int, load, store uint32)
// Copies rows rows of up to 32 floats: the lanes of load are read (the others are
// zero), the lanes of store written. Bits 0..15 of load and store mask the first 16
// floats of a row, bits 16..31 the next 16.
TEXT ·copyRowsAVX512(SB), NOSPLIT, $0-48
	MOVQ dst+0(FP), DI
	MOVQ dstStride+8(FP), R8
	SHLQ $2, R8
	MOVQ src+16(FP), SI
	MOVQ srcStride+24(FP), R9
	SHLQ $2, R9
	MOVQ rows+32(FP), CX
	MOVL load+40(FP), AX
	KMOVW AX, K1
	SHRL $16, AX
	KMOVW AX, K2
	MOVL store+44(FP), AX
	KMOVW AX, K3
	SHRL $16, AX
	KMOVW AX, K4
	TESTQ CX, CX
	JZ cdone

cloop:
	VMOVUPS.Z (SI), K1, Z0
	VMOVUPS.Z 64(SI), K2, Z1
	VMOVUPS Z0, K3, (DI)
	VMOVUPS Z1, K4, 64(DI)
	ADDQ R9, SI
	ADDQ R8, DI
	DECQ CX
	JNZ cloop

cdone:
	VZEROUPPER
	RET
