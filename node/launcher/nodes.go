package launcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/membership"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/clock"
)

// launchNodes is runNodes over the launcher's host: control calls, each bounded by
// the node's round trips, so that a hung node holds nothing up for long.
type launchNodes struct {
	ctx    context.Context
	h      *p2p.Host
	calls  *wire.CallClock
	o      Options
	log    *slog.Logger
	run    uint64
	plan   *wire.Plan
	spares *idlePeers
	// mu guards plan.Stages and peers against the goroutines that read them besides
	// the watch loop, the only writer. peers are the nodes holding the plan's cells:
	// only they may fetch the run's text or report.
	mu    sync.Mutex
	peers map[peer.ID]assign.Assignment
}

func newLaunchNodes(ctx context.Context, h *p2p.Host, calls *wire.CallClock, o Options, log *slog.Logger, run uint64, spares *idlePeers) *launchNodes {
	return &launchNodes{ctx: ctx, h: h, calls: calls, o: o, log: log, run: run, spares: spares, peers: map[peer.ID]assign.Assignment{}}
}

// holds reports whether id holds a cell of the run.
func (n *launchNodes) holds(id peer.ID) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	_, ok := n.peers[id]
	return ok
}

// staffed takes the plan once its cells are staffed.
func (n *launchNodes) staffed(plan *wire.Plan) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.plan = plan
	for _, a := range plan.Stages {
		id, _ := peer.Decode(a.Peer)
		n.peers[id] = a
	}
}

// cells returns the plan's cells as they are now.
func (n *launchNodes) cells() []assign.Assignment {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.plan.Stages)
}

// within is a context for a call to id, by the deadline rule with slack.
func (n *launchNodes) within(ctx context.Context, slack time.Duration, id peer.ID) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, clock.Deadline(0, n.h.Peerstore().LatencyEWMA(id), slack))
}

// tell calls id with m, an error if it says no.
func (n *launchNodes) tell(ctx context.Context, id peer.ID, m wire.Msg) error {
	rep, err := wire.Call(ctx, n.h, n.calls, nil, id, m)
	if err == nil && !rep.OK {
		err = errors.New(rep.Error)
	}
	return err
}

// abort tells every node at once, each given a few of its round trips: a hung node
// (often the reason for the abort) must not hold the launcher up.
func (n *launchNodes) abort(reason string) {
	n.mu.Lock()
	ids := slices.Collect(maps.Keys(n.peers))
	n.mu.Unlock()
	var wg sync.WaitGroup
	for _, id := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			actx, cancel := n.within(context.WithoutCancel(n.ctx), clock.Brief, id)
			defer cancel()
			_, _ = wire.Call(actx, n.h, n.calls, nil, id, wire.Msg{Type: wire.MsgAbort, Run: n.run, Reason: reason})
		}()
	}
	wg.Wait()
}

// idle stops the nodes of a broken pipeline, keeping their state.
func (n *launchNodes) idle(a membership.Idle) {
	for _, p := range a.Peers {
		if id, err := peer.Decode(p); err == nil {
			go func() {
				_, _ = wire.Call(context.WithoutCancel(n.ctx), n.h, n.calls, nil, id, wire.Msg{Type: wire.MsgIdle, Run: n.run, Reason: a.Reason})
			}()
		}
	}
}

// drop tells a node of a whole pipeline to leave a broken pipeline's cell out of its
// all-reduce.
func (n *launchNodes) drop(d membership.Drop) {
	id, err := peer.Decode(d.To.Peer)
	if err != nil {
		return
	}
	n.mu.Lock()
	gone, ok := n.plan.Cell(d.Gone.Stage, d.Gone.Replica)
	n.mu.Unlock()
	if !ok {
		return
	}
	go func() {
		if err := n.tell(context.WithoutCancel(n.ctx), id, wire.Msg{Type: wire.MsgDrop, Run: n.run, Cell: &gone, Reason: d.Reason}); err != nil {
			n.log.Debug("a replica was not told to drop a broken pipeline from its all-reduce",
				"cell", wire.CellName(n.o.Spec, assign.Assignment{Stage: d.To.Stage, Replica: d.To.Replica}), "err", err)
		}
	}()
}

// askOffer asks a node, within a few of its round trips, whether it has a free slot
// and how much memory; a hung node cannot answer.
func (n *launchNodes) askOffer(q membership.AskOffer, post func(membership.Event)) {
	go func() {
		a := membership.OfferAnswered{Replica: q.Replica, Peer: q.Peer}
		if id, err := peer.Decode(q.Peer); err == nil {
			cctx, cancel := n.within(p2p.AllowRelayed(n.ctx, "rejoin"), clock.Brief, id)
			defer cancel()
			for _, addr := range q.Addrs {
				if info, err := peer.AddrInfoFromString(addr); err == nil && info.ID == id {
					n.h.Peerstore().AddAddrs(id, info.Addrs, peerstore.TempAddrTTL)
				}
			}
			err := n.h.Host.Connect(cctx, peer.AddrInfo{ID: id})
			var rep *wire.Reply
			if err == nil {
				rep, err = wire.Call(cctx, n.h, n.calls, nil, id, wire.Msg{Type: wire.MsgOffer})
			}
			if err == nil && rep.OK && rep.Offer != nil {
				a.Answered, a.MaxStages, a.Memory = true, rep.Offer.MaxStages, rep.Offer.MemoryBytes
			}
		}
		post(a)
	}()
}

// newcomers are the --peers, then the nodes heard on the heartbeat topic holding
// nothing (one that joined the swarm since).
func (n *launchNodes) newcomers() []membership.Candidate {
	var out []membership.Candidate
	listed := map[peer.ID]bool{}
	for _, addr := range n.o.Peers {
		if info, err := peer.AddrInfoFromString(addr); err == nil {
			out, listed[info.ID] = append(out, membership.Candidate{Peer: info.ID.String(), Addrs: []string{addr}}), true
		}
	}
	heard := n.spares.recent()
	for _, id := range slices.Sorted(maps.Keys(heard)) {
		if !listed[id] {
			out = append(out, membership.Candidate{Peer: id.String(), Addrs: heard[id]})
		}
	}
	return out
}

func (n *launchNodes) up(stage, replica int) bool {
	n.mu.Lock()
	a, ok := n.plan.Cell(stage, replica)
	n.mu.Unlock()
	id, err := peer.Decode(a.Peer)
	return ok && err == nil && p2p.Linked(n.h.Network(), id)
}

// order sends m to every cell (or replica pipeline r's), each a call of its own,
// bounded by the node's round trips: a hung node must not hold the others' orders up.
func (n *launchNodes) order(r int, m wire.Msg) (refused []string) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	for _, a := range n.cells() {
		if r >= 0 && a.Replica != r {
			continue
		}
		id, err := peer.Decode(a.Peer)
		if err != nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := n.within(context.WithoutCancel(n.ctx), clock.Busy, id)
			defer cancel()
			if err := n.tell(cctx, id, m); err != nil {
				mu.Lock()
				refused = append(refused, fmt.Sprintf("%s: %v", wire.CellName(n.o.Spec, a), err))
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return refused
}

func (n *launchNodes) checkpoint(step int, post func(membership.Event)) {
	go func() {
		if refused := n.order(-1, wire.Msg{Type: wire.MsgCheckpoint, Run: n.run, Step: step}); len(refused) > 0 {
			n.log.Warn("a checkpoint due by time was not taken by every stage; it is not one to resume from", "step", step, "refused", strings.Join(refused, "; "))
			return
		}
		post(membership.CheckpointTaken{Step: step})
	}()
}

func (n *launchNodes) recorded(step int) {
	go n.order(-1, wire.Msg{Type: wire.MsgRecorded, Run: n.run, Step: step})
}

func (n *launchNodes) stopAt(r, step int, reason string) {
	go func() {
		if refused := n.order(r, wire.Msg{Type: wire.MsgStopAt, Run: n.run, Step: step, Reason: reason}); len(refused) > 0 {
			n.log.Debug("not every stage took the stop", "step", step, "refused", strings.Join(refused, "; "))
		}
	}()
}

// join passes the cells in j.Moves to their new nodes (telling the other replicas
// first, so that their all-reduce counts the new node in), signs a plan that brings
// replica pipeline j.Replica back after outer step j.Step, gives it to the pipeline's
// nodes and starts it; the nonce tells its reports. It runs on the watch loop: each
// call is bounded by the node's round trips.
func (n *launchNodes) join(j membership.SignJoin) (uint64, error) {
	for _, m := range j.Moves {
		n.move(m)
	}
	signed, nonce, err := n.signJoin(j.Replica, j.Step)
	if err != nil {
		return 0, err
	}
	var taken []peer.ID
	undo := func() {
		for _, id := range taken {
			_, _ = wire.Call(context.WithoutCancel(n.ctx), n.h, n.calls, nil, id, wire.Msg{Type: wire.MsgAbort, Run: n.run, Reason: "rejoin failed"})
		}
	}
	for _, typ := range []string{wire.MsgAssign, wire.MsgStart} {
		for _, a := range n.cells() {
			if a.Replica != j.Replica {
				continue
			}
			id, _ := peer.Decode(a.Peer)
			m := wire.Msg{Type: typ, Run: n.run}
			if typ == wire.MsgAssign {
				m.Signed = signed
			}
			cctx, cancel := n.within(n.ctx, clock.Busy, id)
			err := n.tell(cctx, id, m)
			cancel()
			if err != nil {
				undo()
				return 0, fmt.Errorf("%s of %s: %w", typ, wire.CellName(n.o.Spec, a), err)
			}
			if typ == wire.MsgAssign {
				taken = append(taken, id)
			}
		}
	}
	return nonce, nil
}

// move passes cell m.Index to its new node, with the addresses this host knows it
// at; a survivor of another broken pipeline leaves its cell to the node gone. The
// cells m.Tell names are told.
func (n *launchNodes) move(m membership.Move) {
	id, err := peer.Decode(m.Peer)
	if err != nil {
		return
	}
	n.mu.Lock()
	a := n.plan.Stages[m.Index]
	wasAddrs := a.Addrs
	a.Peer, a.Addrs = id.String(), nil
	for _, ad := range n.h.Peerstore().Addrs(id) {
		a.Addrs = append(a.Addrs, ad.String()+"/p2p/"+id.String())
	}
	n.plan.Stages[m.Index] = a
	var left *assign.Assignment
	if m.Left >= 0 {
		b := n.plan.Stages[m.Left]
		b.Peer, b.Addrs = m.Was, wasAddrs
		n.plan.Stages[m.Left], left = b, &b
	}
	if old, err := peer.Decode(m.Was); err == nil {
		delete(n.peers, old)
		if left != nil {
			n.peers[old] = *left
		}
	}
	n.peers[id] = a
	cells := slices.Clone(n.plan.Stages)
	n.mu.Unlock()
	if left != nil {
		n.log.Info("re-paired: the idle survivor of a broken replica pipeline takes the cell of a node gone",
			"cell", wire.CellName(n.o.Spec, a), "from", wire.CellName(n.o.Spec, assign.Assignment{Stage: left.Stage, Replica: left.Replica}), "node", id, "was", m.Was)
	} else {
		n.log.Info("a newcomer takes the cell of a node gone", "cell", wire.CellName(n.o.Spec, a), "was", m.Was, "now", id)
	}
	for _, t := range m.Tell {
		c := cells[t.Index]
		for _, k := range t.To {
			b := cells[k]
			bid, _ := peer.Decode(b.Peer)
			cctx, cancel := n.within(n.ctx, clock.Busy, bid)
			err := n.tell(cctx, bid, wire.Msg{Type: wire.MsgReplace, Run: n.run, Cell: &c})
			cancel()
			if err != nil {
				n.log.Warn("a replica was not told of the cell's new node", "cell", wire.CellName(n.o.Spec, b), "err", err)
			}
		}
	}
}

// signJoin signs the plan as it is now, with a rejoin of replica pipeline r after
// step. A restarted node may listen elsewhere now: every cell carries the addresses
// its node has told this launcher (identify) since.
func (n *launchNodes) signJoin(r, step int) (*p2p.Signed, uint64, error) {
	n.mu.Lock()
	j := *n.plan
	j.Stages = slices.Clone(n.plan.Stages)
	n.mu.Unlock()
	for i, a := range j.Stages {
		id, _ := peer.Decode(a.Peer)
		if now := n.h.Peerstore().Addrs(id); len(now) > 0 {
			if full, err := peer.AddrInfoToP2pAddrs(&peer.AddrInfo{ID: id, Addrs: now}); err == nil {
				j.Stages[i].Addrs = nil
				for _, m := range full {
					j.Stages[i].Addrs = append(j.Stages[i].Addrs, m.String())
				}
			}
		}
	}
	now := time.Now().UTC()
	j.Created, j.Expires = now, now.Add(max(time.Minute, time.Duration(n.o.Spec.Pipeline.StaffTimeout)*time.Second))
	j.Join = &wire.JoinPlan{Replica: r, Step: step, Nonce: newRunID()}
	payload, err := json.Marshal(j)
	if err != nil {
		return nil, 0, err
	}
	signed, err := p2p.Sign(n.o.Key, payload)
	if err != nil {
		return nil, 0, err
	}
	return signed, j.Join.Nonce, nil
}
