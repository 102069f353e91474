package launcher

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
)

func loopbackHost(t *testing.T) *p2p.Host {
	t.Helper()
	k, err := p2p.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	h, err := p2p.NewHost(t.Context(), p2p.HostOptions{Key: k, Listen: []string{"/ip4/127.0.0.1/tcp/0"},
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// A report that comes once the launcher has stopped reading a run's reports (watch
// has returned, and its channel is full or unread) is refused at once: the handler
// returns rather than wait for ever on a channel nobody reads. Reports before that
// are taken.
func TestAReportAfterTheRunIsOverIsRefusedNotLeftWaiting(t *testing.T) {
	launcher, node := loopbackHost(t), loopbackHost(t)
	const run = 7
	reports := make(chan wire.Report, 1)
	over := make(chan struct{})
	returned := make(chan struct{}, 4)
	handle := reportHandler(launcher, run, reports, over, slog.New(slog.NewTextHandler(io.Discard, nil)))
	launcher.Handle(p2p.ProtoControl, func(s network.Stream) {
		handle(s)
		returned <- struct{}{}
	})
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := node.Host.Connect(ctx, peer.AddrInfo{ID: launcher.ID(), Addrs: launcher.Host.Addrs()}); err != nil {
		t.Fatal(err)
	}
	send := func(step int) (*wire.Reply, error) {
		return wire.Call(ctx, node, wire.NewCallClock(10*time.Second, nil), nil, launcher.ID(),
			wire.Msg{Type: wire.MsgReport, Run: run, Report: &wire.Report{Run: run, Kind: wire.ReportStep, Step: step}})
	}
	if rep, err := send(1); err != nil || !rep.OK {
		t.Fatalf("a report while the run goes: %+v, %v; want it taken", rep, err)
	}
	if r := <-reports; r.Step != 1 || r.Peer != node.ID().String() {
		t.Errorf("took %+v, want step 1 from the node that sent it", r)
	}
	<-returned
	reports <- wire.Report{} // full, as a channel nobody reads ends up
	close(over)
	rep, err := send(2)
	if err != nil || rep.OK || !strings.Contains(rep.Error, "is over") {
		t.Fatalf("a report after the run: %+v, %v; want it refused as over", rep, err)
	}
	select {
	case <-returned:
	case <-ctx.Done():
		t.Fatal("the report handler is still waiting to hand on a report nobody reads")
	}
}
