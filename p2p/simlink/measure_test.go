package simlink

import (
	"context"
	"flag"
	"fmt"
	"net"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/marcopolo/simnet"

	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/probe"
)

var measureAll = flag.Bool("simlink.measure", false, "measure every profile (and simnet for comparison) and log the figures")

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
	if !*measureAll {
		t.Skip("set -simlink.measure to run")
	}
	type row struct {
		name  string
		link  Link
		bytes int64
	}
	var rows []row
	for _, name := range ProfileNames() {
		l, err := Profile(name)
		if err != nil {
			t.Fatal(err)
		}
		rows = append(rows, row{name, l, bytesFor(l)})
	}
	ic, _ := Profile("intercontinental")
	noLoss := ic
	noLoss.Loss = 0
	rows = append(rows,
		// What libp2p and the clock add to an RTT: no latency, no queue.
		row{"no-latency", Link{Mbps: 1e5}, 1 << 20},
		// The loss, not the link, limits intercontinental: without it (4 s
		// worth, for slow start's overshoot into the 150 ms queue to clear)…
		row{"ic-no-loss", noLoss, int64(noLoss.Mbps * 1e6 / 8 * 4)},
		// …and with it, over 20 MB rather than 1.5 s worth.
		row{"ic-long", ic, 20 << 20},
	)
	for i, r := range rows {
		g := runtime.NumGoroutine()
		nw, h, p := pair(t, r.link, r.link)
		if i == 0 {
			t.Logf("a network and two connected hosts run %d goroutines", runtime.NumGoroutine()-g)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
		cpu, wall := cpuTime(t), time.Now()
		res, err := probe.Measure(ctx, h.Host, p, r.bytes)
		cancel()
		if err != nil {
			t.Fatalf("%s: %v", r.name, err)
		}
		cpu, elapsed := cpuTime(t)-cpu, time.Since(wall)
		st := nw.Stats()
		gbit := float64(2*r.bytes) * 8 / 1e9
		t.Logf("%-16s %-36v %v; %.0f%%/%.0f%% of rate, rtt %+.1f%%; %.1f s, %.2f cores, %.2f cpu-s/Gbit; drops: queue %d loss %d buffer %d of %d",
			r.name, r.link, res, 100*res.UpMbps/r.link.Mbps, 100*res.DownMbps/r.link.Mbps, 100*(float64(res.RTT)/float64(2*r.link.Latency)-1),
			elapsed.Seconds(), cpu.Seconds()/elapsed.Seconds(), cpu.Seconds()/gbit, st.QueueDrops, st.LossDrops, st.BufferDrops, st.Sent)
		h.Close()
	}
}

// TestMeasureSimnet is the evidence for not using simnet: its links run at
// a fraction of their rate. First raw packets, then libp2p over it.
func TestMeasureSimnet(t *testing.T) {
	if !*measureAll {
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
		r, err := probe.Measure(ctx, hosts[0].Host, id, 16<<20) // simnet's rates are far lower

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
