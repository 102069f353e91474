package simlink

import (
	"net"
	"sort"
	"testing"
	"time"

	"github.com/marcopolo/simnet"
)

func TestExpTimer(t *testing.T) {
	for _, d := range []time.Duration{10 * time.Microsecond, 120 * time.Microsecond, 500 * time.Microsecond, 2 * time.Millisecond} {
		var got []time.Duration
		tm := time.NewTimer(time.Hour)
		for i := 0; i < 200; i++ {
			s := time.Now()
			tm.Reset(d)
			<-tm.C
			got = append(got, time.Since(s))
		}
		sort.Slice(got, func(i, j int) bool { return got[i] < got[j] })
		t.Logf("timer %v: p10 %v p50 %v p90 %v", d, got[20], got[100], got[180])
	}
}

func TestExpRawSimnet(t *testing.T) {
	for _, mbps := range []int{20, 100, 1000} {
		n := &simnet.Simnet{LatencyFunc: simnet.StaticLatency(25 * time.Millisecond)}
		ls := simnet.NodeBiDiLinkSettings{Uplink: simnet.LinkSettings{BitsPerSecond: mbps * 1e6}, Downlink: simnet.LinkSettings{BitsPerSecond: mbps * 1e6}}
		a := n.NewEndpoint(&net.UDPAddr{IP: net.IPv4(1, 0, 0, 1), Port: 1}, ls)
		b := n.NewEndpoint(&net.UDPAddr{IP: net.IPv4(1, 0, 0, 2), Port: 1}, ls)
		n.Start()
		const pkts = 3000
		done := make(chan time.Time)
		var first time.Time
		got := 0
		go func() {
			buf := make([]byte, 2000)
			var last time.Time
			for i := 0; i < pkts; i++ {
				b.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
				if _, _, err := b.ReadFrom(buf); err != nil {
					break
				}
				got++
				last = time.Now()
				if i == 0 {
					first = time.Now()
				}
			}
			done <- last
		}()
		pkt := make([]byte, 1400)
		for i := 0; i < pkts; i++ {
			a.WriteTo(pkt, b.LocalAddr())
		}
		end := <-done
		el := end.Sub(first)
		t.Logf("simnet %d Mbit/s: delivered %.1f Mbit/s (%d pkts in %v)", mbps, float64(got-1)*1400*8/el.Seconds()/1e6, got, el)
		n.Close()
	}
}
