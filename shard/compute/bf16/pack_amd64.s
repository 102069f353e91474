//go:build amd64 && !purego

#include "textflag.h"

// Word permutation interleaving two converted halves: word 2j ← j (even k), word
// 2j+1 ← 16+j (odd k).
DATA bf16Zip<>+0(SB)/8, $0x0011000100100000
DATA bf16Zip<>+8(SB)/8, $0x0013000300120002
DATA bf16Zip<>+16(SB)/8, $0x0015000500140004
DATA bf16Zip<>+24(SB)/8, $0x0017000700160006
DATA bf16Zip<>+32(SB)/8, $0x0019000900180008
DATA bf16Zip<>+40(SB)/8, $0x001b000b001a000a
DATA bf16Zip<>+48(SB)/8, $0x001d000d001c000c
DATA bf16Zip<>+56(SB)/8, $0x001f000f001e000e
GLOBL bf16Zip<>(SB), RODATA|NOPTR, $64

// Z0 holds 16 floats of even k, Z1 the next k's: round both to bf16 and store the 16
// pairs (even in the low half) under the K3 mask at (DI).
#define ZIPSTORE \
	BYTE $0x62; BYTE $0xf2; BYTE $0x77; BYTE $0x48; BYTE $0x72; BYTE $0xd0 /* VCVTNE2PS2BF16 zmm2, zmm1, zmm0 */ \
	VPERMW Z2, Z4, Z3 \
	VMOVDQU32 Z3, K3, (DI)

// func packPairRow(dst *uint32, panel, half int, src0, src1 *float32, lines, cw, chunks int)
//
// Rounds rows 2p (src0) and 2p+1 (src1) of an operand whose k runs down its columns
// and stores their pairs into k-pair p of every panel, chunks of cw lines at a time
// (zero past lines): dst is pair p of the first panel, panel the bytes between panels,
// half 64 when a panel takes two chunks (32 lines), else 0.
TEXT ·packPairRow(SB), NOSPLIT, $0-64
	MOVQ dst+0(FP), DI
	MOVQ panel+8(FP), R8
	MOVQ half+16(FP), R9
	MOVQ src0+24(FP), SI
	MOVQ src1+32(FP), DX
	MOVQ lines+40(FP), R10
	MOVQ cw+48(FP), R11
	MOVQ chunks+56(FP), CX
	MOVL $1, BX
	SHLXL R11, BX, AX
	DECL AX
	KMOVW AX, K3
	VMOVDQU32 bf16Zip<>(SB), Z4
	XORQ R12, R12
	XORQ R13, R13
chunk:
	TESTQ CX, CX
	JEQ pdone
	MOVQ R10, AX
	CMPQ AX, R11
	CMOVQGT R11, AX
	CMPQ AX, $0
	CMOVQLT R13, AX
	SHLXL AX, BX, AX
	DECL AX
	KMOVW AX, K1
	VMOVUPS.Z (SI), K1, Z0
	VMOVUPS.Z (DX), K1, Z1
	ZIPSTORE
	LEAQ (SI)(R11*4), SI
	LEAQ (DX)(R11*4), DX
	SUBQ R11, R10
	TESTQ R9, R9
	JEQ whole
	XORQ $1, R12
	JEQ second
	ADDQ R9, DI
	JMP next
second:
	SUBQ R9, DI
	ADDQ R8, DI
	JMP next
whole:
	ADDQ R8, DI
next:
	DECQ CX
	JMP chunk
pdone:
	VZEROUPPER
	RET
