// Package launcher is what a researcher runs to train a model on the swarm
// (`pipeswarm launch`): it staffs a run's stages on nodes that offer to hold them,
// signs and sends the plan, serves the run's text, watches the stages' reports
// (writing metrics.jsonl and result.json), replaces nodes that go and brings broken
// replica pipelines back, pauses and resumes a run, and assembles an exportable run's
// model from the nodes' checkpoints (Export).
package launcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/clock"
	"github.com/pipeswarm/pipeswarm/p2p/corpus"
)

// ErrRunFailed wraps the reason a launched run did not finish.
var ErrRunFailed = errors.New("run failed")

// ErrStageDown is wrapped, with ErrRunFailed, by the error of a run that stopped
// because a stage has no live node: its only node, or the node of every replica
// pipeline still whole, died, stalled or gave up on a neighbour that did. Launch
// pauses such a run (pipeline.pause_timeout) and resumes it when nodes come back.
var ErrStageDown = errors.New("a stage has no live node")

// divergedErr is a divergence a stage reported, in its words.
type divergedErr struct{ msg string }

func (e *divergedErr) Error() string { return e.msg }
func (e *divergedErr) Unwrap() error { return wire.ErrDiverged }

// Options configure Launch.
type Options struct {
	Spec   *spec.Spec
	Key    crypto.PrivKey // the launcher's key; nodes must trust its peer ID
	Peers  []string       // full multiaddrs of volunteering nodes
	Listen []string       // the launcher's own listen addrs; nil = p2p.DefaultListen
	// Transports, if set, replace the launcher host's TCP and QUIC (see p2p.HostOptions).
	Transports []libp2p.Option
	OutDir     string
	// Resume continues the run whose files are in OutDir (the same spec): every stage
	// from the newest step whose checkpoint some node still holds for every stage,
	// appending to its metrics.jsonl.
	Resume bool
	Log    *slog.Logger
	// OnPlan sees the staffing once every stage has a peer; OnStep every step's record
	// (one per replica pipeline and step); OnOuter every outer step's rows (one per
	// replica of the stage that synced).
	OnPlan  func([]assign.Assignment)
	OnStep  func(metrics.Step)
	OnOuter func([]metrics.Outer)
	// Clock times what the launcher decides by time (staffing waits, silence, stops,
	// time-based checkpoints); nil = clock.Real.
	Clock clock.Clock
}

// Launch staffs sp's stages with the given peers, sends each a signed plan, starts
// the run, and records its progress into OutDir (metrics.jsonl, spec.yaml,
// loss.png) until every stage reports it is done. It fails, with the reason, if a
// node refuses the run or a stage reports an error it cannot go on from. When a stage
// has no live node left (ErrStageDown), the run pauses for up to
// pipeline.pause_timeout: Launch waits for nodes that hold every stage's checkpoint
// of a common step, the same nodes restarted on their data directories, and resumes
// from there as `launch --resume` would, appending to the same metrics.jsonl.
func Launch(ctx context.Context, o Options) (*Result, error) {
	log := o.Log
	if log == nil {
		log = slog.Default()
	}
	o.Clock = clock.Or(o.Clock)
	// Everything that can be checked before a node is asked is checked here, at once.
	if err := o.Spec.Validate(); err != nil {
		return nil, err
	}
	if err := o.Spec.CheckData(); err != nil {
		return nil, err
	}
	if _, err := o.Spec.CheckTokenizer(); err != nil {
		return nil, err
	}
	if o.Key == nil {
		return nil, errors.New("launch: no key")
	}
	if err := checkPeers(o.Spec, o.Peers); err != nil {
		return nil, err
	}
	tokSum, err := tokenizerSHA256(o.Spec)
	if err != nil {
		return nil, err
	}
	if o.Resume {
		rec, err := readRunRecord(o.OutDir, o.Spec)
		if err != nil {
			return nil, err
		}
		if err := checkSameTokenizer(rec, o.Spec, tokSum); err != nil {
			return nil, err
		}
		if done := recordedThrough(filepath.Join(o.OutDir, train.MetricsFile)); done >= o.Spec.Train.Steps {
			return nil, fmt.Errorf("the run in %s finished at step %d (train.steps %d): there is nothing to resume. "+
				"A finished run is not extended in place (its learning-rate schedule has ended); to train longer, launch the spec again with more steps (--steps N) into another --out",
				o.OutDir, done, o.Spec.Train.Steps)
		}
	}
	if err := os.MkdirAll(o.OutDir, 0o755); err != nil {
		return nil, fmt.Errorf("launch: %w", err)
	}
	// On real networks the launcher reaches nodes behind NATs through their relays,
	// upgrades to direct connections by hole punching, and answers their AutoNAT v2
	// checks; over simulated links there is no NAT. One host for every part of a run:
	// nodes restarted during a pause find it again at the address they knew.
	onNet := o.Transports == nil
	h, err := p2p.NewHost(ctx, p2p.HostOptions{Key: o.Key, Listen: o.Listen, Log: log.With("sys", "p2p"), Transports: o.Transports,
		Reachability: onNet, HolePunch: onNet})
	if err != nil {
		return nil, err
	}
	defer h.Close()
	// Until a call of a kind is measured, it may take as long as staffing may.
	calls := wire.NewCallClock(time.Duration(o.Spec.Pipeline.StaffTimeout)*time.Second, o.Clock)
	idle := listenIdle(ctx, h, o.Clock, log)
	res, err := launchOnce(ctx, h, calls, idle, o, log, 0, nil)
	wait := time.Duration(o.Spec.Pipeline.PauseTimeout) * time.Second
	// The parts before the last: their share of the run is added to the last's.
	before := newResult(0, o.Spec.Pipeline.Stages, o.Spec.Pipeline.Replicas)
	from := 0
	if res != nil {
		from = res.FromStep
	}
	share := func(last *Result) *Result {
		if last != nil {
			last.add(before)
			last.FromStep = from
		}
		return last
	}
	var pauses []Pause
	var broken, rejoined []int
	repaired := 0
	for wait > 0 && errors.Is(err, ErrStageDown) && ctx.Err() == nil {
		stopped := o.Clock.Now()
		p := Pause{Why: err.Error()}
		if res != nil {
			p.Recorded = res.Steps
			broken, rejoined = append(broken, res.Broken...), append(rejoined, res.Rejoined...)
			repaired += res.Repaired
		}
		log.Warn("run paused: a stage has no live node; waiting for nodes that hold every stage's checkpoints, to resume from the newest step they share",
			"why", err, "for_up_to", wait)
		ro := o
		ro.Resume = true
		going := false
		next, nerr := launchOnce(ctx, h, calls, idle, ro, log, wait, func(from int) {
			going = true
			p.ResumedAt, p.Restarted = from, from == 0
			p.WaitedS = o.Clock.Since(stopped).Seconds()
			if from == 0 {
				log.Warn("run restarted from its start: no step had a checkpoint of every stage", "paused_for", o.Clock.Since(stopped).Round(time.Second))
			} else {
				log.Info("run resumed", "from_step", from, "paused_for", o.Clock.Since(stopped).Round(time.Second))
			}
		})
		if !going {
			p.WaitedS = o.Clock.Since(stopped).Seconds()
			pauses = append(pauses, p)
			if res != nil {
				res.Pauses = pauses
			}
			return share(res), fmt.Errorf("%w; paused %s and not resumed: %v", err, o.Clock.Since(stopped).Round(time.Second), nerr)
		}
		pauses = append(pauses, p)
		if res != nil {
			before.add(res)
		}
		if errors.Is(nerr, ErrStageDown) && next != nil && next.Steps <= p.ResumedAt {
			// Stopped again before a step was taken: whatever stops it is not going away.
			next.Pauses = pauses
			return share(next), fmt.Errorf("%w; it had been paused and resumed from step %d, and stopped again before taking a step", nerr, p.ResumedAt)
		}
		res, err = next, nerr
	}
	if res != nil {
		res.Broken, res.Rejoined = append(broken, res.Broken...), append(rejoined, res.Rejoined...)
		res.Repaired += repaired
		res.Pauses = pauses
	}
	res = share(res)
	if err == nil && res != nil && o.Spec.Export == spec.ExportAllowed {
		// The stages' final weights, from the nodes that trained them.
		var ids []peer.ID
		for _, a := range res.cells {
			if id, derr := peer.Decode(a.Peer); derr == nil && !slices.Contains(ids, id) {
				ids = append(ids, id)
			}
		}
		m, xerr := collect(ctx, h, calls, o.Spec, res.RunID, ids, o.OutDir, log)
		if xerr != nil {
			res.ExportError = xerr.Error()
			log.Warn("model not assembled", "err", xerr)
		}
		res.Model = m
		if werr := writeResult(o.OutDir, res); werr != nil {
			log.Warn("no "+ResultFile, "err", werr)
		}
	}
	return res, err
}

// launchOnce is one part of a launched run, from staffing to the run's end or the
// failure that stops it. staffFor, if set, replaces the staffing timeout; started,
// if set, is told the step a resumed run goes on from once it has started.
func launchOnce(ctx context.Context, h *p2p.Host, calls *wire.CallClock, spares *idlePeers, o Options, log *slog.Logger, staffFor time.Duration, started func(from int)) (*Result, error) {
	sp := o.Spec
	var prev *runRecord
	if o.Resume {
		var err error
		if prev, err = readRunRecord(o.OutDir, sp); err != nil {
			return nil, err
		}
	}
	reports := make(chan wire.Report, 1024)
	runID := newRunID()
	h.Handle(p2p.ProtoControl, func(s network.Stream) {
		defer s.Close()
		from := s.Conn().RemotePeer()
		_ = s.SetDeadline(time.Now().Add(wire.Window(h, from)))
		var m wire.Msg
		err := p2p.ReadMsg(s, &m, p2p.MaxMsgBytes)
		if err == nil && (m.Type != wire.MsgReport || m.Report == nil) {
			err = fmt.Errorf("%w: %q message to a launcher", p2p.ErrBadMsg, m.Type)
		}
		if err != nil {
			if errors.Is(err, p2p.ErrViolation) {
				score, banned := h.Penalties().Add(from, err.Error())
				log.Warn("protocol violation", "peer", from, "err", err, "score", fmt.Sprintf("%.1f", score), "banned", banned)
			} else {
				log.Debug("report stream failed", "peer", from, "err", err)
			}
			s.Reset()
			return
		}
		if m.Report.Run != runID {
			// A node still reporting on an earlier run of this launcher's key: late, not malicious.
			_ = p2p.WriteMsg(s, wire.Reply{Error: fmt.Sprintf("run %016x is not this launcher's", m.Report.Run)})
			return
		}
		m.Report.Peer = s.Conn().RemotePeer().String() // what the stream proves, not what it says
		reports <- *m.Report
		_ = p2p.WriteMsg(s, wire.Reply{OK: true})
	})

	// stagePeers are the nodes holding the plan's cells, as cells pass to other nodes;
	// cellsMu guards them and plan.Stages against the goroutines that read them besides
	// the watch loop. Only they may fetch the run's text.
	var cellsMu sync.Mutex
	stagePeers := map[peer.ID]assign.Assignment{}
	inPlan := func(p peer.ID) bool {
		cellsMu.Lock()
		defer cellsMu.Unlock()
		_, ok := stagePeers[p]
		return ok
	}
	// Reports come from the plan's nodes too; anyone else's control stream is refused.
	h.Gate(corpus.Proto, inPlan)
	h.Gate(p2p.ProtoControl, inPlan)
	dataPlan, err := serveData(sp, h, log)
	if err != nil {
		return nil, err
	}
	if dataPlan.TokenizerSHA256, err = tokenizerSHA256(sp); err != nil {
		return nil, err
	}
	if prev != nil {
		if err := checkSameTokenizer(prev, sp, dataPlan.TokenizerSHA256); err != nil {
			return nil, err
		}
	}
	if staffFor == 0 {
		staffFor = time.Duration(sp.Pipeline.StaffTimeout) * time.Second
	}
	plan, err := staff(ctx, h, calls, sp, o, prev, staffFor, log)
	if err != nil {
		return nil, err
	}
	plan.Data = dataPlan
	plan.ID = runID
	if err := writeRunRecord(o.OutDir, runRecord{Run: fmt.Sprintf("%016x", runID), Resume: plan.Resume, TokenizerSHA256: dataPlan.TokenizerSHA256}); err != nil {
		return nil, err
	}
	plan.Launcher = h.ID().String()
	plan.LauncherAddrs = h.Addrs()
	if o.OnPlan != nil {
		o.OnPlan(plan.Stages)
	}
	payload, err := json.Marshal(plan)
	if err != nil {
		return nil, err
	}
	signed, err := p2p.Sign(o.Key, payload)
	if err != nil {
		return nil, err
	}
	cellsMu.Lock()
	for _, a := range plan.Stages {
		id, _ := peer.Decode(a.Peer)
		stagePeers[id] = a
	}
	cellsMu.Unlock()
	// Abort tells every node at once, each given a few of its round trips: a hung node
	// (often the reason for the abort) must not hold the launcher up.
	abort := func(reason string) {
		var wg sync.WaitGroup
		for id := range stagePeers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), clock.Deadline(0, h.Peerstore().LatencyEWMA(id), clock.Brief))
				defer cancel()
				_, _ = wire.Call(actx, h, calls, nil, id, wire.Msg{Type: wire.MsgAbort, Run: runID, Reason: reason})
			}()
		}
		wg.Wait()
	}
	var refusals []string
	for _, a := range plan.Stages {
		id, _ := peer.Decode(a.Peer)
		r, err := wire.Call(ctx, h, calls, nil, id, wire.Msg{Type: wire.MsgAssign, Signed: signed})
		if err == nil && !r.OK {
			err = errors.New(r.Error)
		}
		if err != nil {
			refusals = append(refusals, fmt.Sprintf("%s on %s: %v", wire.CellName(sp, a), a.Peer, err))
		}
	}
	if len(refusals) > 0 {
		abort("another node refused the run")
		return nil, fmt.Errorf("%w: %s", ErrRunFailed, strings.Join(refusals, "; "))
	}

	// A stage's node going away ends the run, or with replicas its replica pipeline.
	lost := make(chan peer.ID, 2*len(stagePeers))
	notify := &network.NotifyBundle{DisconnectedF: func(n network.Network, c network.Conn) {
		cellsMu.Lock()
		_, ok := stagePeers[c.RemotePeer()]
		cellsMu.Unlock()
		if ok && !p2p.Linked(n, c.RemotePeer()) {
			select {
			case lost <- c.RemotePeer():
			default:
			}
		}
	}}
	h.Network().Notify(notify)
	defer h.Network().StopNotify(notify)

	for _, a := range plan.Stages {
		id, _ := peer.Decode(a.Peer)
		if r, err := wire.Call(ctx, h, calls, nil, id, wire.Msg{Type: wire.MsgStart, Run: runID}); err != nil || !r.OK {
			abort("start failed")
			if err == nil {
				err = errors.New(r.Error)
			}
			return nil, fmt.Errorf("%w: start %s: %v", ErrRunFailed, wire.CellName(sp, a), err)
		}
	}
	announce(ctx, h, plan, log)
	if started != nil && plan.Resume != nil {
		started(plan.Resume.Step)
	} else if started != nil && plan.Restarted {
		started(0)
	}
	log.Info("run started", "run", fmt.Sprintf("%016x", runID), "stages", sp.Pipeline.Stages, "replicas", sp.Pipeline.Replicas, "steps", sp.Train.Steps)
	up := func(stage, replica int) bool {
		a, ok := plan.Cell(stage, replica)
		id, err := peer.Decode(a.Peer)
		return ok && err == nil && p2p.Linked(h.Network(), id)
	}
	// offerFrom asks id, within a few of its round trips, whether it has a free slot
	// that holds a cell needing need bytes; a hung node cannot answer.
	offerFrom := func(id peer.ID, addrs []string, need int64) bool {
		cctx, cancel := context.WithTimeout(p2p.AllowRelayed(ctx, "rejoin"), clock.Deadline(0, h.Peerstore().LatencyEWMA(id), clock.Brief))
		defer cancel()
		for _, a := range addrs {
			if info, err := peer.AddrInfoFromString(a); err == nil && info.ID == id {
				h.Peerstore().AddAddrs(id, info.Addrs, peerstore.TempAddrTTL)
			}
		}
		err := h.Host.Connect(cctx, peer.AddrInfo{ID: id})
		var rep *wire.Reply
		if err == nil {
			rep, err = wire.Call(cctx, h, calls, nil, id, wire.Msg{Type: wire.MsgOffer})
		}
		return err == nil && rep.OK && rep.Offer != nil && rep.Offer.MaxStages >= 1 && rep.Offer.MemoryBytes >= need
	}
	// newcomers are the nodes that might take a cell: the --peers, then the nodes heard
	// on the heartbeat topic holding nothing (one that joined the swarm since).
	type newcomer struct {
		id    peer.ID
		addrs []string
	}
	newcomers := func() []newcomer {
		var out []newcomer
		listed := map[peer.ID]bool{}
		for _, addr := range o.Peers {
			if info, err := peer.AddrInfoFromString(addr); err == nil {
				out, listed[info.ID] = append(out, newcomer{info.ID, []string{addr}}), true
			}
		}
		heard := spares.recent()
		for _, id := range slices.Sorted(maps.Keys(heard)) {
			if !listed[id] {
				out = append(out, newcomer{id, heard[id]})
			}
		}
		return out
	}
	var subsMu sync.Mutex
	subs := map[int]map[int]peer.ID{} // replica → plan.Stages index → the newcomer to take it
	// The replica pipelines broken now, as the watch loop last said; reach reads it
	// from the probes' goroutines.
	var brokenMu sync.Mutex
	brokenNow := map[int]bool{}
	repairedN := 0 // cells a survivor took; join runs on the watch loop
	isBroken := func(r int) bool {
		brokenMu.Lock()
		defer brokenMu.Unlock()
		return brokenNow[r]
	}
	// idle stops the nodes of broken replica pipeline r, keeping their state, and
	// tells every node of the pipelines still whole to drop r's node of its stage from
	// the all-reduce: a round waiting for a hung node ends now, not at its deadline.
	idle := func(r int, reason string) {
		for id, a := range stagePeers {
			if a.Replica == r {
				go func() {
					_, _ = wire.Call(context.WithoutCancel(ctx), h, calls, nil, id, wire.Msg{Type: wire.MsgIdle, Run: runID, Reason: reason})
				}()
				continue
			}
			gone, ok := plan.Cell(a.Stage, r)
			if !ok || isBroken(a.Replica) {
				continue
			}
			go func() {
				rep, err := wire.Call(context.WithoutCancel(ctx), h, calls, nil, id, wire.Msg{Type: wire.MsgDrop, Run: runID, Cell: &gone, Reason: reason})
				if err == nil && !rep.OK {
					err = errors.New(rep.Error)
				}
				if err != nil {
					log.Debug("a replica was not told to drop a broken pipeline from its all-reduce", "cell", wire.CellName(sp, a), "err", err)
				}
			}()
		}
	}
	rj := rejoiner{
		broke: func(r int, b bool) {
			brokenMu.Lock()
			defer brokenMu.Unlock()
			if b {
				brokenNow[r] = true
			} else {
				delete(brokenNow, r)
			}
		},
		// reach asks every node of replica pipeline r, as it is in the plan, for an
		// offer: one that answers and has a free slot can take its cell again. A cell
		// whose node does not answer passes to a newcomer: a --peer not in the plan
		// that has a free slot and the memory the cell needs; failing one, to the idle
		// survivor of a broken pipeline after r (re-pairing: two broken pipelines make
		// one whole one; always into the lower, so two probes never trade nodes).
		reach: func(r int) bool {
			cellsMu.Lock()
			cells := slices.Clone(plan.Stages)
			cellsMu.Unlock()
			held := map[string]bool{}
			for _, a := range cells {
				held[a.Peer] = true
			}
			repaired := map[string]bool{} // survivors of other pipelines taken
			moved := map[int]peer.ID{}
			for i, a := range cells {
				if a.Replica != r {
					continue
				}
				id, _ := peer.Decode(a.Peer)
				if offerFrom(id, nil, 0) {
					continue
				}
				for _, c := range newcomers() {
					if held[c.id.String()] || !offerFrom(c.id, c.addrs, a.Need) {
						continue
					}
					moved[i], held[c.id.String()] = c.id, true
					break
				}
				if _, ok := moved[i]; !ok {
					for _, b := range cells {
						if b.Replica <= r || !isBroken(b.Replica) || repaired[b.Peer] {
							continue
						}
						if id, err := peer.Decode(b.Peer); err == nil && offerFrom(id, nil, a.Need) {
							moved[i], repaired[b.Peer] = id, true
							break
						}
					}
				}
				if _, ok := moved[i]; !ok {
					return false
				}
			}
			subsMu.Lock()
			subs[r] = moved
			subsMu.Unlock()
			return true
		},
		// join signs a plan that brings replica pipeline r back after outer step step,
		// with the newcomers reach found in the cells whose nodes are gone (the other
		// replicas of their stages are told first, so that their all-reduce counts the
		// newcomer in), gives it to the pipeline's nodes and starts it; the nonce tells
		// its reports.
		join: func(r, step int) (uint64, error) {
			subsMu.Lock()
			moved := subs[r]
			delete(subs, r)
			subsMu.Unlock()
			for _, i := range slices.Sorted(maps.Keys(moved)) {
				id := moved[i]
				cellsMu.Lock()
				a := plan.Stages[i]
				was, wasAddrs := a.Peer, a.Addrs
				a.Peer, a.Addrs = id.String(), nil
				for _, m := range h.Peerstore().Addrs(id) {
					a.Addrs = append(a.Addrs, m.String()+"/p2p/"+id.String())
				}
				// A survivor of another broken pipeline leaves its cell to the node gone
				// (a swap: no cell is ever empty, and that pipeline rejoins when the
				// node is back or another takes it).
				var left *assign.Assignment
				for k, b := range plan.Stages {
					if k != i && b.Peer == a.Peer {
						b.Peer, b.Addrs = was, wasAddrs
						plan.Stages[k], left = b, &b
						break
					}
				}
				plan.Stages[i] = a
				if old, err := peer.Decode(was); err == nil {
					delete(stagePeers, old)
					if left != nil {
						stagePeers[old] = *left
					}
				}
				stagePeers[id] = a
				cellsMu.Unlock()
				tell := []assign.Assignment{a}
				if left != nil {
					repairedN++
					tell = append(tell, *left)
					log.Info("re-paired: the idle survivor of a broken replica pipeline takes the cell of a node gone",
						"cell", wire.CellName(sp, a), "from", wire.CellName(sp, assign.Assignment{Stage: left.Stage, Replica: left.Replica}), "node", id, "was", was)
				} else {
					log.Info("a newcomer takes the cell of a node gone", "cell", wire.CellName(sp, a), "was", was, "now", id)
				}
				for _, c := range tell {
					for _, b := range plan.Stages {
						if b.Replica == r || b.Replica == c.Replica || isBroken(b.Replica) {
							continue
						}
						bid, _ := peer.Decode(b.Peer)
						// Made from the watch loop: a hung node must not hold it long.
						cctx, cancel := context.WithTimeout(ctx, clock.Deadline(0, h.Peerstore().LatencyEWMA(bid), clock.Busy))
						rep, err := wire.Call(cctx, h, calls, nil, bid, wire.Msg{Type: wire.MsgReplace, Run: runID, Cell: &c})
						cancel()
						if err == nil && !rep.OK {
							err = errors.New(rep.Error)
						}
						if err != nil {
							log.Warn("a replica was not told of the cell's new node", "cell", wire.CellName(sp, b), "err", err)
						}
					}
				}
			}
			j := *plan
			// A restarted node may listen elsewhere now: every cell carries the addresses
			// its node has told this launcher (identify) since.
			j.Stages = slices.Clone(plan.Stages)
			for i, a := range j.Stages {
				id, _ := peer.Decode(a.Peer)
				if now := h.Peerstore().Addrs(id); len(now) > 0 {
					if full, err := peer.AddrInfoToP2pAddrs(&peer.AddrInfo{ID: id, Addrs: now}); err == nil {
						j.Stages[i].Addrs = nil
						for _, m := range full {
							j.Stages[i].Addrs = append(j.Stages[i].Addrs, m.String())
						}
					}
				}
			}
			now := time.Now().UTC()
			j.Created, j.Expires = now, now.Add(max(time.Minute, time.Duration(sp.Pipeline.StaffTimeout)*time.Second))
			j.Join = &wire.JoinPlan{Replica: r, Step: step, Nonce: newRunID()}
			payload, err := json.Marshal(j)
			if err != nil {
				return 0, err
			}
			signed, err := p2p.Sign(o.Key, payload)
			if err != nil {
				return 0, err
			}
			var taken []peer.ID
			undo := func() {
				for _, id := range taken {
					_, _ = wire.Call(context.WithoutCancel(ctx), h, calls, nil, id, wire.Msg{Type: wire.MsgAbort, Run: runID, Reason: "rejoin failed"})
				}
			}
			for _, typ := range []string{wire.MsgAssign, wire.MsgStart} {
				for _, a := range plan.Stages {
					if a.Replica != r {
						continue
					}
					id, _ := peer.Decode(a.Peer)
					m := wire.Msg{Type: typ, Run: runID}
					if typ == wire.MsgAssign {
						m.Signed = signed
					}
					cctx, cancel := context.WithTimeout(ctx, clock.Deadline(0, h.Peerstore().LatencyEWMA(id), clock.Busy))
					rep, err := wire.Call(cctx, h, calls, nil, id, m)
					cancel()
					if err == nil && !rep.OK {
						err = errors.New(rep.Error)
					}
					if err != nil {
						undo()
						return 0, fmt.Errorf("%s of %s: %w", typ, wire.CellName(sp, a), err)
					}
					if typ == wire.MsgAssign {
						taken = append(taken, id)
					}
				}
			}
			return j.Join.Nonce, nil
		},
	}
	// Orders to every cell (or a pipeline's), each a call of its own, bounded by the
	// node's round trips: a hung node must not hold the others' orders up.
	order := func(r int, m wire.Msg) (refused []string) {
		cellsMu.Lock()
		cells := slices.Clone(plan.Stages)
		cellsMu.Unlock()
		var wg sync.WaitGroup
		var mu sync.Mutex
		for _, a := range cells {
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
				cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), clock.Deadline(0, h.Peerstore().LatencyEWMA(id), clock.Busy))
				defer cancel()
				rep, err := wire.Call(cctx, h, calls, nil, id, m)
				if err == nil && !rep.OK {
					err = errors.New(rep.Error)
				}
				if err != nil {
					mu.Lock()
					refused = append(refused, fmt.Sprintf("%s: %v", wire.CellName(sp, a), err))
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		return refused
	}
	tell := stageOrders{
		checkpoint: func(step int, acked chan<- int) {
			go func() {
				if refused := order(-1, wire.Msg{Type: wire.MsgCheckpoint, Run: runID, Step: step}); len(refused) > 0 {
					log.Warn("a checkpoint due by time was not taken by every stage; it is not one to resume from", "step", step, "refused", strings.Join(refused, "; "))
					return
				}
				acked <- step
			}()
		},
		recorded: func(step int) {
			go order(-1, wire.Msg{Type: wire.MsgRecorded, Run: runID, Step: step})
		},
		stopAt: func(r, step int, reason string) {
			go func() {
				if refused := order(r, wire.Msg{Type: wire.MsgStopAt, Run: runID, Step: step, Reason: reason}); len(refused) > 0 {
					log.Debug("not every stage took the stop", "step", step, "refused", strings.Join(refused, "; "))
				}
			}()
		},
	}
	res, err := watch(ctx, o, log, plan, reports, lost, abort, idle, up, rj, tell)
	if err != nil && res != nil {
		drainEnds(res, plan, reports, clock.Or(o.Clock), 2*time.Second)
	}
	if res != nil {
		res.Repaired = repairedN
		res.Penalties = h.Penalties().Stats()
		cellsMu.Lock()
		res.cells = slices.Clone(plan.Stages)
		cellsMu.Unlock()
		if werr := writeResult(o.OutDir, res); werr != nil && err == nil {
			err = werr
		}
	}
	return res, err
}
