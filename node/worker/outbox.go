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
	"github.com/pipeswarm/pipeswarm/p2p/traffic"
)

// outbox sends a worker's frames and control messages without blocking its loop or
// its compute: one queue and goroutine per (peer, protocol), so everything to one
// destination arrives in the order it was sent. Tensor frames share one long-lived
// stream per destination; control messages take a stream each and wait for the reply.
type outbox struct {
	host   *p2p.Host
	log    *slog.Logger
	sent   *sentBytes
	meters *traffic.Meters // nil: not counted
	calls  *wire.CallClock // control messages' deadlines
	fail   func(error)     // a frame or norm that cannot be delivered ends the run
	// undelivered, if set, hears of every other control message (a report) that
	// could not be delivered, with its destination.
	undelivered func(to peer.ID)
	ctx         context.Context
	cancel      context.CancelFunc

	mu     sync.Mutex
	queues map[qkey]chan any
	wg     sync.WaitGroup
	closed bool
}

type qkey struct {
	to    peer.ID
	proto protocol.ID
}

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

func newOutbox(h *p2p.Host, log *slog.Logger, sent *sentBytes, meters *traffic.Meters, calls *wire.CallClock, fail func(error)) *outbox {
	ctx, cancel := context.WithCancel(context.Background())
	return &outbox{host: h, log: log, sent: sent, meters: meters, calls: calls, fail: fail, ctx: ctx, cancel: cancel, queues: map[qkey]chan any{}}
}

func (o *outbox) send(to peer.ID, proto protocol.ID, f *p2p.Frame) { o.enqueue(qkey{to, proto}, f) }

func (o *outbox) control(to peer.ID, m wire.Msg) { o.enqueue(qkey{to, p2p.ProtoControl}, m) }

func (o *outbox) enqueue(k qkey, item any) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return
	}
	q, ok := o.queues[k]
	if !ok {
		q = make(chan any, 1024)
		o.queues[k] = q
		o.wg.Add(1)
		go o.run(k, q)
	}
	q <- item
}

// close lets queued items drain for a few seconds, then gives up on the rest.
func (o *outbox) close() {
	o.mu.Lock()
	if o.closed {
		o.mu.Unlock()
		return
	}
	o.closed = true
	for _, q := range o.queues {
		close(q)
	}
	o.mu.Unlock()
	done := make(chan struct{})
	go func() { o.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		o.log.Warn("outbox: gave up on undelivered messages")
	}
	o.cancel()
	<-done
}

func (o *outbox) run(k qkey, q chan any) {
	defer o.wg.Done()
	var s network.Stream
	defer func() {
		if s != nil {
			s.Close()
		}
	}()
	for item := range q {
		switch item := item.(type) {
		case wire.Msg:
			r, err := wire.Call(o.ctx, o.host, o.calls, o.meters.For(p2p.ProtoControl), k.to, item)
			if err == nil && !r.OK {
				err = fmt.Errorf("%s refused by %s: %s", item.Type, k.to, r.Error)
			}
			if err != nil {
				o.log.Warn("control message not delivered", "type", item.Type, "to", k.to, "err", err)
				if item.Type == wire.MsgNorm {
					o.fail(err)
				} else if o.undelivered != nil && o.ctx.Err() == nil {
					o.undelivered(k.to)
				}
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
			if err != nil && o.ctx.Err() == nil {
				o.fail(fmt.Errorf("sending step %d micro-batch %d to %s on %s: %w", item.Step, item.Micro, k.to, k.proto, err))
			}
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
