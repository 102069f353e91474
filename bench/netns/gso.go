package netns

import "encoding/binary"

// The virtio-net header that precedes each packet on the TUN device, in the
// host's byte order (a TUN's default).
const (
	vnetGSOType  = 1 // u8: vnetGSOTCPv4 and others
	vnetGSOSize  = 4 // u16: payload bytes per frame
	vnetGSOTCPv4 = 1
)

// gsoFrames is the number of frames packet p (virtio-net header first) stands
// for: more than one for a TCP/IPv4 segment larger than its MSS.
func gsoFrames(p []byte) int {
	_, _, payload, mss, ok := parseGSO(p)
	if !ok {
		return 1
	}
	return (len(payload) + mss - 1) / mss
}

// parseGSO splits a TCP/IPv4 segmentation-offload packet into its headers and
// payload. ok is false for anything else, including a malformed packet, which
// then travels as one frame (the kernel checks it when it comes back).
func parseGSO(p []byte) (ip, tcp, payload []byte, mss int, ok bool) {
	if len(p) < vnetHdrLen || p[vnetGSOType] != vnetGSOTCPv4 {
		return nil, nil, nil, 0, false
	}
	mss = int(binary.NativeEndian.Uint16(p[vnetGSOSize:]))
	pkt := p[vnetHdrLen:]
	if mss == 0 || len(pkt) < 20 || pkt[0]>>4 != 4 || pkt[9] != 6 {
		return nil, nil, nil, 0, false
	}
	ihl := int(pkt[0]&0x0f) * 4
	if ihl < 20 || len(pkt) < ihl+20 {
		return nil, nil, nil, 0, false
	}
	doff := int(pkt[ihl+12]>>4) * 4
	if doff < 20 || len(pkt) < ihl+doff {
		return nil, nil, nil, 0, false
	}
	return pkt[:ihl], pkt[ihl : ihl+doff], pkt[ihl+doff:], mss, true
}

// segment appends to dst (a virtio-net header, then the packet) frame i of
// TCP/IPv4 segmentation-offload packet p, with full checksums, as the
// kernel's own segmentation would make it: the sequence number and IP id
// advance by frame, CWR stays on the first frame, FIN and PSH on the last.
// A p that is not such a packet is appended whole.
func segment(dst, p []byte, i int) []byte {
	ip, tcp, payload, mss, ok := parseGSO(p)
	if !ok {
		return append(dst, p...)
	}
	frames := (len(payload) + mss - 1) / mss
	part := payload[i*mss : min((i+1)*mss, len(payload))]

	dst = append(dst, make([]byte, vnetHdrLen)...) // no offload, checksums done
	ipAt := len(dst)
	dst = append(dst, ip...)
	tcpAt := len(dst)
	dst = append(dst, tcp...)
	dst = append(dst, part...)

	h := dst[ipAt:tcpAt]
	binary.BigEndian.PutUint16(h[2:], uint16(len(ip)+len(tcp)+len(part)))
	binary.BigEndian.PutUint16(h[4:], binary.BigEndian.Uint16(ip[4:])+uint16(i))
	h[10], h[11] = 0, 0
	binary.BigEndian.PutUint16(h[10:], ^fold(sum(0, h)))

	t := dst[tcpAt:]
	binary.BigEndian.PutUint32(t[4:], binary.BigEndian.Uint32(tcp[4:])+uint32(i*mss))
	const fin, psh, cwr = 0x01, 0x08, 0x80
	if i != frames-1 {
		t[13] &^= fin | psh
	}
	if i != 0 {
		t[13] &^= cwr
	}
	t[16], t[17] = 0, 0
	pseudo := sum(0, ip[12:20]) + 6 + uint32(len(t)) // addresses, protocol, length
	binary.BigEndian.PutUint16(t[16:], ^fold(sum(pseudo, t)))
	return dst
}

// sum adds b as big-endian 16-bit words to s (the Internet checksum's sum).
func sum(s uint32, b []byte) uint32 {
	for len(b) >= 2 {
		s += uint32(b[0])<<8 | uint32(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		s += uint32(b[0]) << 8
	}
	return s
}

func fold(s uint32) uint16 {
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return uint16(s)
}
