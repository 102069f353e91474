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

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/corpus"
)

// ErrRunFailed wraps the reason a launched run did not finish.
var ErrRunFailed = errors.New("run failed")

// ErrDiverged is wrapped by the error of a stage whose own computation went
// non-finite (its loss, or values it was about to send), and by a launched run's
// error when a stage reported that: the run stops, and nobody is penalised.
var ErrDiverged = errors.New("diverged")

// divergedErr is a divergence a stage reported, in its words.
type divergedErr struct{ msg string }

func (e *divergedErr) Error() string { return e.msg }
func (e *divergedErr) Unwrap() error { return ErrDiverged }

// LaunchOptions configure Launch.
type LaunchOptions struct {
	Spec   *spec.Spec
	Key    crypto.PrivKey // the launcher's key; nodes must trust its peer ID
	Peers  []string       // full multiaddrs of volunteering nodes
	Listen []string       // the launcher's own listen addrs; nil = p2p.DefaultListen
	// Transports, if set, replace the launcher host's TCP and QUIC (see p2p.HostOptions).
	Transports []libp2p.Option
	OutDir     string
	Log        *slog.Logger
	// OnPlan sees the staffing once every stage has a peer; OnStep every step's record
	// (one per replica pipeline and step); OnOuter every outer step's rows (one per
	// replica of the stage that synced).
	OnPlan  func([]assign.Assignment)
	OnStep  func(metrics.Step)
	OnOuter func([]metrics.Outer)
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
	Checkpoints              []string // each stage's checkpoint (replica 0's), on its node
	// SyncBytes[r][s]: what replica r of stage s sent in its outer steps, both phases.
	SyncBytes  [][]int64
	OuterSteps int   // outer steps of stage 0's replicas
	Broken     []int // replica pipelines that stopped early (a stage's peer died or stalled)
	// Times: where each stage's wall time went, one per (stage, replica) that finished.
	Times []StageTime
	// Penalties: the protocol violations and bans the launcher's host recorded.
	Penalties p2p.PenaltyStats
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
	h, err := p2p.NewHost(ctx, p2p.HostOptions{Key: o.Key, Listen: o.Listen, Log: log.With("sys", "p2p"), Transports: o.Transports})
	if err != nil {
		return nil, err
	}
	defer h.Close()
	reports := make(chan Report, 1024)
	runID := newRunID()
	h.Handle(p2p.ProtoControl, func(s network.Stream) {
		defer s.Close()
		_ = s.SetDeadline(time.Now().Add(30 * time.Second))
		from := s.Conn().RemotePeer()
		var m ctlMsg
		err := p2p.ReadMsg(s, &m, p2p.MaxMsgBytes)
		if err == nil && (m.Type != msgReport || m.Report == nil) {
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
			_ = p2p.WriteMsg(s, ctlReply{Error: fmt.Sprintf("run %016x is not this launcher's", m.Report.Run)})
			return
		}
		m.Report.Peer = s.Conn().RemotePeer().String() // what the stream proves, not what it says
		reports <- *m.Report
		_ = p2p.WriteMsg(s, ctlReply{OK: true})
	})

	dataPlan, err := serveData(sp, h, log)
	if err != nil {
		return nil, err
	}
	plan, err := staff(ctx, h, sp, o, log)
	if err != nil {
		return nil, err
	}
	plan.Data = dataPlan
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
	stagePeers := map[peer.ID]assign.Assignment{}
	for _, a := range plan.Stages {
		id, _ := peer.Decode(a.Peer)
		stagePeers[id] = a
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
			refusals = append(refusals, fmt.Sprintf("%s on %s: %v", cellName(sp, a), a.Peer, err))
		}
	}
	if len(refusals) > 0 {
		abort("another node refused the run")
		return nil, fmt.Errorf("%w: %s", ErrRunFailed, strings.Join(refusals, "; "))
	}

	// A stage's node going away ends the run, or with replicas its replica pipeline.
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
			return nil, fmt.Errorf("%w: start %s: %v", ErrRunFailed, cellName(sp, a), err)
		}
	}
	announce(ctx, h, plan, log)
	log.Info("run started", "run", fmt.Sprintf("%016x", runID), "stages", sp.Pipeline.Stages, "replicas", sp.Pipeline.Replicas, "steps", sp.Train.Steps)
	idle := func(r int, reason string) {
		for id, a := range stagePeers {
			if a.Replica == r {
				go func() {
					_, _ = call(context.WithoutCancel(ctx), h, id, ctlMsg{Type: msgIdle, Run: runID, Reason: reason})
				}()
			}
		}
	}
	up := func(stage, replica int) bool {
		a, ok := plan.cell(stage, replica)
		id, err := peer.Decode(a.Peer)
		return ok && err == nil && h.Network().Connectedness(id) == network.Connected
	}
	res, err := watch(ctx, o, log, plan, reports, lost, abort, idle, up)
	if res != nil {
		res.Penalties = h.Penalties().Stats()
		// For tools that run launch as a process (the WAN bench's netns mode).
		if b, jerr := json.MarshalIndent(res, "", "  "); jerr == nil {
			if werr := os.WriteFile(filepath.Join(o.OutDir, ResultFile), b, 0o644); werr != nil && err == nil {
				err = fmt.Errorf("launch: %w", werr)
			}
		}
	}
	return res, err
}

// ResultFile is where Launch writes its LaunchResult (JSON) in the run's directory.
const ResultFile = "result.json"

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
		stages, refusals, err := assign.Plan(train.ModelConfig(sp), sp.Pipeline.Stages, sp.Pipeline.Replicas, mb, sp.Pipeline.MicroBatches, sp.Pipeline.InFlight, offers)
		for _, r := range refusals {
			log.Warn("peer not given a stage", "reason", r)
		}
		if err == nil {
			// Assigning and starting take a call per cell; a plan not started within the
			// staffing timeout (at least a minute) is stale.
			now := time.Now().UTC()
			life := max(time.Minute, time.Duration(sp.Pipeline.StaffTimeout)*time.Second)
			return &Plan{Spec: sp.String(), Stages: stages, Created: now, Expires: now.Add(life)}, nil
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
	b, _ := json.Marshal(map[string]any{"run": fmt.Sprintf("%016x", plan.ID), "launcher": plan.Launcher, "cells": len(plan.Stages)})
	if err := t.Publish(ctx, b); err != nil {
		log.Debug("run announcement not published", "err", err)
	}
}

// watch turns reports into metrics until every stage of every replica pipeline still
// whole is done. With one replica any failure ends the run; with several, a failed or
// lost stage breaks its replica pipeline (its other stages are told to go idle) and the
// run goes on while one pipeline is whole. Every outer step's weight hashes must agree
// across the replicas of a stage, or the run fails.
func watch(ctx context.Context, o LaunchOptions, log *slog.Logger, plan *Plan, reports <-chan Report, lost <-chan peer.ID,
	abort func(string), idle func(int, string), up func(stage, replica int) bool) (*LaunchResult, error) {
	sp := o.Spec
	out := o.OutDir
	S, R := sp.Pipeline.Stages, sp.Pipeline.Replicas
	if err := os.WriteFile(filepath.Join(out, train.SpecFile), []byte(sp.String()), 0o644); err != nil {
		return nil, fmt.Errorf("launch: %w", err)
	}
	mw, err := metrics.Create(filepath.Join(out, train.MetricsFile))
	if err != nil {
		return nil, err
	}
	defer mw.Close()
	res := &LaunchResult{RunID: plan.ID, BoundaryFwd: make([]int64, S-1), BoundaryBwd: make([]int64, S-1),
		Checkpoints: make([]string, S), ValLoss: math.NaN(), SyncBytes: make([][]int64, R)}
	for r := range res.SyncBytes {
		res.SyncBytes[r] = make([]int64, S)
	}
	var history []metrics.Step
	pending := map[int]*metrics.Step{} // replica 0's steps whose evaluation is still to come
	start := time.Now()
	last := make([]time.Time, R)
	for r := range last {
		last[r] = start
	}
	done := map[[2]int]bool{}
	broken := map[int]string{}
	hashes := map[[2]int]string{}          // (stage, step) -> the first replica's global weights hash
	outers := map[[2]int][]metrics.Outer{} // (stage, step) -> rows so far
	lagging := map[int]bool{}              // replica pipelines left behind by an outer step, still connected
	emit := func(s metrics.Step) error {
		if err := mw.Write(s); err != nil {
			return err
		}
		if o.OnStep != nil {
			o.OnStep(s)
		}
		if s.Replica == nil || *s.Replica == 0 {
			history = append(history, s) // the plot follows replica 0, which also carries validation
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
	// breakPipeline takes replica pipeline r out of the run, or fails the run when it
	// was the last one whole (or there is only one).
	breakPipeline := func(r int, why string) error {
		if _, ok := broken[r]; ok {
			return nil
		}
		if R == 1 || len(broken)+1 == R {
			abort(why)
			plot()
			return fmt.Errorf("%w: %s", ErrRunFailed, why)
		}
		broken[r] = why
		res.Broken = append(res.Broken, r)
		log.Warn("replica pipeline broken; the run goes on without it", "replica", r, "reason", why, "whole", R-len(broken))
		idle(r, why)
		return nil
	}
	remaining := func() int {
		n := 0
		for r := range R {
			if _, ok := broken[r]; ok || lagging[r] {
				continue
			}
			for s := range S {
				if !done[[2]int{s, r}] {
					n++
				}
			}
		}
		return n
	}
	for remaining() > 0 {
		select {
		case <-ctx.Done():
			abort("launcher interrupted")
			plot()
			return res, ctx.Err()
		case id := <-lost:
			a := cellOf(plan, id)
			if a == nil || done[[2]int{a.Stage, a.Replica}] {
				continue
			}
			if _, ok := broken[a.Replica]; ok {
				continue
			}
			if err := breakPipeline(a.Replica, fmt.Sprintf("the node holding %s (%s) disconnected", cellName(sp, *a), id)); err != nil {
				return res, err
			}
		case r := <-reports:
			a, ok := plan.cell(r.Stage, r.Replica)
			if !ok || a.Peer != r.Peer {
				continue // not from the peer holding that cell
			}
			if _, ok := broken[r.Replica]; ok && r.Kind != ReportOuter {
				if r.Kind == ReportIdle || r.Kind == ReportError {
					log.Info("stage of a broken replica pipeline stopped", "stage", r.Stage, "replica", r.Replica, "reason", r.Error)
				}
				continue
			}
			switch r.Kind {
			case ReportStep:
				now := time.Now()
				if r.Replica == 0 {
					res.Steps, res.Loss = r.Step, r.Loss
				}
				res.Tokens += int64(sp.TokensPerStep())
				s := metrics.Step{Step: r.Step, Loss: r.Loss, Tokens: res.Tokens, LR: r.LR, GradNorm: r.GradNorm,
					TokensPerS: float64(sp.TokensPerStep()) / now.Sub(last[r.Replica]).Seconds(), ElapsedS: now.Sub(start).Seconds()}
				if R > 1 {
					rep := r.Replica
					s.Replica = &rep
				}
				last[r.Replica] = now
				if r.Replica == 0 && evalDue(r.Step) {
					pending[r.Step] = &s
					continue
				}
				if err := emit(s); err != nil {
					return res, err
				}
			case ReportEval:
				p := pending[r.Step]
				if p == nil {
					continue
				}
				v := r.ValLoss
				p.ValLoss, res.ValLoss = &v, v
				// As train does: an evaluated step's time is when its validation loss is known.
				p.ElapsedS = time.Since(start).Seconds()
				if err := emit(*p); err != nil {
					return res, err
				}
				delete(pending, r.Step)
				last[0] = time.Now() // evaluation time is not training throughput
			case ReportOuter:
				if r.Outer == nil {
					continue
				}
				k := [2]int{r.Stage, r.Step}
				if r.Outer.Fetched {
					// It fell behind and took the others' newer global state: its hash is of
					// a later outer step than its own step number says.
					if lagging[r.Replica] {
						delete(lagging, r.Replica)
						log.Info("replica pipeline caught up: it fetched the global state", "replica", r.Replica, "stage", r.Stage, "step", r.Step)
					}
				} else if want, ok := hashes[k]; !ok {
					hashes[k] = r.Outer.Hash
				} else if want != r.Outer.Hash {
					why := fmt.Sprintf("stage %d after step %d: replica %d's global weights hash %s, another replica's %s: the replicas diverged",
						r.Stage, r.Step, r.Replica, r.Outer.Hash, want)
					abort("replicas diverged")
					plot()
					return res, fmt.Errorf("%w: %s", ErrRunFailed, why)
				}
				row := metrics.Outer{Step: r.Step, OuterStep: r.Outer.OuterStep, Stage: r.Stage, Replica: r.Replica, SyncBytes: r.Outer.SyncBytes,
					SyncS: r.Outer.SyncS, WeightsHash: r.Outer.Hash, Contributors: r.Outer.Contributors, ElapsedS: time.Since(start).Seconds()}
				if err := mw.WriteOuter(row); err != nil {
					return res, err
				}
				res.SyncBytes[r.Replica][r.Stage] += r.Outer.SyncBytes
				if r.Stage == 0 && r.Replica == 0 {
					res.OuterSteps++
				}
				outers[k] = append(outers[k], row)
				if o.OnOuter != nil && len(outers[k]) >= R-len(broken)-len(lagging) {
					o.OnOuter(outers[k])
					delete(outers, k)
				}
				for _, m := range r.Outer.Missing {
					if _, ok := broken[m]; ok || lagging[m] {
						continue
					}
					if !up(r.Stage, m) {
						if err := breakPipeline(m, fmt.Sprintf("stage %d of replica %d missed the outer step after step %d and is gone", r.Stage, m, r.Step)); err != nil {
							return res, err
						}
						continue
					}
					// Stalled, not gone: if it comes back it fetches the global state and
					// trains on; the others do not wait for it.
					lagging[m] = true
					log.Warn("replica pipeline fell behind; the others go on without waiting", "replica", m, "stage", r.Stage, "step", r.Step)
				}
			case ReportDone:
				done[[2]int{r.Stage, r.Replica}] = true
				if r.Time != nil {
					t := *r.Time
					t.Stage, t.Replica = r.Stage, r.Replica
					res.Times = append(res.Times, t)
				}
				if r.Replica == 0 {
					res.Checkpoints[r.Stage] = r.Checkpoint
					if r.Stage < S-1 {
						res.BoundaryFwd[r.Stage] = r.BytesFwd
					}
					if r.Stage > 0 {
						res.BoundaryBwd[r.Stage-1] = r.BytesBwd
					}
				}
			case ReportIdle, ReportError:
				if r.Kind == ReportError && r.Diverged {
					// Every replica trains the same way: the run cannot go on.
					abort(r.Error)
					plot()
					return res, fmt.Errorf("%w: %w", ErrRunFailed, &divergedErr{fmt.Sprintf("%s (node %s)", r.Error, r.Peer)})
				}
				if R == 1 || (r.Kind == ReportError && !replicable(r.Error)) {
					abort(fmt.Sprintf("stage %d failed", r.Stage))
					plot()
					return res, fmt.Errorf("%w: %s on %s: %s", ErrRunFailed, cellName(sp, a), r.Peer, r.Error)
				}
				if err := breakPipeline(r.Replica, fmt.Sprintf("%s on %s stopped: %s", cellName(sp, a), r.Peer, r.Error)); err != nil {
					return res, err
				}
			}
		}
	}
	// Whatever is still behind when every other pipeline has finished has no one left
	// to sync with.
	for r := range lagging {
		if err := breakPipeline(r, fmt.Sprintf("replica %d fell behind and had not caught up when the others finished", r)); err != nil {
			return res, err
		}
	}
	res.Elapsed = time.Since(start)
	plot()
	return res, nil
}

// replicable says whether an error a stage reports is one a replicated run survives by
// dropping that stage's replica pipeline: anything but a run that cannot work at all
// (a bad spec; a divergence is reported as such) — those would fail every replica alike.
func replicable(msg string) bool {
	return !strings.Contains(msg, "refused")
}

// cellName names a cell for people: "stage 1" in a run of one replica pipeline,
// "stage 1 of replica 2" otherwise.
func cellName(sp *spec.Spec, a assign.Assignment) string {
	if sp.Pipeline.Replicas > 1 {
		return fmt.Sprintf("stage %d of replica %d", a.Stage, a.Replica)
	}
	return fmt.Sprintf("stage %d", a.Stage)
}

func cellOf(plan *Plan, id peer.ID) *assign.Assignment {
	for i, a := range plan.Stages {
		if a.Peer == id.String() {
			return &plan.Stages[i]
		}
	}
	return nil
}

// serveData loads the run's text, cuts it as the trainer does (validation tail, one
// training shard per replica pipeline) and serves the parts over corpus.Proto.
func serveData(sp *spec.Spec, h *p2p.Host, log *slog.Logger) (*DataPlan, error) {
	text, name, err := train.Corpus(sp.Data.Path)
	if err != nil {
		return nil, err
	}
	tr, val := data.Split(text, sp.Data.ValFraction)
	if data.ValWindows(val, sp.Model.SeqLen) == 0 {
		return nil, fmt.Errorf("launch: validation split of %d bytes holds no window of seq_len+1 = %d bytes; use more text or a larger data.val_fraction",
			len(val), sp.Model.SeqLen+1)
	}
	srv := corpus.NewServer(log.With("sys", "corpus"))
	srv.Penalise = func(p peer.ID, err error) { // err wraps p2p.ErrViolation
		score, banned := h.Penalties().Add(p, err.Error())
		log.Warn("protocol violation", "peer", p, "err", err, "score", fmt.Sprintf("%.1f", score), "banned", banned)
	}
	dp := &DataPlan{Val: srv.Add(val)}
	for r := range sp.Pipeline.Replicas {
		dp.Train = append(dp.Train, srv.Add(data.Shard(tr, r, sp.Pipeline.Replicas)))
	}
	h.Handle(corpus.Proto, srv.HandleStream)
	log.Info("serving data", "corpus", name, "bytes", len(text), "train_shards", len(dp.Train), "val_bytes", len(val))
	return dp, nil
}
