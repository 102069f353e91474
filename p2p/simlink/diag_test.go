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
	name := os.Getenv("DIAG_PROFILE")
	if name == "" {
		t.Skip()
	}
	l, _ := Profile(name)
	probe.AlignUpload = os.Getenv("DIAG_NOALIGN") == ""
	if v := os.Getenv("DIAG_Q"); v != "" {
		queueRTTs, _ = strconv.ParseFloat(v, 64)
	}
	if v := os.Getenv("DIAG_MINQ"); v != "" {
		minQueue, _ = time.ParseDuration(v)
	}
	nw, h, p := pair(t, l, l)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	start := time.Now()
	r, err := probe.Measure(ctx, h.Host, p, bytesFor(l))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s q=%v minq=%v: %v in %v; %+v", name, queueRTTs, minQueue, r, time.Since(start), nw.Stats())
}
