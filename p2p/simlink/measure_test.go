package simlink

import (
	"context"
	"flag"
	"syscall"
	"testing"
	"time"


	"github.com/pipeswarm/pipeswarm/p2p/probe"
)

var measure = flag.Bool("simlink.measure", false, "measure every profile (and simnet for comparison) and log the figures")

// cpuTime is the process's user+system CPU time so far.
func cpuTime(t testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// bytesFor is a transfer that lasts about 1.5 s at link's rate.
func bytesFor(l Link) int64 { return max(int64(l.Mbps*1e6/8*1.5), probe.MinBytes) }

func TestMeasureProfiles(t *testing.T) {
	if !*measure {
		t.Skip("set -simlink.measure to run")
	}
	for _, name := range ProfileNames() {
		l, err := Profile(name)
		if err != nil {
			t.Fatal(err)
		}
		nw, h, p := pair(t, l, l)
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		cpu, wall := cpuTime(t), time.Now()
		r, err := probe.Measure(ctx, h.Host, p, bytesFor(l))
		cancel()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		cpu, elapsed := cpuTime(t)-cpu, time.Since(wall)
		st := nw.Stats()
		t.Logf("%-16s %-36v %v; %.0f%%/%.0f%% of rate, rtt %+.1f%%; cpu %.2f cores; drops queue %d loss %d buffer %d of %d",
			name, l, r, 100*r.UpMbps/l.Mbps, 100*r.DownMbps/l.Mbps, 100*(float64(r.RTT)/float64(2*l.Latency)-1),
			cpu.Seconds()/elapsed.Seconds(), st.QueueDrops, st.LossDrops, st.BufferDrops, st.Sent)
		h.Close()
	}
}

// TestMeasureSimnet is the evidence for not using simnet: its links run at
// a fraction of their rate. First raw packets, then libp2p over it.
func TestMeasureSimnet(t *testing.T) {
	if !*measure {
		t.Skip("set -simlink.measure to run")
	}
	for _, mbps := range []int{100, 1000} {
		t.Logf("simnet raw %d Mbit/s: delivered %.1f Mbit/s", mbps, simnetRawRate(t, mbps))
	}
	for _, l := range []Link{{Mbps: 100, Latency: 25 * time.Millisecond}, {Mbps: 1000, Latency: time.Millisecond}} {
		nw := &simnet.Simnet{LatencyFunc: simnet.StaticLatency(l.Latency)}
		nw.Start()
		ls := simnet.NodeBiDiLinkSettings{
			Uplink:   simnet.LinkSettings{BitsPerSecond: int(l.Mbps * 1e6)},
			Downlink: simnet.LinkSettings{BitsPerSecond: int(l.Mbps * 1e6)},
		}
		var hosts []*p2p.Host
		for i := range 2 {
			ip := net.IPv4(1, 0, 0, byte(i+1))
			transports := quicOver(ip, func(a *net.UDPAddr) (net.PacketConn, error) { return nw.NewEndpoint(a, ls), nil })
			hosts = append(hosts, startHost(t, transports, []string{fmt.Sprintf("/ip4/%s/udp/%d/quic-v1", ip, Port)}))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		id, err := hosts[0].Connect(ctx, hosts[1].Addrs()[0])
		if err != nil {
			t.Fatal(err)
		}
		r, err := probe.Measure(ctx, hosts[0].Host, id, bytesFor(l))
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("simnet libp2p %v: %v", l, r)
		for _, h := range hosts {
			h.Close()
		}
		nw.Close()
	}
}

// simnetRawRate writes 3000 1400-byte datagrams through a simnet link
// with 25 ms latency and returns the rate at which they arrive.
func simnetRawRate(t *testing.T, mbps int) float64 {
	nw := &simnet.Simnet{LatencyFunc: simnet.StaticLatency(25 * time.Millisecond)}
	ls := simnet.NodeBiDiLinkSettings{Uplink: simnet.LinkSettings{BitsPerSecond: mbps * 1e6}, Downlink: simnet.LinkSettings{BitsPerSecond: mbps * 1e6}}
	a := nw.NewEndpoint(&net.UDPAddr{IP: net.IPv4(1, 0, 0, 1), Port: 1}, ls)
	b := nw.NewEndpoint(&net.UDPAddr{IP: net.IPv4(1, 0, 0, 2), Port: 1}, ls)
	nw.Start()
	defer nw.Close()
	const pkts = 3000
	go func() {
		p := make([]byte, 1400)
		for range pkts {
			a.WriteTo(p, b.LocalAddr())
		}
	}()
	buf := make([]byte, 2000)
	var first, last time.Time
	got := 0
	for range pkts {
		b.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		if _, _, err := b.ReadFrom(buf); err != nil {
			break // CoDel drops some of the burst
		}
		last = time.Now()
		if got == 0 {
			first = last
		}
		got++
	}
	return float64(got-1) * 1400 * 8 / last.Sub(first).Seconds() / 1e6
}
