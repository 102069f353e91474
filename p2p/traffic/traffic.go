// Package traffic counts the frames and bytes a node moves, per wire protocol and
// direction. The code that reads and writes each protocol's frames counts them where
// it does so; metrics and the status page read the counts. Counting is a few atomic
// adds per frame, cheap enough for every frame.
package traffic

import (
	"io"
	"sync/atomic"

	"github.com/libp2p/go-libp2p/core/protocol"
)

// Counts is what one protocol moved since its Meter was made.
type Counts struct {
	FramesIn  uint64 `json:"frames_in"`
	FramesOut uint64 `json:"frames_out"`
	BytesIn   uint64 `json:"bytes_in"`  // on the wire: headers included
	BytesOut  uint64 `json:"bytes_out"` // on the wire: headers included
}

// Meter counts one protocol's frames and bytes. It is safe for concurrent use, and a
// nil *Meter counts nothing, so code that may run unmetered (tests, the launcher)
// needs no checks.
type Meter struct {
	framesIn, framesOut, bytesIn, bytesOut atomic.Uint64
}

// In counts one frame of n bytes received.
func (m *Meter) In(n int64) {
	if m == nil || n < 0 {
		return
	}
	m.framesIn.Add(1)
	m.bytesIn.Add(uint64(n))
}

// Out counts one frame of n bytes sent.
func (m *Meter) Out(n int64) {
	if m == nil || n < 0 {
		return
	}
	m.framesOut.Add(1)
	m.bytesOut.Add(uint64(n))
}

// Counts reads the meter. The four numbers are read one after the other, not as one
// atomic snapshot: each is exact, and a frame counted meanwhile may show in one and
// not yet in another.
func (m *Meter) Counts() Counts {
	if m == nil {
		return Counts{}
	}
	return Counts{FramesIn: m.framesIn.Load(), FramesOut: m.framesOut.Load(), BytesIn: m.bytesIn.Load(), BytesOut: m.bytesOut.Load()}
}

// Meters is one Meter per protocol, fixed when made: lookups need no lock.
type Meters struct {
	protos []protocol.ID
	by     map[protocol.ID]*Meter
}

// NewMeters makes a meter for each of protos (a protocol named twice gets one).
func NewMeters(protos ...protocol.ID) *Meters {
	m := &Meters{by: make(map[protocol.ID]*Meter, len(protos))}
	for _, p := range protos {
		if _, dup := m.by[p]; !dup {
			m.protos = append(m.protos, p)
			m.by[p] = &Meter{}
		}
	}
	return m
}

// For is the meter of proto, or nil (which counts nothing) if proto is not metered
// or m is nil.
func (m *Meters) For(proto protocol.ID) *Meter {
	if m == nil {
		return nil
	}
	return m.by[proto]
}

// Protocol is one protocol's counts.
type Protocol struct {
	Protocol string `json:"protocol"`
	Counts
}

// Snapshot reads every meter, in the order the protocols were given to NewMeters.
func (m *Meters) Snapshot() []Protocol {
	if m == nil {
		return nil
	}
	out := make([]Protocol, len(m.protos))
	for i, p := range m.protos {
		out[i] = Protocol{Protocol: string(p), Counts: m.by[p].Counts()}
	}
	return out
}

// CountingReader counts the bytes read through it; the reader of one stream uses it
// to learn each frame's size on the wire. Not safe for concurrent use.
type CountingReader struct {
	R io.Reader
	N int64
}

func (c *CountingReader) Read(p []byte) (int, error) {
	n, err := c.R.Read(p)
	c.N += int64(n)
	return n, err
}

// CountingWriter counts the bytes written through it. Not safe for concurrent use.
type CountingWriter struct {
	W io.Writer
	N int64
}

func (c *CountingWriter) Write(p []byte) (int, error) {
	n, err := c.W.Write(p)
	c.N += int64(n)
	return n, err
}
