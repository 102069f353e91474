package reduce

import (
	"crypto/sha256"
	"encoding/binary"
	"hash"
	"math"
)

// serveState answers a state request from member to with the vectors
// State returns, in pieces, then their sha256.
func (g *Group) serveState(to int, want uint64, tag uint32) {
	r, vecs, ok := g.servable(to, want, tag)
	if !ok {
		return
	}
	for i, v := range vecs {
		for k := range numPieces(len(v), g.lim.plen) {
			pr := pieceRange(len(v), g.lim.plen, k)
			payload := make([]byte, 4*pr.Len())
			for j, x := range v[pr.Lo:pr.Hi] {
				binary.LittleEndian.PutUint32(payload[4*j:], math.Float32bits(x))
			}
			g.sendFrame(to, header{typ: typeState, round: r, n: uint32(len(v)), index: uint32(i), offset: uint32(pr.Lo), count: uint32(pr.Len()), tag: tag}, payload)
		}
	}
	sum := stateHash(r, vecs)
	g.sendFrame(to, header{typ: typeStateEnd, round: r, index: uint32(len(vecs)), mask: g.live | bit(g.self), tag: tag}, sum[:])
	g.log.Info("served state", "to", g.peerName(to), "round", r, "vectors", len(vecs))
}

// stateHash is the sha256 of round, the vector count, and each vector's
// length and values, all little-endian.
func stateHash(r uint64, vecs [][]float32) [hashLen]byte {
	h := sha256.New()
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], r)
	h.Write(b[:])
	binary.LittleEndian.PutUint32(b[:4], uint32(len(vecs)))
	h.Write(b[:4])
	for _, v := range vecs {
		writeVector(h, v)
	}
	var out [hashLen]byte
	h.Sum(out[:0])
	return out
}

// vectorHash is the sha256 of v's length and values, little-endian.
func vectorHash(v []float32) [hashLen]byte {
	h := sha256.New()
	writeVector(h, v)
	var out [hashLen]byte
	h.Sum(out[:0])
	return out
}

// writeVector writes v's length and values, little-endian, to h.
func writeVector(h hash.Hash, v []float32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], uint32(len(v)))
	h.Write(b[:])
	buf := make([]byte, 0, 4096)
	for _, x := range v {
		buf = binary.LittleEndian.AppendUint32(buf, math.Float32bits(x))
		if len(buf) == cap(buf) {
			h.Write(buf)
			buf = buf[:0]
		}
	}
	h.Write(buf)
}

// servable is State's answer for round want, or false (state-none sent to
// member to) when there is none this member may serve.
func (g *Group) servable(to int, want uint64, tag uint32) (uint64, [][]float32, bool) {
	if g.cfg.State == nil || g.needFetch || g.left {
		g.sendCtl(to, header{typ: typeStateNone, tag: tag})
		return 0, nil, false
	}
	r, vecs := g.cfg.State(want)
	if len(vecs) > maxStateVecs {
		g.log.Error("State returned too many vectors", "count", len(vecs), "max", maxStateVecs)
		g.sendCtl(to, header{typ: typeStateNone, tag: tag})
		return 0, nil, false
	}
	for i, v := range vecs {
		if len(v) > g.cfg.MaxValues || firstNonFinite(v) >= 0 {
			g.log.Error("State returned an unservable vector", "index", i, "len", len(v), "max", g.cfg.MaxValues)
			g.sendCtl(to, header{typ: typeStateNone, tag: tag})
			return 0, nil, false
		}
	}
	return r, vecs, true
}

// serveInfo describes the state as of round want to member to: its round,
// the live members, and each vector's length and sha256.
func (g *Group) serveInfo(to int, want uint64, tag uint32) {
	r, vecs, ok := g.servable(to, want, tag)
	if !ok {
		return
	}
	payload := make([]byte, 0, infoEntry*len(vecs))
	for _, v := range vecs {
		payload = binary.LittleEndian.AppendUint32(payload, uint32(len(v)))
		sum := vectorHash(v)
		payload = append(payload, sum[:]...)
	}
	g.sendFrame(to, header{typ: typeStateInfo, round: r, index: uint32(len(vecs)), mask: g.live | bit(g.self), tag: tag}, payload)
}

// servePieces sends member to the pieces its request names of the state as
// of round want exactly (state-none if that round is no longer held), then
// a state-pieces-end.
func (g *Group) servePieces(to int, want uint64, tag uint32, req []byte) {
	r, vecs, ok := g.servable(to, want, tag)
	if !ok {
		return
	}
	if r != want {
		g.sendCtl(to, header{typ: typeStateNone, tag: tag})
		return
	}
	n := len(req) / 8
	for k := range n {
		i, j := int(binary.LittleEndian.Uint32(req[8*k:])), int(binary.LittleEndian.Uint32(req[8*k+4:]))
		if i >= len(vecs) || j >= numPieces(len(vecs[i]), g.lim.plen) {
			g.svc.penalise(g.peerAt(to), badFrame("state-pieces-req: piece %d of vector %d, which has %d vectors", j, i, len(vecs)))
			g.sendCtl(to, header{typ: typeStateNone, tag: tag})
			return
		}
	}
	for k := range n {
		i, j := int(binary.LittleEndian.Uint32(req[8*k:])), int(binary.LittleEndian.Uint32(req[8*k+4:]))
		v := vecs[i]
		pr := pieceRange(len(v), g.lim.plen, j)
		payload := make([]byte, 4*pr.Len())
		for q, x := range v[pr.Lo:pr.Hi] {
			binary.LittleEndian.PutUint32(payload[4*q:], math.Float32bits(x))
		}
		g.sendFrame(to, header{typ: typeState, round: r, n: uint32(len(v)), index: uint32(i), offset: uint32(pr.Lo), count: uint32(pr.Len()), tag: tag}, payload)
	}
	g.sendCtl(to, header{typ: typeStatePiecesEnd, round: r, index: uint32(n), tag: tag})
	g.log.Info("served state pieces", "to", g.peerName(to), "round", r, "pieces", n)
}
