package worker

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"

	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/clock"
	"github.com/pipeswarm/pipeswarm/p2p/traffic"
)

// outbox sends a worker's frames and control messages without blocking its loop or
// its compute. One goroutine (loop) owns the queues, one per destination (peer,
// protocol); callers hand it typed messages and never wait on a destination. Each
// destination has a sender goroutine that delivers what the loop hands it, in the
// order it was sent, and says when it is idle; a peer that stops reading holds up
// its own queue and nothing else. Tensor frames share one long-lived stream per
// destination; control messages take a stream each and wait for the reply.
type outbox struct {
	host   *p2p.Host
	log    *slog.Logger
	clock  clock.Clock
	sent   *sentBytes
	meters *traffic.Meters // nil: not counted
	calls  *wire.CallClock // control messages' deadlines
	fail   func(error)     // a frame or norm that cannot be delivered ends the run
	// undelivered, if set, hears of every other control message (a report) that
	// could not be delivered, with its destination.
	undelivered func(to peer.ID)
	ctx         context.Context
	cancel      context.CancelFunc

	inbox   chan outboxMsg
	stopped chan struct{} // closed when the loop has returned: every queue delivered or given up
	senders sync.WaitGroup
}

type qkey struct {
	to    peer.ID
	proto protocol.ID
}

// outboxMsg is what the loop is told.
type outboxMsg interface{ outboxMsg() }

type (
	// queued: item (a *p2p.Frame or a wire.Msg) is for k.
	queued struct {
		k    qkey
		item any
	}
	// senderIdle: k's sender delivered all it was handed.
	senderIdle struct{ k qkey }
	// closing: deliver what is queued, take nothing more, and stop.
	closing struct{}
)

func (queued) outboxMsg()     {}
func (senderIdle) outboxMsg() {}
func (closing) outboxMsg()    {}

// maxQueued bounds the frames that wait for one destination: 1F1B keeps only a few in
// flight to a neighbour, so a queue this long means its peer has stopped reading, and
// what comes on top is undeliverable. Control messages are not bounded here: each
// call has its deadline, and one that runs out is reported (a norm ends the run, a
// report makes the stage look for its launcher), so a slow launcher's queue drains or
// the run stops.
const maxQueued = 1024

// closeWait is how long close lets queued messages drain before giving up on them.
const closeWait = 5 * time.Second

// sentBytes counts encoded frame bytes by kind, for bytes-per-token figures.
type sentBytes struct{ act, grad, eval atomic.Int64 }

func (b *sentBytes) total() int64 { return b.act.Load() + b.grad.Load() + b.eval.Load() }

func (b *sentBytes) add(k p2p.Kind, n int64) {
	switch k {
	case p2p.KindActivation:
		b.act.Add(n)
	case p2p.KindGradient:
		b.grad.Add(n)
	default:
		b.eval.Add(n)
	}
}

func newOutbox(h *p2p.Host, log *slog.Logger, clk clock.Clock, sent *sentBytes, meters *traffic.Meters, calls *wire.CallClock, fail func(error)) *outbox {
	ctx, cancel := context.WithCancel(context.Background())
	o := &outbox{host: h, log: log, clock: clock.Or(clk), sent: sent, meters: meters, calls: calls, fail: fail, ctx: ctx, cancel: cancel,
		inbox: make(chan outboxMsg, 64), stopped: make(chan struct{})}
	go o.loop()
	return o
}

func (o *outbox) send(to peer.ID, proto protocol.ID, f *p2p.Frame) {
	o.tell(queued{qkey{to, proto}, f})
}

func (o *outbox) control(to peer.ID, m wire.Msg) { o.tell(queued{qkey{to, p2p.ProtoControl}, m}) }

// tell hands the loop m; after the loop has stopped, m is dropped. The loop never
// waits on a destination, so this waits at most for it to take the messages before.
func (o *outbox) tell(m outboxMsg) {
	select {
	case o.inbox <- m:
	case <-o.stopped:
	}
}

// close lets queued items drain for closeWait, then gives up on the rest.
func (o *outbox) close() {
	o.tell(closing{})
	drained := make(chan struct{})
	go func() { <-o.stopped; o.senders.Wait(); close(drained) }()
	t := o.clock.NewTimer(closeWait)
	defer t.Stop()
	select {
	case <-drained:
	case <-t.C():
		o.log.Warn("outbox: gave up on undelivered messages")
	}
	o.cancel()
	<-drained
}

// queue is one destination's, owned by the loop.
type queue struct {
	pending []any
	busy    bool       // its sender holds a batch
	work    chan []any // capacity 1, handed a batch only while the sender is idle: never blocks
}

// loop owns the queues until close has had every one delivered (or given up).
func (o *outbox) loop() {
	defer close(o.stopped)
	queues := map[qkey]*queue{}
	stopping := false
	hand := func(q *queue) {
		if !q.busy && len(q.pending) > 0 {
			q.busy = true
			q.work <- q.pending
			q.pending = nil
		}
	}
	for m := range o.inbox {
		switch m := m.(type) {
		case queued:
			if stopping {
				continue
			}
			q := queues[m.k]
			if q == nil {
				q = &queue{work: make(chan []any, 1)}
				queues[m.k] = q
				o.senders.Add(1)
				go o.run(m.k, q.work)
			}
			if _, frame := m.item.(*p2p.Frame); frame && len(q.pending) >= maxQueued {
				o.senders.Add(1)
				go func() {
					defer o.senders.Done()
					o.undeliverable(m.k, m.item, fmt.Errorf("%d messages already queued: the peer has stopped reading", len(q.pending)))
				}()
				continue
			}
			q.pending = append(q.pending, m.item)
			hand(q)
		case senderIdle:
			q := queues[m.k]
			q.busy = false
			hand(q)
		case closing:
			stopping = true
		}
		if stopping && idle(queues) {
			for _, q := range queues {
				close(q.work)
			}
			return
		}
	}
}

func idle(queues map[qkey]*queue) bool {
	for _, q := range queues {
		if q.busy || len(q.pending) > 0 {
			return false
		}
	}
	return true
}

// run is k's sender: it delivers each batch the loop hands it, in order.
func (o *outbox) run(k qkey, work <-chan []any) {
	defer o.senders.Done()
	var s network.Stream
	defer func() {
		if s != nil {
			s.Close()
		}
	}()
	for batch := range work {
		for _, item := range batch {
			s = o.deliver(k, s, item)
		}
		o.tell(senderIdle{k})
	}
}

// deliver sends item to k on s (a tensor stream, nil if none is open yet) and
// returns the stream to use next.
func (o *outbox) deliver(k qkey, s network.Stream, item any) network.Stream {
	switch item := item.(type) {
	case wire.Msg:
		r, err := wire.Call(o.ctx, o.host, o.calls, o.meters.For(p2p.ProtoControl), k.to, item)
		if err == nil && !r.OK {
			err = fmt.Errorf("%s refused by %s: %s", item.Type, k.to, r.Error)
		}
		if err != nil {
			o.undeliverable(k, item, err)
		}
	case *p2p.Frame:
		// One retry on a fresh stream covers a stream the peer reset.
		var err error
		if s != nil && p2p.ConnRelayed(s.Conn()) && p2p.HasDirect(o.host.Network(), k.to) {
			o.leaveRelay(s, k)
			s = nil
		}
		for attempt := 0; attempt < 2; attempt++ {
			if s == nil {
				if s, err = o.host.OpenTensorStream(o.ctx, k.to, k.proto); err != nil {
					s = nil
					continue
				}
			}
			cw := &traffic.CountingWriter{W: s}
			if err = p2p.WriteFrame(cw, item); err != nil {
				s.Reset()
				s = nil
				continue
			}
			o.sent.add(item.Kind, cw.N)
			o.meters.For(k.proto).Out(cw.N)
			break
		}
		if err != nil {
			o.undeliverable(k, item, err)
		}
	}
	return s
}

// undeliverable handles item, which could not be delivered to k: a frame or a norm
// ends the run, another control message goes to undelivered.
func (o *outbox) undeliverable(k qkey, item any, err error) {
	switch item := item.(type) {
	case wire.Msg:
		o.log.Warn("control message not delivered", "type", item.Type, "to", k.to, "err", err)
		if item.Type == wire.MsgNorm {
			o.fail(err)
		} else if o.undelivered != nil && o.ctx.Err() == nil {
			o.undelivered(k.to)
		}
	case *p2p.Frame:
		if o.ctx.Err() == nil {
			o.fail(fmt.Errorf("sending step %d micro-batch %d to %s on %s: %w", item.Step, item.Micro, k.to, k.proto, err))
		}
	}
}

// relayDrain bounds how long a stream leaving a relay waits for its peer to
// read what it already sent.
const relayDrain = 30 * time.Second

// leaveRelay ends a tensor stream that runs through a relay now that a direct
// connection exists, so that the next frame opens a stream on it. It waits for
// the peer to read every frame sent (the peer closes the stream at EOF), so
// frames on the old and new streams cannot overtake each other.
func (o *outbox) leaveRelay(s network.Stream, k qkey) {
	start := time.Now()
	_ = s.SetReadDeadline(start.Add(relayDrain))
	if err := s.CloseWrite(); err == nil {
		_, err = io.Copy(io.Discard, s)
		if err != nil {
			o.log.Warn("stream leaving the relay did not drain", "peer", k.to, "protocol", k.proto, "err", err)
		}
	}
	s.Close()
	o.log.Info("tensor stream moves from the relay to a direct connection", "peer", k.to, "protocol", k.proto,
		"drained", time.Since(start).Round(time.Millisecond))
}
