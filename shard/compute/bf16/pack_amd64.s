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

// func packLoad(dst *uint32, dstStride int, src *float32, ld, lines int, width uint32, pairs int)
//
// For each of pairs k-pairs p: loads lines consecutive elements of rows 2p and 2p+1
// (row r at src[r·ld]), zero past lines, and stores the 16 pairs under the width mask
// at dst + p·dstStride bytes.
TEXT ·packLoad(SB), NOSPLIT, $0-56
	MOVQ dst+0(FP), DI
	MOVQ dstStride+8(FP), R8
	MOVQ src+16(FP), SI
	MOVQ ld+24(FP), DX
	SHLQ $2, DX
	MOVQ lines+32(FP), CX
	MOVL $1, R10
	SHLL CX, R10
	DECL R10
	CMPQ CX, $16
	JLT masked
	MOVL $0xffff, R10
masked:
	KMOVW R10, K1
	MOVL width+40(FP), AX
	KMOVW AX, K3
	VMOVDQU32 bf16Zip<>(SB), Z4
	MOVQ pairs+48(FP), CX
	TESTQ CX, CX
	JEQ done
loop:
	VMOVUPS.Z (SI), K1, Z0
	VMOVUPS.Z (SI)(DX*1), K1, Z1
	ZIPSTORE
	LEAQ (SI)(DX*2), SI
	ADDQ R8, DI
	DECQ CX
	JNE loop
done:
	VZEROUPPER
	RET
