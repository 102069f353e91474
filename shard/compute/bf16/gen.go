//go:build ignore

// gen.go writes kernel_amd64.s, the AVX512-BF16 micro-kernel of
// GoSgemmBF16. Go's assembler does not know VDPBF16PS, so the generator encodes it
// (EVEX, fixed registers) and emits the bytes with the Intel mnemonic beside them.
//
//	go run gen.go
package main

import (
	"bytes"
	"fmt"
	"log"
	"os"
	"strings"
)

// The tile: bf16MR rows of c by bf16NR columns, accumulated in zmm0..zmm23 (row i in
// zmm(2i) and zmm(2i+1)); zmm24..zmm27 hold the B panel's two k-pairs in flight.
const (
	mr = 12
	nr = 32
)

// x86 general registers used as bases.
const (
	regSI = 6
	regDI = 7
)

// evex encodes a 512-bit EVEX instruction of map 0F38, W0, no masking: dst is the ModRM
// reg (zmm 0..31), src1 is EVEX.vvvv (zmm 0..31, or -1 when the instruction has
// none), and the ModRM r/m operand is either the zmm src2 (base < 0) or the memory
// [base + disp], broadcast from 32 bits when bcst.
func evex(pp, op byte, dst, src1, src2, base, disp int, bcst bool) []byte {
	bit := func(v, n int) byte { return byte(v>>n) & 1 }
	if src1 < 0 {
		src1 = 0
	}
	var rmLow, b, x byte
	if base < 0 {
		rmLow, b, x = byte(src2&7), bit(src2, 3), bit(src2, 4)
	} else {
		if base&7 == 4 || base&7 == 5 {
			log.Fatalf("base register %d needs a SIB byte or has no disp-less form", base)
		}
		rmLow, b = byte(base&7), bit(base, 3)
	}
	p0 := (1-bit(dst, 3))<<7 | (1-x)<<6 | (1-b)<<5 | (1-bit(dst, 4))<<4 | 0b10 // map 0F38
	p1 := byte(0)<<7 | (^byte(src1)&0xf)<<3 | 1<<2 | pp                        // W0
	var bb byte
	if bcst {
		bb = 1
	}
	p2 := byte(0b10)<<5 | bb<<4 | (1-bit(src1, 4))<<3 // L'L = 512 bits
	out := []byte{0x62, p0, p1, p2, op}
	switch {
	case base < 0:
		out = append(out, 0b11<<6|byte(dst&7)<<3|rmLow)
	default:
		n := 64 // disp8 is scaled by the memory operand's size
		if bcst {
			n = 4
		}
		if disp%n == 0 && disp/n >= -128 && disp/n <= 127 {
			out = append(out, 0b01<<6|byte(dst&7)<<3|rmLow, byte(int8(disp/n)))
		} else {
			d := uint32(int32(disp))
			out = append(out, 0b10<<6|byte(dst&7)<<3|rmLow, byte(d), byte(d>>8), byte(d>>16), byte(d>>24))
		}
	}
	return out
}

const (
	ppF3 = 0b10
	ppF2 = 0b11
)

// vdpbf16ps is VDPBF16PS zmm(acc), zmm(b), [base+disp]{1to16} (F3 0F38 52): for each
// float32 lane, acc += a.odd·b.odd, then += a.even·b.even.
func vdpbf16ps(acc, b, base, disp int) string {
	return line(evex(ppF3, 0x52, acc, b, 0, base, disp, true),
		fmt.Sprintf("VDPBF16PS zmm%d, zmm%d, [%s+%d]{1to16}", acc, b, gpName(base), disp))
}

func gpName(r int) string {
	return map[int]string{regSI: "rsi", regDI: "rdi"}[r]
}

func line(enc []byte, mnemonic string) string {
	var s []string
	for _, b := range enc {
		s = append(s, fmt.Sprintf("BYTE $0x%02x", b))
	}
	return "\t" + strings.Join(s, "; ") + " // " + mnemonic + "\n"
}

// check compares the encoder with GNU as's output for a few forms.
func check() {
	for _, c := range []struct {
		got  []byte
		want string
	}{
		{evex(ppF3, 0x52, 0, 24, 25, -1, 0, false), "62923e4052c1"},             // vdpbf16ps zmm0, zmm24, zmm25
		{evex(ppF3, 0x52, 23, 24, 0, regSI, 4, true), "62e23e50527e01"},         // vdpbf16ps zmm23, zmm24, [rsi+4]{1to16}
		{evex(ppF3, 0x52, 17, 25, 0, regSI, 600, true), "62e23650528e58020000"}, // [rsi+600]{1to16}
		{evex(ppF2, 0x72, 2, 1, 0, -1, 0, false), "62f2774872d0"},               // vcvtne2ps2bf16 zmm2, zmm1, zmm0
		{evex(ppF3, 0x72, 4, -1, 3, -1, 0, false), "62f27e4872e3"},              // vcvtneps2bf16 ymm4, zmm3
	} {
		if g := fmt.Sprintf("%x", c.got); g != c.want {
			log.Fatalf("encoder: got %s, want %s", g, c.want)
		}
	}
}

// packTranspose emits the packer for operands whose k-pairs run along the stored lines:
// 16 lines by 16 k-pairs at a time are loaded, rounded and transposed in registers.
func packTranspose(p func(string, ...any), w *bytes.Buffer) {
	p(`
// func packTranspose(dst *uint32, w int, src *float32, ld, lines, pairs int)
//
// For each of 16 lines r (line r at src[r·ld]; zero past lines) and each k-pair p below
// pairs: rounds elements 2p and 2p+1 of line r to bf16 and stores the pair at
// dst[p·w + r] (the first min(w, 16) lines). Lines past lines reread the last one and
// are zeroed after the transpose.
TEXT ·packTranspose(SB), NOSPLIT, $0-48
	MOVQ dst+0(FP), DI
	MOVQ w+8(FP), R8
	MOVQ src+16(FP), SI
	MOVQ ld+24(FP), DX
	SHLQ $2, DX
	MOVQ lines+32(FP), R9
	MOVQ pairs+40(FP), CX
	MOVL $1, BX
	SHLXL R9, BX, AX
	DECL AX
	KMOVW AX, K6
	MOVQ R8, AX
	CMPQ AX, $16
	JLE wok
	MOVQ $16, AX
wok:
	SHLXL AX, BX, AX
	DECL AX
	KMOVW AX, K3
	SHLQ $2, R8
	XORQ R11, R11
tgroup:
	TESTQ CX, CX
	JLE tdone
	MOVQ CX, AX
	CMPQ AX, $16
	JLE tsmall
	MOVQ $16, AX
tsmall:
	MOVQ AX, R13
	SHLQ $1, R13
	MOVL $0xffff, R10
	CMPQ R13, $16
	JGE tlofull
	SHLXL R13, BX, R10
	DECL R10
tlofull:
	KMOVW R10, K4
	SUBQ $16, R13
	MOVL $0, R10
	JLE thiset
	SHLXL R13, BX, R10
	DECL R10
thiset:
	KMOVW R10, K5
	MOVQ SI, R12
`)
	for r := 0; r < 16; r++ {
		p("\tVMOVUPS.Z (R12), K4, Z16\n\tVMOVUPS.Z 64(R12), K5, Z17\n")
		w.WriteString(line(evex(ppF2, 0x72, r, 17, 16, -1, 0, false), fmt.Sprintf("VCVTNE2PS2BF16 zmm%d, zmm17, zmm16", r)))
		if r < 15 {
			p("\tMOVQ DX, R10\n\tCMPQ R9, $%d\n\tCMOVQLE R11, R10\n\tADDQ R10, R12\n", r+1)
		}
	}
	// The 16×16 transpose of dwords: pairs within 128-bit lanes, then the lanes.
	for i := 0; i < 16; i += 2 {
		p("\tVPUNPCKLDQ Z%d, Z%d, Z%d\n\tVPUNPCKHDQ Z%d, Z%d, Z%d\n", i+1, i, 16+i, i+1, i, 17+i)
	}
	for i := 0; i < 16; i += 4 {
		p("\tVPUNPCKLQDQ Z%d, Z%d, Z%d\n\tVPUNPCKHQDQ Z%d, Z%d, Z%d\n", 18+i, 16+i, i, 18+i, 16+i, i+1)
		p("\tVPUNPCKLQDQ Z%d, Z%d, Z%d\n\tVPUNPCKHQDQ Z%d, Z%d, Z%d\n", 19+i, 17+i, i+2, 19+i, 17+i, i+3)
	}
	for _, g := range []int{0, 8} {
		for c := 0; c < 4; c++ {
			p("\tVSHUFI32X4 $0x88, Z%d, Z%d, Z%d\n", g+4+c, g+c, 16+g+c)
			p("\tVSHUFI32X4 $0xdd, Z%d, Z%d, Z%d\n", g+4+c, g+c, 16+g+4+c)
		}
	}
	for c := 0; c < 8; c++ {
		p("\tVSHUFI32X4 $0x88, Z%d, Z%d, Z%d\n", 24+c, 16+c, c)
		p("\tVSHUFI32X4 $0xdd, Z%d, Z%d, Z%d\n", 24+c, 16+c, 8+c)
	}
	p("\tMOVQ DI, R12\n")
	for q := 0; q < 16; q++ {
		p("\tVMOVDQU32.Z Z%d, K6, Z%d\n\tVMOVDQU32 Z%d, K3, (R12)\n", q, q, q)
		if q < 15 {
			p("\tCMPQ AX, $%d\n\tJLE tnext\n\tADDQ R8, R12\n", q+1)
		}
	}
	p(`tnext:
	MOVQ R8, R10
	SHLQ $4, R10
	ADDQ R10, DI
	ADDQ $128, SI
	SUBQ $16, CX
	JMP tgroup
tdone:
	VZEROUPPER
	RET
`)
}

// fmaTile emits dpbf16TileFMA: dpbf16Tile for CPUs with AVX-512 but not AVX512-BF16.
// Each k-pair's bf16 halves are widened to float32 (exactly) and added by two fused
// multiply-adds, odd then even, with MXCSR's flush-to-zero set for the kernel: the
// same roundings as VDPBF16PS.
func fmaTile(p func(string, ...any)) {
	p(`
// func dpbf16TileFMA(kp int, a, b *uint32, c *float32, ldc int, alpha, beta float32, rows int, cols uint32, readC bool, acc *float32, mode int)
//
// dpbf16Tile on AVX-512F alone.
TEXT ·dpbf16TileFMA(SB), NOSPLIT, $16-80
	STMXCSR 0(SP)
	MOVL 0(SP), AX
	ORL $0x8000, AX // flush to zero
	MOVL AX, 8(SP)
	LDMXCSR 8(SP)
	MOVQ kp+0(FP), CX
	MOVQ a+8(FP), SI
	MOVQ b+16(FP), DI
	MOVQ acc+64(FP), R10
	MOVQ mode+72(FP), R11
	MOVL $0xffff0000, AX
	VPBROADCASTD AX, Z31
	TESTQ $1, R11
	JEQ fzero
`)
	for i := 0; i < 2*mr; i++ {
		p("\tVMOVUPS %d(R10), Z%d\n", 64*i, i)
	}
	p("\tJMP facc\nfzero:\n")
	for i := 0; i < 2*mr; i++ {
		p("\tVPXORD Z%d, Z%d, Z%d\n", i, i, i)
	}
	p("facc:\n\tTESTQ CX, CX\n\tJEQ fstore\nfloop:\n")
	p("\tVMOVDQU32 (DI), Z24\n\tVMOVDQU32 64(DI), Z25\n")
	p("\tVPSLLD $16, Z24, Z26\n\tVPANDD Z31, Z24, Z24\n\tVPSLLD $16, Z25, Z27\n\tVPANDD Z31, Z25, Z25\n")
	for i := 0; i < mr; i++ {
		p("\tVPBROADCASTD %d(SI), Z28\n\tVPSLLD $16, Z28, Z29\n\tVPANDD Z31, Z28, Z28\n", 4*i)
		p("\tVFMADD231PS Z24, Z28, Z%d\n\tVFMADD231PS Z25, Z28, Z%d\n", 2*i, 2*i+1)
		p("\tVFMADD231PS Z26, Z29, Z%d\n\tVFMADD231PS Z27, Z29, Z%d\n", 2*i, 2*i+1)
	}
	p("\tADDQ $%d, SI\n\tADDQ $%d, DI\n\tDECQ CX\n\tJNE floop\n", mr*4, nr*4)
	p("fstore:\n\tLDMXCSR 0(SP)\n\tTESTQ $2, R11\n\tJNE ffinal\n")
	for i := 0; i < 2*mr; i++ {
		p("\tVMOVUPS Z%d, %d(R10)\n", i, 64*i)
	}
	p(`	JMP fdone
ffinal:
	MOVQ c+24(FP), DX
	MOVQ ldc+32(FP), R8
	SHLQ $2, R8
	VBROADCASTSS alpha+40(FP), Z28
	VBROADCASTSS beta+44(FP), Z29
	MOVQ rows+48(FP), R9
	MOVL cols+56(FP), AX
	KMOVW AX, K1
	SHRL $16, AX
	KMOVW AX, K2
	MOVBLZX readC+60(FP), AX
	TESTQ AX, AX
	JNE fstoreC
`)
	for _, readC := range []bool{false, true} {
		label := "fstore0"
		if readC {
			label = "fstoreC"
		}
		p("%s:\n", label)
		for i := 0; i < mr; i++ {
			for h := 0; h < 2; h++ {
				z := 2*i + h
				p("\tVMULPS Z28, Z%d, Z%d\n", z, z)
				if readC {
					p("\tVMOVUPS.Z %d(DX), K%d, Z30\n\tVMULPS Z29, Z30, Z30\n\tVADDPS Z30, Z%d, Z%d\n", 64*h, h+1, z, z)
				}
				p("\tVMOVUPS Z%d, K%d, %d(DX)\n", z, h+1, 64*h)
			}
			if i < mr-1 {
				p("\tDECQ R9\n\tJEQ fdone\n\tADDQ R8, DX\n")
			}
		}
		p("\tJMP fdone\n")
	}
	p("fdone:\n\tVZEROUPPER\n\tRET\n")
}

func main() {
	check()
	var w bytes.Buffer
	p := func(format string, args ...any) { fmt.Fprintf(&w, format, args...) }
	p("// Code generated by gen.go; DO NOT EDIT.\n\n")
	p("//go:build amd64 && !purego\n\n#include \"textflag.h\"\n\n")
	p(`// func dpbf16Tile(kp int, a, b *uint32, c *float32, ldc int, alpha, beta float32, rows int, cols uint32, readC bool, acc *float32, mode int)
//
// c[rows, cols] (row stride ldc floats) = alpha·acc + beta·c, with beta·c only when
// readC, where acc[%d, %d] is the dot product of the packed A panel a (kp k-pairs of
// %d rows) and the packed B panel b (kp k-pairs of %d columns), each k-pair added by
// VDPBF16PS in order. cols is the mask of the columns stored. A product cut along k
// runs in parts: mode bit 0 starts from the tile acc (row-major, unpadded) instead of
// zero; without bit 1 the sums are stored back to acc and c is left alone.
TEXT ·dpbf16Tile(SB), NOSPLIT, $0-80
	MOVQ kp+0(FP), CX
	MOVQ a+8(FP), SI
	MOVQ b+16(FP), DI
	MOVQ acc+64(FP), R10
	MOVQ mode+72(FP), R11
	TESTQ $1, R11
	JEQ zero
`, mr, nr, mr, nr)
	for i := 0; i < 2*mr; i++ {
		p("\tVMOVUPS %d(R10), Z%d\n", 64*i, i)
	}
	p("\tJMP acc\nzero:\n")
	for i := 0; i < 2*mr; i++ {
		p("\tVPXORD Z%d, Z%d, Z%d\n", i, i, i)
	}
	p("acc:\n")
	// Two k-pairs per iteration, the second on zmm26/27, so its loads issue while the
	// first pair's products are still in flight.
	p("\tMOVQ CX, AX\n\tSHRQ $1, AX\n\tJEQ tail\n")
	p("loop2:\n")
	for u := 0; u < 2; u++ {
		b0 := 24 + 2*u
		p("\tVMOVUPS %d(DI), Z%d\n\tVMOVUPS %d(DI), Z%d\n", u*128, b0, u*128+64, b0+1)
		for i := 0; i < mr; i++ {
			w.WriteString(vdpbf16ps(2*i, b0, regSI, u*mr*4+4*i))
			w.WriteString(vdpbf16ps(2*i+1, b0+1, regSI, u*mr*4+4*i))
		}
	}
	p("\tADDQ $%d, SI\n\tADDQ $%d, DI\n\tDECQ AX\n\tJNE loop2\n", 2*mr*4, 2*nr*4)
	p("tail:\n\tTESTQ $1, CX\n\tJEQ store\n")
	p("\tVMOVUPS (DI), Z24\n\tVMOVUPS 64(DI), Z25\n")
	for i := 0; i < mr; i++ {
		w.WriteString(vdpbf16ps(2*i, 24, regSI, 4*i))
		w.WriteString(vdpbf16ps(2*i+1, 25, regSI, 4*i))
	}
	p("store:\n\tTESTQ $2, R11\n\tJNE final\n")
	for i := 0; i < 2*mr; i++ {
		p("\tVMOVUPS Z%d, %d(R10)\n", i, 64*i)
	}
	p(`	JMP done
final:
	MOVQ c+24(FP), DX
	MOVQ ldc+32(FP), R8
	SHLQ $2, R8
	VBROADCASTSS alpha+40(FP), Z28
	VBROADCASTSS beta+44(FP), Z29
	MOVQ rows+48(FP), R9
	MOVL cols+56(FP), AX
	KMOVW AX, K1
	SHRL $16, AX
	KMOVW AX, K2
	MOVBLZX readC+60(FP), AX
	TESTQ AX, AX
	JNE storeC
`)
	// alpha·acc, rounded, then + beta·c, rounded: the same two roundings as the Go
	// tile's epilogue.
	for _, readC := range []bool{false, true} {
		label := "store0"
		if readC {
			label = "storeC"
		}
		p("%s:\n", label)
		for i := 0; i < mr; i++ {
			for h := 0; h < 2; h++ {
				z := 2*i + h
				p("\tVMULPS Z28, Z%d, Z%d\n", z, z)
				if readC {
					p("\tVMOVUPS.Z %d(DX), K%d, Z30\n\tVMULPS Z29, Z30, Z30\n\tVADDPS Z30, Z%d, Z%d\n", 64*h, h+1, z, z)
				}
				p("\tVMOVUPS Z%d, K%d, %d(DX)\n", z, h+1, 64*h)
			}
			if i < mr-1 {
				p("\tDECQ R9\n\tJEQ done\n\tADDQ R8, DX\n")
			}
		}
		p("\tJMP done\n")
	}
	p("done:\n\tVZEROUPPER\n\tRET\n")
	packTranspose(p, &w)
	fmaTile(p)
	if err := os.WriteFile("kernel_amd64.s", w.Bytes(), 0o644); err != nil {
		log.Fatal(err)
	}
}
