// Package launcher is what a researcher runs to train a model on the swarm
// (`pipeswarm launch`): it staffs a run's stages on nodes that offer to hold them,
// signs and sends the plan, serves the run's text, watches the stages' reports
// (writing metrics.jsonl and result.json), replaces nodes that go and brings broken
// replica pipelines back, pauses and resumes a run, and assembles an exportable run's
// model from the nodes' checkpoints (Export). What happens to a running run (who
// holds each cell, which pipelines are whole, when the run fails or ends) is decided
// by node/membership; watch carries its decisions out.
package launcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

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
	// Reports are taken until this part of the run returns: one that comes later is
	// refused, not left waiting on a channel nobody reads any more.
	over := make(chan struct{})
	defer close(over)
	h.Handle(p2p.ProtoControl, reportHandler(h, runID, reports, over, log))

	// Only the nodes holding the plan's cells may fetch the run's text, or report.
	nodes := newLaunchNodes(ctx, h, calls, o, log, runID, spares)
	h.Gate(corpus.Proto, nodes.holds)
	h.Gate(p2p.ProtoControl, nodes.holds)
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
	nodes.staffed(plan)
	abort := nodes.abort
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
	lost := make(chan peer.ID, 2*len(plan.Stages))
	notify := &network.NotifyBundle{DisconnectedF: func(n network.Network, c network.Conn) {
		if nodes.holds(c.RemotePeer()) && !p2p.Linked(n, c.RemotePeer()) {
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
	res, err := watch(ctx, o, log, plan, reports, lost, nodes)
	if err != nil && res != nil {
		drainEnds(res, plan, reports, clock.Or(o.Clock), 2*time.Second)
	}
	if res != nil {
		res.Penalties = h.Penalties().Stats()
		res.cells = nodes.cells()
		if werr := writeResult(o.OutDir, res); werr != nil && err == nil {
			err = werr
		}
	}
	return res, err
}

// reportHandler takes the reports of run's stages into reports until over is closed;
// after that it refuses them.
func reportHandler(h *p2p.Host, run uint64, reports chan<- wire.Report, over <-chan struct{}, log *slog.Logger) network.StreamHandler {
	return func(s network.Stream) {
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
		if m.Report.Run != run {
			// A node still reporting on an earlier run of this launcher's key: late, not malicious.
			_ = p2p.WriteMsg(s, wire.Reply{Error: fmt.Sprintf("run %016x is not this launcher's", m.Report.Run)})
			return
		}
		m.Report.Peer = from.String() // what the stream proves, not what it says
		select {
		case reports <- *m.Report:
			_ = p2p.WriteMsg(s, wire.Reply{OK: true})
		case <-over:
			_ = p2p.WriteMsg(s, wire.Reply{Error: fmt.Sprintf("run %016x is over here", run)})
		}
	}
}
