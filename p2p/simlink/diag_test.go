package simlink

import (
	"context"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/p2p/probe"
)

func TestDiag(t *testing.T) {
	if os.Getenv("DIAG_MBPS") == "" {
		t.Skip()
	}
	mbps, _ := strconv.ParseFloat(os.Getenv("DIAG_MBPS"), 64)
	lat, _ := time.ParseDuration(os.Getenv("DIAG_LAT"))
	loss, _ := strconv.ParseFloat(os.Getenv("DIAG_LOSS"), 64)
	secs, _ := strconv.ParseFloat(os.Getenv("DIAG_SECS"), 64)
	l := Link{Mbps: mbps, Latency: lat, Loss: loss}
	nw, h, p := pair(t, l, l)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Second)
	defer cancel()
	start := time.Now()
	cpu := cpuTime(t)
	r, err := probe.Measure(ctx, h.Host, p, int64(mbps*1e6/8*secs))
	if err != nil {
		t.Fatal(err)
	}
	el := time.Since(start)
	cpu = cpuTime(t) - cpu
	t.Logf("DIAG %v: %v in %v; cpu %.2f cores, %.2f cpu-s/Gbit; %+v", l, r, el, cpu.Seconds()/el.Seconds(), cpu.Seconds()/(2*float64(int64(mbps*1e6/8*secs))*8/1e9), nw.Stats())
}
