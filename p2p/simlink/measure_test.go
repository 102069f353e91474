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
