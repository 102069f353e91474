package node

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/p2p"
)

// ErrRunFailed wraps the reason a launched run did not finish.
var ErrRunFailed = errors.New("run failed")

// LaunchOptions configure Launch.
type LaunchOptions struct {
	Spec   *spec.Spec
	Key    crypto.PrivKey // the launcher's key; nodes must trust its peer ID
	Peers  []string       // full multiaddrs of volunteering nodes
	Listen []string       // the launcher's own listen addrs; nil = p2p.DefaultListen
	OutDir string
	Log    *slog.Logger
	// OnPlan sees the staffing once every stage has a peer; OnStep every step's record.
	OnPlan func([]assign.Assignment)
	OnStep func(metrics.Step)
}

// LaunchResult summarises a finished run.
type LaunchResult struct {
	RunID   uint64
	Steps   int
	Loss    float64
	ValLoss float64
	Tokens  int64
	Elapsed time.Duration
	// Per stage boundary i (stage i → i+1): encoded bytes of the training
	// activation frames sent forward and the gradient frames sent back.
	BoundaryFwd, BoundaryBwd []int64
	Checkpoints              []string // each stage's checkpoint, on its node
}

// Launch staffs sp's stages with the given peers, sends each a signed plan, starts
// the run, and records its progress into OutDir (metrics.jsonl, spec.yaml,
// loss.png) until every stage reports it is done. It fails, with the reason, if a
// node refuses the run, a stage reports an error, or a node disconnects.
func Launch(ctx context.Context, o LaunchOptions) (*LaunchResult, error) {
	log := o.Log
	if log == nil {
		log = slog.Default()
	}
	sp := o.Spec
	if err := sp.Validate(); err != nil {
		return nil, err
	}
	if o.Key == nil {
		return nil, errors.New("launch: no key")
	}
	if len(o.Peers) == 0 {
		return nil, errors.New("launch: no peers given (--peer MULTIADDR)")
	}
	if err := os.MkdirAll(o.OutDir, 0o755); err != nil {
		return nil, fmt.Errorf("launch: %w", err)
	}
	h, err := p2p.NewHost(ctx, p2p.HostOptions{Key: o.Key, Listen: o.Listen, Log: log.With("sys", "p2p")})
	if err != nil {
		return nil, err
	}
	defer h.Close()
	reports := make(chan Report, 1024)
	runID := newRunID()
	h.Handle(p2p.ProtoControl, func(s network.Stream) {
		defer s.Close()
		_ = s.SetDeadline(time.Now().Add(30 * time.Second))
		var m ctlMsg
		if err := p2p.ReadMsg(s, &m, p2p.MaxMsgBytes); err != nil || m.Type != msgReport || m.Report == nil || m.Report.Run != runID {
			h.Penalties().Add(s.Conn().RemotePeer(), "unexpected control message to a launcher")
			s.Reset()
			return
		}
		m.Report.Peer = s.Conn().RemotePeer().String() // what the stream proves, not what it says
		reports <- *m.Report
		_ = p2p.WriteMsg(s, ctlReply{OK: true})
	})

	plan, err := staff(ctx, h, sp, o, log)
	if err != nil {
		return nil, err
	}
	plan.ID = runID
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
	stagePeers := map[peer.ID]int{}
	for _, a := range plan.Stages {
		id, _ := peer.Decode(a.Peer)
		stagePeers[id] = a.Stage
	}
	abort := func(reason string) {
		for id := range stagePeers {
			_, _ = call(context.WithoutCancel(ctx), h, id, ctlMsg{Type: msgAbort, Run: runID, Reason: reason})
		}
	}
	var refusals []string
	for _, a := range plan.Stages {
		id, _ := peer.Decode(a.Peer)
		r, err := call(ctx, h, id, ctlMsg{Type: msgAssign, Signed: signed})
		if err == nil && !r.OK {
			err = errors.New(r.Error)
		}
		if err != nil {
			refusals = append(refusals, fmt.Sprintf("stage %d on %s: %v", a.Stage, a.Peer, err))
		}
	}
	if len(refusals) > 0 {
		abort("another node refused the run")
		return nil, fmt.Errorf("%w: %s", ErrRunFailed, strings.Join(refusals, "; "))
	}

	// A stage's node going away ends the run: this pipeline has no spare replicas.
	lost := make(chan peer.ID, len(stagePeers))
	h.Network().Notify(&network.NotifyBundle{DisconnectedF: func(n network.Network, c network.Conn) {
		if _, ok := stagePeers[c.RemotePeer()]; ok && n.Connectedness(c.RemotePeer()) != network.Connected {
			select {
			case lost <- c.RemotePeer():
			default:
			}
		}
	}})

	for _, a := range plan.Stages {
		id, _ := peer.Decode(a.Peer)
		if r, err := call(ctx, h, id, ctlMsg{Type: msgStart, Run: runID}); err != nil || !r.OK {
			abort("start failed")
			if err == nil {
				err = errors.New(r.Error)
			}
			return nil, fmt.Errorf("%w: start stage %d: %v", ErrRunFailed, a.Stage, err)
		}
	}
	announce(ctx, h, plan, log)
	log.Info("run started", "run", fmt.Sprintf("%016x", runID), "stages", len(plan.Stages), "steps", sp.Train.Steps)
	return watch(ctx, o, log, plan, reports, lost, abort)
}

func newRunID() uint64 {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return binary.LittleEndian.Uint64(b[:]) | 1 // never 0
}

// staff asks every peer for an offer and plans the stages, retrying until
// StaffTimeout while stages are missing.
func staff(ctx context.Context, h *p2p.Host, sp *spec.Spec, o LaunchOptions, log *slog.Logger) (*Plan, error) {
	deadline := time.Now().Add(time.Duration(sp.Pipeline.StaffTimeout) * time.Second)
	mb := sp.Train.BatchSize / sp.Pipeline.MicroBatches
	for {
		var offers []assign.Offer
		var problems []string
		for _, addr := range o.Peers {
			id, err := h.Connect(ctx, addr)
			if err != nil {
				problems = append(problems, err.Error())
				continue
			}
			r, err := call(ctx, h, id, ctlMsg{Type: msgOffer})
			if err != nil || !r.OK || r.Offer == nil {
				problems = append(problems, fmt.Sprintf("%s gave no offer: %v", id, err))
				continue
			}
			r.Offer.Peer = id.String()
			offers = append(offers, *r.Offer)
		}
		stages, refusals, err := assign.Plan(train.ModelConfig(sp), sp.Pipeline.Stages, sp.Pipeline.Replicas, mb, sp.Pipeline.MicroBatches, offers)
		for _, r := range refusals {
			log.Warn("peer not given a stage", "reason", r)
		}
		if err == nil {
			return &Plan{Spec: sp.String(), Stages: stages, Created: time.Now().UTC()}, nil
		}
		if !errors.Is(err, assign.ErrUnstaffed) || time.Now().After(deadline) {
			return nil, fmt.Errorf("%w: %v (%s)", ErrRunFailed, err, strings.Join(problems, "; "))
		}
		log.Warn("waiting for peers", "missing", err, "unreachable", len(problems), "timeout_in", time.Until(deadline).Round(time.Second))
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(2 * time.Second):
		}
	}
}

func announce(ctx context.Context, h *p2p.Host, plan *Plan, log *slog.Logger) {
	t, err := h.PubSub.Join(p2p.TopicRuns)
	if err != nil {
		log.Debug("no run topic", "err", err)
		return
	}
	defer t.Close()
	b, _ := json.Marshal(map[string]any{"run": fmt.Sprintf("%016x", plan.ID), "launcher": plan.Launcher, "stages": len(plan.Stages)})
	if err := t.Publish(ctx, b); err != nil {
		log.Debug("run announcement not published", "err", err)
	}
}

// watch turns reports into metrics until every stage is done.
func watch(ctx context.Context, o LaunchOptions, log *slog.Logger, plan *Plan, reports <-chan Report, lost <-chan peer.ID, abort func(string)) (*LaunchResult, error) {
	sp := o.Spec
	out := o.OutDir
	if err := os.WriteFile(filepath.Join(out, train.SpecFile), []byte(sp.String()), 0o644); err != nil {
		return nil, fmt.Errorf("launch: %w", err)
	}
	mw, err := metrics.Create(filepath.Join(out, train.MetricsFile))
	if err != nil {
		return nil, err
	}
	defer mw.Close()
	n := len(plan.Stages)
	res := &LaunchResult{RunID: plan.ID, BoundaryFwd: make([]int64, n-1), BoundaryBwd: make([]int64, n-1),
		Checkpoints: make([]string, n), ValLoss: math.NaN()}
	var history []metrics.Step
	var pending *metrics.Step // a step whose evaluation is still to come
	start, last := time.Now(), time.Now()
	doneStages := 0
	emit := func(s metrics.Step) error {
		if err := mw.Write(s); err != nil {
			return err
		}
		history = append(history, s)
		if o.OnStep != nil {
			o.OnStep(s)
		}
		return nil
	}
	plot := func() {
		if len(history) > 0 {
			if err := metrics.PlotLoss(filepath.Join(out, train.PlotFile), sp.Name, history); err != nil {
				log.Warn("no loss plot", "err", err)
			}
		}
	}
	evalDue := func(step int) bool {
		return step == sp.Train.Steps || (sp.EvalInterval > 0 && step%sp.EvalInterval == 0)
	}
	for doneStages < n {
		select {
		case <-ctx.Done():
			abort("launcher interrupted")
			plot()
			return res, ctx.Err()
		case id := <-lost:
			abort("a stage's node disconnected")
			plot()
			return res, fmt.Errorf("%w: the node holding stage %d (%s) disconnected", ErrRunFailed, stageOf(plan, id), id)
		case r := <-reports:
			if r.Stage < 0 || r.Stage >= n || plan.Stages[r.Stage].Peer != r.Peer {
				continue // not from the peer holding that stage
			}
			switch r.Kind {
			case ReportStep:
				now := time.Now()
				res.Steps, res.Loss = r.Step, r.Loss
				res.Tokens += int64(sp.TokensPerStep())
				s := metrics.Step{Step: r.Step, Loss: r.Loss, Tokens: res.Tokens, LR: r.LR, GradNorm: r.GradNorm,
					TokensPerS: float64(sp.TokensPerStep()) / now.Sub(last).Seconds(), ElapsedS: now.Sub(start).Seconds()}
				last = now
				if evalDue(r.Step) {
					pending = &s
					continue
				}
				if err := emit(s); err != nil {
					return res, err
				}
			case ReportEval:
				if pending == nil || pending.Step != r.Step {
					continue
				}
				v := r.ValLoss
				pending.ValLoss, res.ValLoss = &v, v
				if err := emit(*pending); err != nil {
					return res, err
				}
				pending = nil
				last = time.Now() // evaluation time is not training throughput
			case ReportDone:
				doneStages++
				res.Checkpoints[r.Stage] = r.Checkpoint
				if r.Stage < n-1 {
					res.BoundaryFwd[r.Stage] = r.BytesFwd
				}
				if r.Stage > 0 {
					res.BoundaryBwd[r.Stage-1] = r.BytesBwd
				}
			case ReportError:
				abort(fmt.Sprintf("stage %d failed", r.Stage))
				plot()
				return res, fmt.Errorf("%w: stage %d on %s: %s", ErrRunFailed, r.Stage, r.Peer, r.Error)
			}
		}
	}
	res.Elapsed = time.Since(start)
	plot()
	return res, nil
}

func stageOf(plan *Plan, id peer.ID) int {
	for _, a := range plan.Stages {
		if a.Peer == id.String() {
			return a.Stage
		}
	}
	return -1
}
