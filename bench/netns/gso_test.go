package netns

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// gsoPacket is what a TUN with TCP segmentation offload hands over: a
// virtio-net header, then one IPv4/TCP header for a payload of many frames.
func gsoPacket(payload []byte, mss int, flags byte) []byte {
	p := make([]byte, vnetHdrLen, vnetHdrLen+40+len(payload))
	p[0] = 1 // needs checksum
	p[vnetGSOType] = vnetGSOTCPv4
	binary.NativeEndian.PutUint16(p[2:], 40)
	binary.NativeEndian.PutUint16(p[vnetGSOSize:], uint16(mss))
	ip := []byte{0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 201, 0, 2, 10, 201, 0, 3}
	binary.BigEndian.PutUint16(ip[2:], uint16(40+len(payload)))
	tcp := make([]byte, 20)
	binary.BigEndian.PutUint16(tcp[0:], 40000)
	binary.BigEndian.PutUint16(tcp[2:], 5201)
	binary.BigEndian.PutUint32(tcp[4:], 0xfffff000) // wraps within the packet
	binary.BigEndian.PutUint32(tcp[8:], 77)
	tcp[12] = 5 << 4
	tcp[13] = flags
	binary.BigEndian.PutUint16(tcp[14:], 512)
	p = append(p, ip...)
	p = append(p, tcp...)
	return append(p, payload...)
}

func TestSegmentCutsAnOffloadedSegmentAsTheKernelWould(t *testing.T) {
	payload := make([]byte, 3000)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	const mss = 1448
	const ack, psh, fin, cwr = 0x10, 0x08, 0x01, 0x80
	p := gsoPacket(payload, mss, ack|psh|fin|cwr)
	if got := gsoFrames(p); got != 3 {
		t.Fatalf("gsoFrames = %d, want 3", got)
	}
	var joined []byte
	for i, want := range []struct {
		len   int
		flags byte
	}{{mss, ack | cwr}, {mss, ack}, {3000 - 2*mss, ack | psh | fin}} {
		f := segment(nil, p, i)
		if !bytes.Equal(f[:vnetHdrLen], make([]byte, vnetHdrLen)) {
			t.Errorf("frame %d: virtio-net header %x, want zeros (no offload)", i, f[:vnetHdrLen])
		}
		ip, tcp := f[vnetHdrLen:vnetHdrLen+20], f[vnetHdrLen+20:]
		if got := int(binary.BigEndian.Uint16(ip[2:])); got != 40+want.len {
			t.Errorf("frame %d: IP length %d, want %d", i, got, 40+want.len)
		}
		if got := binary.BigEndian.Uint16(ip[4:]); got != 0x1234+uint16(i) {
			t.Errorf("frame %d: IP id %#x, want %#x", i, got, 0x1234+i)
		}
		if fold(sum(0, ip)) != 0xffff {
			t.Errorf("frame %d: bad IP checksum", i)
		}
		if got := binary.BigEndian.Uint32(tcp[4:]); got != 0xfffff000+uint32(i*mss) {
			t.Errorf("frame %d: seq %#x, want %#x", i, got, 0xfffff000+uint32(i*mss))
		}
		if tcp[13] != want.flags {
			t.Errorf("frame %d: flags %#x, want %#x", i, tcp[13], want.flags)
		}
		if fold(sum(sum(0, ip[12:20])+6+uint32(len(tcp)), tcp)) != 0xffff {
			t.Errorf("frame %d: bad TCP checksum", i)
		}
		joined = append(joined, tcp[20:]...)
	}
	if !bytes.Equal(joined, payload) {
		t.Error("the frames' payloads do not add up to the segment's")
	}
}

func TestSegmentPassesOtherPacketsWhole(t *testing.T) {
	p := gsoPacket(make([]byte, 100), 1448, 0x10)
	p[vnetGSOType] = 0 // not offloaded
	if got := gsoFrames(p); got != 1 {
		t.Errorf("gsoFrames = %d, want 1", got)
	}
	if got := segment(nil, p, 0); !bytes.Equal(got, p) {
		t.Error("segment changed a packet that is one frame")
	}
}
