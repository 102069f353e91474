package node

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/core"
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

// ErrStageDown is wrapped, with ErrRunFailed, by the error of a run that stopped
// because a stage has no live node: its only node, or the node of every replica
// pipeline still whole, died, stalled or gave up on a neighbour that did. Launch
// pauses such a run (pipeline.pause_timeout) and resumes it when nodes come back.
var ErrStageDown = errors.New("a stage has no live node")

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
}

// LaunchResult summarises a finished run.
type LaunchResult struct {
	RunID   uint64  `json:"-"`     // "run" in JSON, 16 hex digits, as run.json and the nodes' folders name it
	Steps   int     `json:"steps"` // the last step recorded, as metrics.jsonl counts steps
	Loss    float64 `json:"loss"`
	ValLoss float64 `json:"val_loss"`
	// Tokens and Elapsed are the run's, as metrics.jsonl counts them: every replica's
	// tokens, and a resumed run's include what it went on from.
	Tokens  int64         `json:"tokens"`
	Elapsed time.Duration `json:"-"` // "elapsed_s" in JSON, seconds
	// This launch's own share of the run, over every part of it (steps taken again
	// after a pause included), from which its throughput and traffic are figured:
	// FromStep is the step it went on from (0 for a new run), StepsRun the steps
	// replica pipeline 0 took, TokensRun the tokens every replica trained, TimeRun
	// the wall time from each part's start to its end (staffing and pauses left out).
	FromStep  int           `json:"from_step"`
	StepsRun  int           `json:"steps_run"`
	TokensRun int64         `json:"tokens_run"`
	TimeRun   time.Duration `json:"-"` // "time_run_s" in JSON, seconds
	// Per stage boundary i (stage i → i+1): encoded bytes of the training activation
	// frames replica pipeline 0 sent forward and the gradient frames it sent back, and
	// how many steps of the sending stage they are (a stage stopped early says how far
	// it got, which may be a step past the steps recorded).
	BoundaryFwd      []int64 `json:"boundary_fwd_bytes"`
	BoundaryBwd      []int64 `json:"boundary_bwd_bytes"`
	BoundaryFwdSteps []int   `json:"boundary_fwd_steps"`
	BoundaryBwdSteps []int   `json:"boundary_bwd_steps"`
	// Checkpoints[r][s] is replica r's stage s checkpoint, on its node, as the node
	// last said ("" if it stopped without saying).
	Checkpoints [][]string `json:"checkpoints"`
	// SyncBytes[r][s]: what replica r of stage s sent in its outer steps, both phases,
	// over every part of the run.
	SyncBytes  [][]int64 `json:"sync_bytes"`
	OuterSteps int       `json:"outer_steps"` // outer steps of stage 0's replicas, over every part of the run
	Broken     []int     `json:"broken"`      // replica pipelines that stopped early (a stage's peer died or stalled)
	Rejoined   []int     `json:"rejoined"`    // replica pipelines brought back (once each time) after they broke
	// Repaired counts cells taken by the idle survivor of another broken replica
	// pipeline: two broken pipelines made one whole one.
	Repaired int `json:"repaired"`
	// Pauses: each time the run stopped because a stage had no live node, and how it
	// went on. Broken and Rejoined are over every part of the run, as are the byte
	// counts; checkpoints and Times are the last part's.
	Pauses []Pause `json:"pauses"`
	// Times: where each stage's wall time went, one per (stage, replica) that finished.
	Times []StageTime `json:"times"`
	// Penalties: the protocol violations and bans the launcher's host recorded.
	Penalties p2p.PenaltyStats `json:"penalties"`
	// Model is the model assembled from the stages' final weights, of a run whose spec
	// says export: allowed (see Export); nil if it was not, and ExportError says why.
	Model       *ExportResult `json:"model,omitempty"`
	ExportError string        `json:"export_error,omitempty"`

	cells []assign.Assignment // the run's cells as it ended
}

// launchResultJSON is LaunchResult as result.json has it: the run ID in hex and the
// elapsed time in seconds, as run.json and metrics.jsonl write them.
type launchResultJSON struct {
	Run      string  `json:"run"`
	ElapsedS float64 `json:"elapsed_s"`
	TimeRunS float64 `json:"time_run_s"`
	plainLaunchResult
}

type plainLaunchResult LaunchResult

// MarshalJSON writes result.json's form.
func (r LaunchResult) MarshalJSON() ([]byte, error) {
	return json.Marshal(launchResultJSON{Run: fmt.Sprintf("%016x", r.RunID), ElapsedS: r.Elapsed.Seconds(), TimeRunS: r.TimeRun.Seconds(),
		plainLaunchResult: plainLaunchResult(r)})
}

// UnmarshalJSON reads result.json's form.
func (r *LaunchResult) UnmarshalJSON(b []byte) error {
	var j launchResultJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	id, err := strconv.ParseUint(j.Run, 16, 64)
	if err != nil {
		return fmt.Errorf("result: run %q: want 16 hex digits: %w", j.Run, err)
	}
	*r = LaunchResult(j.plainLaunchResult)
	r.RunID, r.Elapsed, r.TimeRun = id, time.Duration(j.ElapsedS*float64(time.Second)), time.Duration(j.TimeRunS*float64(time.Second))
	return nil
}

// Pause is one stop of a launched run for want of a live node for some stage.
type Pause struct {
	Why       string `json:"why"`        // the failure that paused it, naming the stage and peer
	Recorded  int    `json:"recorded"`   // the last step recorded before it stopped
	ResumedAt int    `json:"resumed_at"` // the step every stage had checkpointed, which it went on from; 0 if it did not
	// Restarted: no step had a checkpoint of every stage, and the run started again
	// from its beginning (ResumedAt 0).
	Restarted bool    `json:"restarted,omitempty"`
	WaitedS   float64 `json:"waited_s"` // from the stop until the run was going again (or given up)
}

// Launch staffs sp's stages with the given peers, sends each a signed plan, starts
// the run, and records its progress into OutDir (metrics.jsonl, spec.yaml,
// loss.png) until every stage reports it is done. It fails, with the reason, if a
// node refuses the run or a stage reports an error it cannot go on from. When a stage
// has no live node left (ErrStageDown), the run pauses for up to
// pipeline.pause_timeout: Launch waits for nodes that hold every stage's checkpoint
// of a common step, the same nodes restarted on their data directories, and resumes
// from there as `launch --resume` would, appending to the same metrics.jsonl.
func Launch(ctx context.Context, o LaunchOptions) (*LaunchResult, error) {
	log := o.Log
	if log == nil {
		log = slog.Default()
	}
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
	calls := newCallClock(time.Duration(o.Spec.Pipeline.StaffTimeout) * time.Second)
	idle := listenIdle(ctx, h, log)
	res, err := launchOnce(ctx, h, calls, idle, o, log, 0, nil)
	wait := time.Duration(o.Spec.Pipeline.PauseTimeout) * time.Second
	// The parts before the last: their share of the run is added to the last's.
	before := newResult(0, o.Spec.Pipeline.Stages, o.Spec.Pipeline.Replicas)
	from := 0
	if res != nil {
		from = res.FromStep
	}
	share := func(last *LaunchResult) *LaunchResult {
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
		stopped := time.Now()
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
			p.WaitedS = time.Since(stopped).Seconds()
			if from == 0 {
				log.Warn("run restarted from its start: no step had a checkpoint of every stage", "paused_for", time.Since(stopped).Round(time.Second))
			} else {
				log.Info("run resumed", "from_step", from, "paused_for", time.Since(stopped).Round(time.Second))
			}
		})
		if !going {
			p.WaitedS = time.Since(stopped).Seconds()
			pauses = append(pauses, p)
			if res != nil {
				res.Pauses = pauses
			}
			return share(res), fmt.Errorf("%w; paused %s and not resumed: %v", err, time.Since(stopped).Round(time.Second), nerr)
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

// writeResult writes res as JSON into dir's ResultFile, for tools that run launch as
// a process (the WAN bench's netns mode).
func writeResult(dir string, res *LaunchResult) error {
	b, err := json.MarshalIndent(res, "", "  ")
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, ResultFile), b, 0o644)
	}
	if err != nil {
		return fmt.Errorf("launch: %w", err)
	}
	return nil
}

// launchOnce is one part of a launched run, from staffing to the run's end or the
// failure that stops it. staffFor, if set, replaces the staffing timeout; started,
// if set, is told the step a resumed run goes on from once it has started.
func launchOnce(ctx context.Context, h *p2p.Host, calls *callClock, spares *idlePeers, o LaunchOptions, log *slog.Logger, staffFor time.Duration, started func(from int)) (*LaunchResult, error) {
	sp := o.Spec
	var prev *runRecord
	if o.Resume {
		var err error
		if prev, err = readRunRecord(o.OutDir, sp); err != nil {
			return nil, err
		}
	}
	reports := make(chan Report, 1024)
	runID := newRunID()
	h.Handle(p2p.ProtoControl, func(s network.Stream) {
		defer s.Close()
		from := s.Conn().RemotePeer()
		_ = s.SetDeadline(time.Now().Add(wireWindow(h, from)))
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
				actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second+8*h.Peerstore().LatencyEWMA(id))
				defer cancel()
				_, _ = call(actx, h, calls, nil, id, ctlMsg{Type: msgAbort, Run: runID, Reason: reason})
			}()
		}
		wg.Wait()
	}
	var refusals []string
	for _, a := range plan.Stages {
		id, _ := peer.Decode(a.Peer)
		r, err := call(ctx, h, calls, nil, id, ctlMsg{Type: msgAssign, Signed: signed})
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
		if r, err := call(ctx, h, calls, nil, id, ctlMsg{Type: msgStart, Run: runID}); err != nil || !r.OK {
			abort("start failed")
			if err == nil {
				err = errors.New(r.Error)
			}
			return nil, fmt.Errorf("%w: start %s: %v", ErrRunFailed, cellName(sp, a), err)
		}
	}
	announce(ctx, h, plan, log)
	if started != nil && plan.Resume != nil {
		started(plan.Resume.Step)
	} else if started != nil && plan.restarted {
		started(0)
	}
	log.Info("run started", "run", fmt.Sprintf("%016x", runID), "stages", sp.Pipeline.Stages, "replicas", sp.Pipeline.Replicas, "steps", sp.Train.Steps)
	up := func(stage, replica int) bool {
		a, ok := plan.cell(stage, replica)
		id, err := peer.Decode(a.Peer)
		return ok && err == nil && p2p.Linked(h.Network(), id)
	}
	// offerFrom asks id, within a few of its round trips, whether it has a free slot
	// that holds a cell needing need bytes; a hung node cannot answer.
	offerFrom := func(id peer.ID, addrs []string, need int64) bool {
		cctx, cancel := context.WithTimeout(p2p.AllowRelayed(ctx, "rejoin"), time.Second+8*h.Peerstore().LatencyEWMA(id))
		defer cancel()
		for _, a := range addrs {
			if info, err := peer.AddrInfoFromString(a); err == nil && info.ID == id {
				h.Peerstore().AddAddrs(id, info.Addrs, peerstore.TempAddrTTL)
			}
		}
		err := h.Host.Connect(cctx, peer.AddrInfo{ID: id})
		var rep *ctlReply
		if err == nil {
			rep, err = call(cctx, h, calls, nil, id, ctlMsg{Type: msgOffer})
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
					_, _ = call(context.WithoutCancel(ctx), h, calls, nil, id, ctlMsg{Type: msgIdle, Run: runID, Reason: reason})
				}()
				continue
			}
			gone, ok := plan.cell(a.Stage, r)
			if !ok || isBroken(a.Replica) {
				continue
			}
			go func() {
				rep, err := call(context.WithoutCancel(ctx), h, calls, nil, id, ctlMsg{Type: msgDrop, Run: runID, Cell: &gone, Reason: reason})
				if err == nil && !rep.OK {
					err = errors.New(rep.Error)
				}
				if err != nil {
					log.Debug("a replica was not told to drop a broken pipeline from its all-reduce", "cell", cellName(sp, a), "err", err)
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
						"cell", cellName(sp, a), "from", cellName(sp, assign.Assignment{Stage: left.Stage, Replica: left.Replica}), "node", id, "was", was)
				} else {
					log.Info("a newcomer takes the cell of a node gone", "cell", cellName(sp, a), "was", was, "now", id)
				}
				for _, c := range tell {
					for _, b := range plan.Stages {
						if b.Replica == r || b.Replica == c.Replica || isBroken(b.Replica) {
							continue
						}
						bid, _ := peer.Decode(b.Peer)
						// Made from the watch loop: a hung node must not hold it long.
						cctx, cancel := context.WithTimeout(ctx, 5*time.Second+8*h.Peerstore().LatencyEWMA(bid))
						rep, err := call(cctx, h, calls, nil, bid, ctlMsg{Type: msgReplace, Run: runID, Cell: &c})
						cancel()
						if err == nil && !rep.OK {
							err = errors.New(rep.Error)
						}
						if err != nil {
							log.Warn("a replica was not told of the cell's new node", "cell", cellName(sp, b), "err", err)
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
			j.Join = &JoinPlan{Replica: r, Step: step, Nonce: newRunID()}
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
					_, _ = call(context.WithoutCancel(ctx), h, calls, nil, id, ctlMsg{Type: msgAbort, Run: runID, Reason: "rejoin failed"})
				}
			}
			for _, typ := range []string{msgAssign, msgStart} {
				for _, a := range plan.Stages {
					if a.Replica != r {
						continue
					}
					id, _ := peer.Decode(a.Peer)
					m := ctlMsg{Type: typ, Run: runID}
					if typ == msgAssign {
						m.Signed = signed
					}
					cctx, cancel := context.WithTimeout(ctx, 5*time.Second+8*h.Peerstore().LatencyEWMA(id))
					rep, err := call(cctx, h, calls, nil, id, m)
					cancel()
					if err == nil && !rep.OK {
						err = errors.New(rep.Error)
					}
					if err != nil {
						undo()
						return 0, fmt.Errorf("%s of %s: %w", typ, cellName(sp, a), err)
					}
					if typ == msgAssign {
						taken = append(taken, id)
					}
				}
			}
			return j.Join.Nonce, nil
		},
	}
	// Orders to every cell (or a pipeline's), each a call of its own, bounded by the
	// node's round trips: a hung node must not hold the others' orders up.
	order := func(r int, m ctlMsg) (refused []string) {
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
				cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second+8*h.Peerstore().LatencyEWMA(id))
				defer cancel()
				rep, err := call(cctx, h, calls, nil, id, m)
				if err == nil && !rep.OK {
					err = errors.New(rep.Error)
				}
				if err != nil {
					mu.Lock()
					refused = append(refused, fmt.Sprintf("%s: %v", cellName(sp, a), err))
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
				if refused := order(-1, ctlMsg{Type: msgCheckpoint, Run: runID, Step: step}); len(refused) > 0 {
					log.Warn("a checkpoint due by time was not taken by every stage; it is not one to resume from", "step", step, "refused", strings.Join(refused, "; "))
					return
				}
				acked <- step
			}()
		},
		recorded: func(step int) {
			go order(-1, ctlMsg{Type: msgRecorded, Run: runID, Step: step})
		},
		stopAt: func(r, step int, reason string) {
			go func() {
				if refused := order(r, ctlMsg{Type: msgStopAt, Run: runID, Step: step, Reason: reason}); len(refused) > 0 {
					log.Debug("not every stage took the stop", "step", step, "refused", strings.Join(refused, "; "))
				}
			}()
		},
	}
	res, err := watch(ctx, o, log, plan, reports, lost, abort, idle, up, rj, tell)
	if err != nil && res != nil {
		drainEnds(res, plan, reports, 2*time.Second)
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

// idlePeers are the nodes heard on the heartbeat topic holding no stage, with when
// each was last heard so: candidates for a cell whose node is gone.
type idlePeers struct {
	mu   sync.Mutex
	seen map[peer.ID]idleSeen
}

type idleSeen struct {
	at    time.Time
	addrs []string
}

// listenIdle follows the heartbeat topic on h until ctx ends or h closes.
func listenIdle(ctx context.Context, h *p2p.Host, log *slog.Logger) *idlePeers {
	ip := &idlePeers{seen: map[peer.ID]idleSeen{}}
	t, err := h.PubSub.Join(p2p.TopicHeartbeats)
	if err != nil {
		log.Debug("no heartbeat topic: only --peers can take a gone node's cell", "err", err)
		return ip
	}
	sub, err := t.Subscribe()
	if err != nil {
		_ = t.Close()
		log.Debug("no heartbeat subscription: only --peers can take a gone node's cell", "err", err)
		return ip
	}
	go func() {
		defer func() { sub.Cancel(); _ = t.Close() }()
		for {
			m, err := sub.Next(ctx)
			if err != nil {
				return
			}
			var hb Heartbeat
			if json.Unmarshal(m.Data, &hb) != nil {
				continue
			}
			from := m.GetFrom() // signed by its sender, unlike the heartbeat's own peer field
			ip.mu.Lock()
			if len(hb.Runs) == 0 {
				var addrs []string
				for _, a := range hb.Addrs {
					if info, err := peer.AddrInfoFromString(a); err == nil && info.ID == from {
						addrs = append(addrs, a) // only its own
					}
				}
				ip.seen[from] = idleSeen{time.Now(), addrs}
			} else {
				delete(ip.seen, from)
			}
			ip.mu.Unlock()
		}
	}()
	return ip
}

// recent lists, by peer ID, the idle peers heard within the last three heartbeats,
// each with the addresses it gave.
func (ip *idlePeers) recent() map[peer.ID][]string {
	ip.mu.Lock()
	defer ip.mu.Unlock()
	out := map[peer.ID][]string{}
	for id, s := range ip.seen {
		if time.Since(s.at) < 3*HeartbeatInterval {
			out[id] = s.addrs
		}
	}
	return out
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
func staff(ctx context.Context, h *p2p.Host, calls *callClock, sp *spec.Spec, o LaunchOptions, prev *runRecord, timeout time.Duration, log *slog.Logger) (*Plan, error) {
	deadline := time.Now().Add(timeout)
	// Waiting can last minutes (a paused run): say what is missing when it changes,
	// and otherwise every half minute.
	var said string
	var saidAt time.Time
	// Only steps whose rows are all recorded can be resumed from; the file does not
	// change while staffing, so it is read once.
	var through int
	if prev != nil {
		through = recordedThrough(filepath.Join(o.OutDir, train.MetricsFile))
	}
	say := func(msg, missing string, args ...any) {
		if missing == said && time.Since(saidAt) < 30*time.Second {
			return
		}
		said, saidAt = missing, time.Now()
		log.Warn(msg, append([]any{"missing", missing}, args...)...)
	}
	mb := sp.Train.BatchSize / sp.Pipeline.MicroBatches
	noCommon := 0 // staffing rounds in a row in which every node answered and none held a common step
	for {
		var offers []assign.Offer
		var problems, refused []string
		held := map[string][]Held{}
		ask := ctlMsg{Type: msgOffer}
		if prev != nil {
			ask.Run, ask.Spec = prev.id, sp.String()
		}
		for _, addr := range o.Peers {
			id, err := h.Connect(ctx, addr)
			if err != nil {
				// A node restarted (during a pause, say) may listen elsewhere now; it
				// dials the launchers it knew, so it may be connected all the same.
				if a, aerr := ma.NewMultiaddr(addr); aerr == nil {
					if info, ierr := peer.AddrInfoFromP2pAddr(a); ierr == nil && p2p.Linked(h.Network(), info.ID) {
						id, err = info.ID, nil
					}
				}
			}
			if err != nil {
				problems = append(problems, err.Error())
				continue
			}
			r, err := call(ctx, h, calls, nil, id, ctlMsg{Type: ask.Type, Run: ask.Run, Spec: ask.Spec})
			if err == nil && !r.OK && r.Error != "" {
				// A node that will not take this launcher's runs at all (its key is not
				// trusted there): waiting does not change that.
				refused = append(refused, fmt.Sprintf("%s on %s", r.Error, addr))
				continue
			}
			if err != nil || !r.OK || r.Offer == nil {
				problems = append(problems, fmt.Sprintf("%s gave no offer: %v", id, err))
				continue
			}
			r.Offer.Peer = id.String()
			offers = append(offers, *r.Offer)
			held[id.String()] = r.Held
		}
		if len(refused) > 0 {
			return nil, fmt.Errorf("%w: %s", ErrRunFailed, strings.Join(refused, "; "))
		}
		var resume *ResumePlan
		restart := false
		if prev != nil {
			r, ordered, err := resumePoint(sp, prev.id, through, offers, held)
			switch {
			case err == nil:
				resume, offers, noCommon = r, ordered, 0
			case len(problems) == 0 && noCommon >= 1:
				// Every node given has answered, twice, and none holds more: no step every
				// stage checkpointed will come. The run starts again from its beginning,
				// which is as exact as resuming.
				log.Warn("the run restarts from its start: no step has a checkpoint of every stage", "why", err)
				restart = true
			default:
				if len(problems) == 0 {
					noCommon++
				} else {
					noCommon = 0
				}
				if time.Now().After(deadline) {
					return nil, fmt.Errorf("%w: %v%s", ErrRunFailed, err, notReached(problems))
				}
				say("waiting for the nodes that hold the run's checkpoints", err.Error(), "unreachable", len(problems), "timeout_in", time.Until(deadline).Round(time.Second))
				select {
				case <-ctx.Done():
					return nil, ctx.Err()
				case <-time.After(2 * time.Second):
				}
				continue
			}
		}
		able, refusals := assign.ForPrecision(offers, sp.Model.Precision)
		stages, planRefusals, err := assign.Plan(train.ModelConfig(sp), sp.Pipeline.Stages, sp.Pipeline.Replicas, mb, sp.Pipeline.MicroBatches, sp.Pipeline.InFlight, sp.Model.Recompute, able)
		refusals = append(refusals, planRefusals...)
		for _, r := range refusals {
			log.Warn("peer not given a stage", "reason", r)
		}
		if err == nil {
			// Assigning and starting take a call per cell; a plan not started within the
			// staffing timeout (at least a minute) is stale.
			now := time.Now().UTC()
			life := max(time.Minute, time.Duration(sp.Pipeline.StaffTimeout)*time.Second)
			if err := resumeHolders(sp, resume, stages, offers); err != nil {
				return nil, fmt.Errorf("%w: %v", ErrRunFailed, err)
			}
			if sp.Export == spec.ExportAllowed {
				warnNoExport(sp, stages, offers, log)
			}
			return &Plan{Spec: sp.String(), Stages: stages, Created: now, Expires: now.Add(life), Resume: resume, restarted: restart}, nil
		}
		if !errors.Is(err, assign.ErrUnstaffed) || time.Now().After(deadline) {
			return nil, fmt.Errorf("%w: %v%s", ErrRunFailed, err, notReached(problems))
		}
		say("waiting for peers", err.Error(), "unreachable", len(problems), "timeout_in", time.Until(deadline).Round(time.Second))
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(2 * time.Second):
		}
	}
}

// notReached says which peers staffing could not reach or get an offer from, if any.
func notReached(problems []string) string {
	if len(problems) == 0 {
		return ""
	}
	return fmt.Sprintf("; %s not reached (is it running, at that address?): %s", plural(len(problems), "node"), strings.Join(problems, "; "))
}

// ErrNotMultiaddr is wrapped by CheckPeerAddr's error for text that is not a
// multiaddr at all (a command may then try it as a file).
var ErrNotMultiaddr = errors.New("not a multiaddr")

// CheckPeerAddr returns the peer ID of addr, a node's full address: a multiaddr ending
// in /p2p/ and the node's peer ID. The error says what a full address looks like and
// where a node prints it.
func CheckPeerAddr(addr string) (peer.ID, error) {
	const where = "a node prints its full addresses when it starts (\"listening on ...\") and writes them to DIR/addrs in its data directory"
	info, err := peer.AddrInfoFromString(addr)
	if err == nil {
		return info.ID, nil
	}
	if id, derr := peer.Decode(addr); derr == nil {
		return "", fmt.Errorf("%s is a peer ID alone: give the node's full address, a multiaddr ending in /p2p/%s (%s)", addr, id, where)
	}
	if m, merr := ma.NewMultiaddr(addr); merr == nil {
		return "", fmt.Errorf("%s has no peer ID: a node's full address ends in /p2p/ and its ID, as in %s/p2p/12D3KooW... (%s)", addr, m, where)
	} else {
		return "", fmt.Errorf("%w (%v): a node's full address looks like /ip4/10.0.0.5/tcp/4001/p2p/12D3KooW... (%s)", ErrNotMultiaddr, merr, where)
	}
}

// checkPeers refuses peer addresses that cannot be dialled and fewer nodes than the
// run has cells (each node holds one), before any node is asked.
func checkPeers(sp *spec.Spec, addrs []string) error {
	ids := map[peer.ID]bool{}
	var errs []error
	for _, a := range addrs {
		id, err := CheckPeerAddr(a)
		if err != nil {
			errs = append(errs, fmt.Errorf("peer %w", err))
			continue
		}
		ids[id] = true
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	S, R := sp.Pipeline.Stages, sp.Pipeline.Replicas
	need := S * R
	if len(ids) >= need {
		return nil
	}
	what, fix := plural(S, "stage"), "lower pipeline.stages"
	if R > 1 {
		what, fix = what+" × "+plural(R, "replica"), "lower pipeline.replicas"
	}
	offered := fmt.Sprintf("%d offered", len(ids))
	if len(addrs) != len(ids) {
		offered = fmt.Sprintf("%d offered (%d addresses, some of the same node)", len(ids), len(addrs))
	}
	return fmt.Errorf("this run needs %s (%s), %s: start %d more and pass each with --peer, or %s",
		plural(need, "node"), what, offered, need-len(ids), fix)
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)

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
	abort func(string), idle func(int, string), up func(stage, replica int) bool, rj rejoiner, tell stageOrders) (*LaunchResult, error) {
	sp := o.Spec
	out := o.OutDir
	S, R := sp.Pipeline.Stages, sp.Pipeline.Replicas
	if err := os.WriteFile(filepath.Join(out, train.SpecFile), []byte(sp.String()), 0o644); err != nil {
		return nil, fmt.Errorf("launch: %w", err)
	}
	// A resumed run keeps the rows of the steps it continues from, and only those.
	var kept *keptRows
	if plan.Resume != nil {
		var err error
		if kept, err = readKeptRows(filepath.Join(out, train.MetricsFile), plan.Resume.Step); err != nil {
			return nil, err
		}
	}
	mw, err := metrics.Create(filepath.Join(out, train.MetricsFile))
	if err != nil {
		return nil, err
	}
	defer mw.Close()
	pending := map[int]*metrics.Step{} // replica 0's steps whose evaluation is still to come
	// A run that ends with a step's evaluation still to come records the step without
	// it: every stage holds that step's checkpoint (stages stop right after a step), and
	// a resumed run evaluates it again first (core.Config.EvalFrom) and fills it in.
	defer func() {
		for _, step := range slices.Sorted(maps.Keys(pending)) {
			if err := mw.Write(*pending[step]); err != nil {
				log.Warn("a step's row was not recorded", "step", step, "err", err)
			}
		}
	}()
	if kept != nil {
		for _, row := range kept.rows {
			if st, ok := evalRow(row, plan.Resume.Step, sp); ok {
				pending[st.Step] = st // written with its validation loss, evaluated again
				continue
			}
			if err := mw.WriteRaw(row); err != nil {
				return nil, err
			}
		}
	}
	res := newResult(plan.ID, S, R)
	var history []metrics.Step
	start := time.Now()
	began := start
	// However the run ends, its times are known.
	defer func() {
		res.Elapsed, res.TimeRun = time.Since(start), time.Since(began)
	}()
	if kept != nil {
		// Tokens and elapsed time go on from where the interrupted run left them.
		res.Tokens, res.Steps, res.FromStep = kept.tokens, plan.Resume.Step, plan.Resume.Step
		start = start.Add(-time.Duration(kept.elapsedS * float64(time.Second)))
		for _, s := range kept.steps {
			if (s.Replica == nil || *s.Replica == 0) && pending[s.Step] == nil {
				history = append(history, s)
			}
		}
	}
	last := make([]time.Time, R)
	for r := range last {
		last[r] = time.Now()
	}
	// Checkpoints: the count rule's steps and the time rule's, ordered here, are taken
	// by every stage; once every row up to one is recorded, the stages are told, and
	// keep no older checkpoint.
	partStart := time.Now()
	align := 1
	if R > 1 {
		align = sp.DiLoCo.InnerSteps
	}
	ckClock := core.CheckpointClock{Every: time.Duration(sp.CheckpointSeconds) * time.Second, Interval: sp.CheckpointInterval,
		Align: align, Last: sp.Train.Steps, Lead: time.Second}
	commonCk := map[int]bool{} // steps of orders every cell took
	ckAcked := make(chan int, 16)
	rowsIn := map[int]bool{} // replica 0's rows recorded past through
	through, toldRecorded := 0, 0
	if plan.Resume != nil {
		through, toldRecorded = plan.Resume.Step, plan.Resume.Step
	}
	latest := map[int]int{}   // replica > 0 -> its last row recorded
	var recordedTo func() int // set once the broken pipelines are known, below
	// tellRecorded tells the stages the newest common checkpoint step whose rows are
	// all recorded (as recordedThrough will read them): replica 0's through, and no
	// later than any other replica whose pipeline is whole has got.
	recordedAll := func(live func(r int) bool) int {
		n := through
		for r, l := range latest {
			if live(r) {
				n = min(n, l)
			}
		}
		return n
	}
	tellRecorded := func() {
		upTo := recordedTo()
		c := 0
		if sp.CheckpointInterval > 0 {
			c = upTo / sp.CheckpointInterval * sp.CheckpointInterval
		}
		for k := range commonCk {
			if k <= upTo {
				c = max(c, k)
			}
		}
		if c > toldRecorded && tell.recorded != nil {
			toldRecorded = c
			tell.recorded(c)
		}
	}
	// Stopping: a node stopping gracefully said after which step; the other stages of
	// its pipeline were told to stop after it too, and the pipeline is taken out once
	// every stage has stopped (or stopWait has passed).
	type stopState struct {
		step    int
		why     string
		since   time.Time
		stopped map[int]bool
	}
	stopping := map[int]*stopState{}
	done := map[[2]int]bool{}
	broken := map[int]string{}
	trained := make([]int, R)              // steps each replica pipeline reported in this part of the run
	brokeWhy := map[int]string{}           // why each pipeline last broke, kept when it rejoins
	hashes := map[[2]int]string{}          // (stage, step) -> the first replica's global weights hash
	outers := map[[2]int][]metrics.Outer{} // (stage, step) -> rows so far
	lagging := map[int]bool{}              // replica pipelines left behind by an outer step, still connected
	// Rejoining: a broken pipeline whose nodes are all reachable again is brought back
	// at the next outer step every stage has taken; reports of a pipeline's earlier
	// incarnation (its join nonce) are ignored.
	epoch := make([]uint64, R)
	joinedAt := make([]int, R) // the outer step after which a pipeline rejoined
	wantJoin := map[int]bool{}
	back := make(chan int, R)
	stageSynced := map[[2]int]bool{} // (stage, step) whose live replicas have all reported the outer step
	synced := map[int]int{}          // step -> stages whose outer step is complete
	rejoinable := R > 1 && sp.DiLoCo.Fragments == 1 && rj.reach != nil
	stopProbes := make(chan struct{})
	defer close(stopProbes)
	probe := func(r int) {
		go func() {
			for {
				select {
				case <-ctx.Done():
					return
				case <-stopProbes:
					return
				case <-time.After(2 * time.Second):
				}
				if rj.reach(r) {
					select {
					case back <- r:
					case <-stopProbes:
					}
					return
				}
			}
		}()
	}
	recordedTo = func() int {
		return recordedAll(func(r int) bool { _, b := broken[r]; return !b && !lagging[r] })
	}
	emit := func(s metrics.Step) error {
		if err := mw.Write(s); err != nil {
			return err
		}
		if o.OnStep != nil {
			o.OnStep(s)
		}
		if s.Replica != nil && *s.Replica > 0 {
			latest[*s.Replica] = max(latest[*s.Replica], s.Step)
			tellRecorded()
		}
		if s.Replica == nil || *s.Replica == 0 {
			history = append(history, s) // the plot follows replica 0, which also carries validation
			rowsIn[s.Step] = true
			for rowsIn[through+1] {
				through++
				delete(rowsIn, through)
			}
			tellRecorded()
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
			return fmt.Errorf("%w: %w: %s", ErrRunFailed, ErrStageDown, why)
		}
		broken[r], brokeWhy[r] = why, why
		res.Broken = append(res.Broken, r)
		if rj.broke != nil {
			rj.broke(r, true)
		}
		log.Warn("replica pipeline broken; the run goes on without it", "replica", r, "reason", why, "whole", R-len(broken))
		idle(r, why)
		if rejoinable {
			probe(r)
		}
		return nil
	}
	// stopped notes that cell (stage, r) has stopped; if its pipeline is stopping it
	// reports whether every stage of it has (then the pipeline is out).
	stopped := func(stage, r int) (handled bool, err error) {
		st, ok := stopping[r]
		if !ok {
			return false, nil
		}
		st.stopped[stage] = true
		if len(st.stopped) == S {
			delete(stopping, r)
			return true, breakPipeline(r, st.why)
		}
		return true, nil
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
	// The launcher's own deadline, a last resort behind the stages' (which name the
	// stage that stalled): no report at all for much longer than the steps have taken.
	var silence silenceClock
	silence.staff = time.Duration(sp.Pipeline.StaffTimeout) * time.Second
	silence.heard(time.Now(), false)
	check := time.NewTicker(time.Second)
	defer check.Stop()
	// nodeLost takes the news that node id's connection closed.
	nodeLost := func(id peer.ID) error {
		a := cellOf(plan, id)
		if a == nil || done[[2]int{a.Stage, a.Replica}] {
			return nil
		}
		if _, ok := broken[a.Replica]; ok {
			return nil
		}
		if handled, err := stopped(a.Stage, a.Replica); handled {
			return err
		}
		return breakPipeline(a.Replica, fmt.Sprintf("the node holding %s (%s) disconnected", cellName(sp, *a), id))
	}
	// A node's reports are queued before it has their replies, hence before its
	// connection can close: a lost node waits here until the reports queued when it was
	// lost are taken, so that its last ones (the step it stopped after) count first.
	type lostNode struct {
		id    peer.ID
		after int // reports still to take before it
	}
	var gone []lostNode
	for remaining() > 0 {
		if len(gone) > 0 && gone[0].after <= 0 {
			id := gone[0].id
			gone = gone[1:]
			if err := nodeLost(id); err != nil {
				return res, err
			}
			continue
		}
		select {
		case <-ctx.Done():
			abort("launcher interrupted")
			plot()
			return res, ctx.Err()
		case r := <-back:
			if _, ok := broken[r]; ok {
				wantJoin[r] = true
				log.Info("the nodes of a broken replica pipeline are reachable again; it rejoins at the next outer step", "replica", r)
			}
		case at := <-ckAcked:
			commonCk[at] = true
			tellRecorded()
		case now := <-check.C:
			for r, st := range stopping {
				if now.Sub(st.since) > stopWait {
					delete(stopping, r)
					if err := breakPipeline(r, st.why+" (not every stage had stopped "+stopWait.String()+" later)"); err != nil {
						return res, err
					}
				}
			}
			if quiet, dl := silence.overdue(now, len(pending) > 0); quiet > 0 {
				why := fmt.Sprintf("no report from any stage for %s (deadline %s, from the steps measured)", quiet.Round(time.Second), dl.Round(time.Second))
				abort(why)
				plot()
				return res, fmt.Errorf("%w: %s", ErrRunFailed, why)
			}
		case id := <-lost:
			gone = append(gone, lostNode{id, len(reports)})
		case r := <-reports:
			for i := range gone {
				gone[i].after--
			}
			a, ok := plan.cell(r.Stage, r.Replica)
			if !ok || a.Peer != r.Peer || r.Join != epoch[r.Replica] {
				continue // not from the peer holding that cell, or from before it rejoined
			}
			silence.heard(time.Now(), r.Kind == ReportStep)
			if _, ok := broken[r.Replica]; ok && r.Kind != ReportOuter {
				if r.Kind == ReportIdle || r.Kind == ReportError {
					res.stageEnded(r)
					log.Info("stage of a broken replica pipeline stopped", "stage", r.Stage, "replica", r.Replica, "reason", r.Error)
				}
				continue
			}
			switch r.Kind {
			case ReportStep:
				now := time.Now()
				if r.Replica == 0 {
					res.Steps, res.Loss = r.Step, r.Loss
					res.StepsRun++
				}
				trained[r.Replica]++
				res.Tokens += int64(sp.TokensPerStep())
				res.TokensRun += int64(sp.TokensPerStep())
				s := metrics.Step{Step: r.Step, Loss: r.Loss, Tokens: res.Tokens, LR: r.LR, GradNorm: r.GradNorm,
					TokensPerS: float64(sp.TokensPerStep()) / now.Sub(last[r.Replica]).Seconds(), ElapsedS: now.Sub(start).Seconds()}
				if R > 1 {
					rep := r.Replica
					s.Replica = &rep
				}
				last[r.Replica] = now
				if r.Replica == 0 {
					var mean time.Duration
					if silence.steps > 0 {
						mean = silence.sum / time.Duration(silence.steps)
					}
					if at, ok := ckClock.Recorded(r.Step, time.Since(partStart), mean); ok && tell.checkpoint != nil {
						log.Info("checkpoint due by time; every stage takes it at a step ahead", "step", at, "now_at", r.Step)
						tell.checkpoint(at, ckAcked)
					}
				}
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
				if r.Stage == 0 && !stageSynced[k] {
					silence.outer(time.Now(), time.Duration(r.Outer.SyncS*float64(time.Second)))
				}
				outers[k] = append(outers[k], row)
				complete := len(outers[k]) >= R-len(broken)-len(lagging)
				if o.OnOuter != nil && complete {
					o.OnOuter(outers[k])
					delete(outers, k)
				}
				if complete && !stageSynced[k] {
					stageSynced[k] = true
					synced[r.Step]++
					if synced[r.Step] == S && len(wantJoin) > 0 && r.Step < sp.Train.Steps {
						for _, j := range slices.Sorted(maps.Keys(wantJoin)) {
							nonce, err := rj.join(j, r.Step)
							if err != nil {
								log.Warn("replica pipeline could not rejoin; trying again at the next outer step", "replica", j, "step", r.Step, "err", err)
								continue
							}
							delete(wantJoin, j)
							delete(broken, j)
							if rj.broke != nil {
								rj.broke(j, false)
							}
							delete(lagging, j)
							epoch[j], joinedAt[j] = nonce, r.Step
							for s := range S {
								delete(done, [2]int{s, j})
							}
							res.Rejoined = append(res.Rejoined, j)
							log.Info("replica pipeline rejoined", "replica", j, "after_step", r.Step, "whole", R-len(broken))
						}
					}
				}
				for _, m := range r.Outer.Missing {
					if _, ok := broken[m]; ok || lagging[m] || r.Step <= joinedAt[m] {
						continue // already out, or missing from a step before it rejoined
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
				res.stageEnded(r)
			case ReportStopping:
				if _, ok := stopping[r.Replica]; ok {
					continue
				}
				why := fmt.Sprintf("the node holding %s (%s) is stopping; every stage of its pipeline stops after step %d", cellName(sp, a), r.Peer, r.Step)
				log.Warn("a node is stopping: every stage of its pipeline stops after the same step, keeping its checkpoint",
					"cell", cellName(sp, a), "node", r.Peer, "after_step", r.Step)
				stopping[r.Replica] = &stopState{step: r.Step, why: why, since: time.Now(), stopped: map[int]bool{}}
				if tell.stopAt != nil {
					tell.stopAt(r.Replica, r.Step, fmt.Sprintf("the node holding %s is stopping", cellName(sp, a)))
				}
			case ReportIdle, ReportError:
				res.stageEnded(r)
				if r.Kind == ReportError && r.Diverged {
					// Every replica trains the same way: the run cannot go on.
					abort(r.Error)
					plot()
					return res, fmt.Errorf("%w: %w", ErrRunFailed, &divergedErr{fmt.Sprintf("%s (node %s)", r.Error, r.Peer)})
				}
				if r.Kind == ReportError && r.CheckpointFailed {
					// A node that cannot write its checkpoint cannot keep what it trains;
					// waiting for it would not help.
					abort(fmt.Sprintf("%s could not write its checkpoint", cellName(sp, a)))
					plot()
					return res, fmt.Errorf("%w: %s on %s %s (free space or fix the disk on that node, then continue with launch --resume)",
						ErrRunFailed, cellName(sp, a), r.Peer, r.Error)
				}
				if r.Kind == ReportError && !replicable(r.Error) {
					abort(fmt.Sprintf("stage %d failed", r.Stage))
					plot()
					return res, fmt.Errorf("%w: %s on %s: %s", ErrRunFailed, cellName(sp, a), r.Peer, r.Error)
				}
				if handled, err := stopped(r.Stage, r.Replica); handled {
					if err != nil {
						return res, err
					}
					continue
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
	plot()
	return res, finishedWell(sp, res, trained, brokeWhy)
}

// finishedWell is the error of a run that ended without failing but did not do what it
// was for: a replica pipeline that trained no step, or no validation loss recorded.
func finishedWell(sp *spec.Spec, res *LaunchResult, trained []int, brokeWhy map[int]string) error {
	var idle []string
	for r, n := range trained {
		if n == 0 {
			why := brokeWhy[r]
			if why == "" {
				why = "no step was reported"
			}
			idle = append(idle, fmt.Sprintf("%s trained no step of %d (%s)", replicaName(sp, r), sp.Train.Steps, why))
		}
	}
	if len(idle) > 0 {
		return fmt.Errorf("%w: %s", ErrRunFailed, strings.Join(idle, "; "))
	}
	if math.IsNaN(res.ValLoss) { // as it starts: none reported
		why := brokeWhy[0]
		if why == "" {
			why = "its evaluation was never reported"
		}
		return fmt.Errorf("%w: no validation loss was recorded: replica pipeline 0, which evaluates, stopped at step %d (%s)", ErrRunFailed, res.Steps, why)
	}
	return nil
}

// replicaName names replica pipeline r for people: "the pipeline" in a run of one.
func replicaName(sp *spec.Spec, r int) string {
	if sp.Pipeline.Replicas == 1 {
		return "the pipeline"
	}
	return fmt.Sprintf("replica pipeline %d", r)
}

func newResult(run uint64, S, R int) *LaunchResult {
	res := &LaunchResult{RunID: run, BoundaryFwd: make([]int64, S-1), BoundaryBwd: make([]int64, S-1),
		BoundaryFwdSteps: make([]int, S-1), BoundaryBwdSteps: make([]int, S-1),
		Checkpoints: make([][]string, R), ValLoss: math.NaN(), SyncBytes: make([][]int64, R)}
	for r := range R {
		res.SyncBytes[r] = make([]int64, S)
		res.Checkpoints[r] = make([]string, S)
	}
	return res
}

// stageEnded notes what a stage says when it stops, done or not: where its
// checkpoint is and, for replica pipeline 0, what it sent over its boundaries in
// the steps it took since the part began (res.FromStep).
func (res *LaunchResult) stageEnded(r Report) {
	S := len(res.BoundaryFwd) + 1
	if r.Replica < 0 || r.Replica >= len(res.Checkpoints) || r.Stage < 0 || r.Stage >= S {
		return
	}
	if r.Checkpoint != "" {
		res.Checkpoints[r.Replica][r.Stage] = r.Checkpoint
	}
	steps := r.Step - res.FromStep
	if r.Replica != 0 || steps <= 0 || (r.BytesFwd == 0 && r.BytesBwd == 0) {
		return
	}
	if r.Stage < S-1 {
		res.BoundaryFwd[r.Stage], res.BoundaryFwdSteps[r.Stage] = r.BytesFwd, steps
	}
	if r.Stage > 0 {
		res.BoundaryBwd[r.Stage-1], res.BoundaryBwdSteps[r.Stage-1] = r.BytesBwd, steps
	}
}

// evalRow parses row as replica 0's row of step, if that step is one a resumed run
// evaluates again (core.Config.EvalFrom).
func evalRow(row json.RawMessage, step int, sp *spec.Spec) (*metrics.Step, bool) {
	if step != sp.Train.Steps && (sp.EvalInterval <= 0 || step%sp.EvalInterval != 0) {
		return nil, false
	}
	var probe struct {
		Loss *float64 `json:"loss"` // absent: not a step's row
	}
	var st metrics.Step
	if json.Unmarshal(row, &probe) != nil || probe.Loss == nil || json.Unmarshal(row, &st) != nil ||
		st.Step != step || (st.Replica != nil && *st.Replica != 0) {
		return nil, false
	}
	st.ValLoss = nil
	return &st, true
}

// drainEnds, after a run stopped early, listens a little longer for its stages'
// last words (they report once the abort reaches them): where each checkpoint is,
// and what it sent. It returns once every cell has said where its checkpoint is, or
// after wait.
func drainEnds(res *LaunchResult, plan *Plan, reports <-chan Report, wait time.Duration) {
	told := func() bool {
		for _, row := range res.Checkpoints {
			for _, c := range row {
				if c == "" {
					return false
				}
			}
		}
		return true
	}
	deadline := time.After(wait)
	for !told() {
		select {
		case <-deadline:
			return
		case r := <-reports:
			if a, ok := plan.cell(r.Stage, r.Replica); ok && a.Peer == r.Peer &&
				(r.Kind == ReportDone || r.Kind == ReportIdle || r.Kind == ReportError) {
				res.stageEnded(r)
			}
		}
	}
}

// add counts another part's share of the run (see LaunchResult.StepsRun) into res.
func (res *LaunchResult) add(part *LaunchResult) {
	res.StepsRun += part.StepsRun
	res.TokensRun += part.TokensRun
	res.TimeRun += part.TimeRun
	for i := range min(len(res.BoundaryFwd), len(part.BoundaryFwd)) {
		res.BoundaryFwd[i] += part.BoundaryFwd[i]
		res.BoundaryBwd[i] += part.BoundaryBwd[i]
		res.BoundaryFwdSteps[i] += part.BoundaryFwdSteps[i]
		res.BoundaryBwdSteps[i] += part.BoundaryBwdSteps[i]
	}
	res.OuterSteps += part.OuterSteps
	for r := range min(len(res.SyncBytes), len(part.SyncBytes)) {
		for s := range min(len(res.SyncBytes[r]), len(part.SyncBytes[r])) {
			res.SyncBytes[r][s] += part.SyncBytes[r][s]
		}
	}
}

// Gone lists the replica pipelines still broken when the run ended: broken more
// often than they rejoined.
func (r *LaunchResult) Gone() []int {
	n := map[int]int{}
	for _, b := range r.Broken {
		n[b]++
	}
	for _, j := range r.Rejoined {
		n[j]--
	}
	var out []int
	for _, b := range slices.Sorted(maps.Keys(n)) {
		if n[b] > 0 {
			out = append(out, b)
		}
	}
	return out
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
	srv := corpus.NewServer(log.With("sys", "corpus"))
	srv.Penalise = func(p peer.ID, err error) { // err wraps p2p.ErrViolation
		score, banned := h.Penalties().Add(p, err.Error())
		log.Warn("protocol violation", "peer", p, "err", err, "score", fmt.Sprintf("%.1f", score), "banned", banned)
	}
	if sp.Data.Prepared() || !sp.Data.ByteLevel() {
		serve := servePrepared
		if !sp.Data.Prepared() {
			serve = serveTokenized
		}
		dp, err := serve(sp, srv, log)
		if err != nil {
			return nil, err
		}
		h.Handle(corpus.Proto, srv.HandleStream)
		return dp, nil
	}
	text, name, err := train.CorpusField(sp.Data.Path, sp.Data.TextField)
	if err != nil {
		return nil, err
	}
	tr, val := data.Split(text, sp.Data.ValFraction)
	if sp.Data.ValPath != "" {
		tr = text
		if val, err = data.LoadField(sp.Data.ValPath, sp.Data.TextField); err != nil {
			return nil, fmt.Errorf("data.val_path: %w", err)
		}
	}
	if data.ValWindows(val, sp.Model.SeqLen) == 0 {
		return nil, fmt.Errorf("launch: validation split of %d bytes holds no window of seq_len+1 = %d bytes; use more text or a larger data.val_fraction (or data.val_path)",
			len(val), sp.Model.SeqLen+1)
	}
	dp := &DataPlan{Val: srv.Add(val)}
	for r := range sp.Pipeline.Replicas {
		dp.Train = append(dp.Train, srv.Add(data.Shard(tr, r, sp.Pipeline.Replicas)))
	}
	h.Handle(corpus.Proto, srv.HandleStream)
	log.Info("serving data", "corpus", name, "bytes", len(text), "train_shards", len(dp.Train), "val_bytes", len(val))
	return dp, nil
}

// serveTokenized tokenises the run's text with data.tokenizer, cuts it as train does
// (train.LoadDataset), and serves each replica's part and the validation part as one
// shard file each: the nodes read ids and need no tokenizer.
func serveTokenized(sp *spec.Spec, srv *corpus.Server, log *slog.Logger) (*DataPlan, error) {
	tk, err := train.LoadTokenizer(sp)
	if err != nil {
		return nil, err
	}
	ds, err := train.LoadDataset(sp, tk)
	if err != nil {
		return nil, err
	}
	if data.ValWindows(ds.Val, sp.Model.SeqLen) == 0 {
		return nil, fmt.Errorf("launch: validation split of %d tokens holds no window of seq_len+1 = %d tokens; use more text or a larger data.val_fraction (or data.val_path)",
			len(ds.Val), sp.Model.SeqLen+1)
	}
	add := func(ids []int32, what string) (corpus.Blob, error) {
		b := data.EncodeShard(ids, sp.Model.Vocab)
		if len(b) > corpus.MaxBlobBytes {
			return corpus.Blob{}, fmt.Errorf("launch: the %s is %d bytes of token ids, more than the %d a blob may hold; prepare the text with 'pipeswarm data prepare' and name that directory as data.path",
				what, len(b), corpus.MaxBlobBytes)
		}
		return srv.Add(b), nil
	}
	dp := &DataPlan{Shards: make([][]corpus.Blob, len(ds.Replicas)), ValTokens: int64(len(ds.Val))}
	for r, ids := range ds.Replicas {
		b, err := add(ids, fmt.Sprintf("training part of replica %d", r))
		if err != nil {
			return nil, err
		}
		dp.Shards[r] = []corpus.Blob{b}
	}
	b, err := add(ds.Val, "validation part")
	if err != nil {
		return nil, err
	}
	dp.ValShards = []corpus.Blob{b}
	log.Info("serving tokenised data", "corpus", ds.Name, "tokenizer", sp.Data.Tokenizer, "train_tokens", ds.Tokens, "val_tokens", len(ds.Val))
	return dp, nil
}

// servePrepared serves a prepared dataset's shard files as they are on disk, each
// content-addressed by the sha256 its manifest gives: replica r gets shards r, r+R,
// r+2R, … (data.ReplicaShards), replica 0's first stage also every validation shard.
// The files are mapped, not read, so the launcher's memory holds no copy of the
// dataset: the kernel pages them in as they are served.
func servePrepared(sp *spec.Spec, srv *corpus.Server, log *slog.Logger) (*DataPlan, error) {
	R := sp.Pipeline.Replicas
	m, dir, err := data.ReadManifest(sp.Data.Path)
	if err != nil {
		return nil, fmt.Errorf("data.path: %w", err)
	}
	if len(m.Shards) < R {
		return nil, fmt.Errorf("data.path %s: %d shards for %d replica pipelines; each needs one at least: prepare it again with a smaller --shard-tokens", sp.Data.Path, len(m.Shards), R)
	}
	vm, vdir, err := data.ReadManifest(sp.Data.ValPath)
	if err != nil {
		return nil, fmt.Errorf("data.val_path: %w", err)
	}
	if vm.Tokens < int64(sp.Model.SeqLen+1) {
		return nil, fmt.Errorf("launch: data.val_path %s holds %d tokens, no window of seq_len+1 = %d tokens; prepare more validation text",
			sp.Data.ValPath, vm.Tokens, sp.Model.SeqLen+1)
	}
	add := func(m *data.Manifest, dir string, i int) (corpus.Blob, error) {
		b, err := m.MapShardFile(dir, i)
		if err != nil {
			return corpus.Blob{}, err
		}
		if len(b) > corpus.MaxBlobBytes {
			return corpus.Blob{}, fmt.Errorf("%s: %d bytes, more than the %d a blob may hold; prepare it again with a smaller --shard-tokens", m.Shards[i].File, len(b), corpus.MaxBlobBytes)
		}
		return srv.Add(b), nil
	}
	dp := &DataPlan{Shards: make([][]corpus.Blob, R), ValTokens: vm.Tokens}
	for r := range R {
		for _, i := range data.ReplicaShards(len(m.Shards), r, R) {
			b, err := add(m, dir, i)
			if err != nil {
				return nil, fmt.Errorf("data.path: %w", err)
			}
			dp.Shards[r] = append(dp.Shards[r], b)
		}
	}
	for i := range vm.Shards {
		b, err := add(vm, vdir, i)
		if err != nil {
			return nil, fmt.Errorf("data.val_path: %w", err)
		}
		dp.ValShards = append(dp.ValShards, b)
	}
	log.Info("serving prepared shards", "dataset", sp.Data.Path, "shards", len(m.Shards), "tokens", m.Tokens, "dtype", m.Dtype,
		"replicas", R, "rule", "shard i to replica i mod replicas", "val_shards", len(vm.Shards), "val_tokens", vm.Tokens)
	return dp, nil
}

// silenceClock measures the time between the reports a launcher gets, and says when
// silence has lasted far longer than that: 10 mean steps or 3 of the longest gap seen
// (which includes evaluations), plus 5 s; before two steps are measured, or while an
// evaluation is under way, at least the staffing timeout.
type silenceClock struct {
	staff          time.Duration
	last, lastStep time.Time
	sum, longest   time.Duration
	steps          int
	// With replicas, an outer step may wait for a replica that is gone: three times
	// the time between outer steps (the all-reduce's own rule), plus what syncs took.
	lastOuter         time.Time
	outerGap, syncMax time.Duration
}

// outer notes an outer step of stage 0 reported.
func (c *silenceClock) outer(now time.Time, sync time.Duration) {
	if !c.lastOuter.IsZero() {
		c.outerGap = max(c.outerGap, now.Sub(c.lastOuter))
	}
	c.lastOuter = now
	c.syncMax = max(c.syncMax, sync)
}

func (c *silenceClock) heard(now time.Time, step bool) {
	if step {
		if !c.lastStep.IsZero() {
			d := now.Sub(c.lastStep)
			c.sum += d
			c.longest = max(c.longest, d)
			c.steps++
		}
		c.lastStep = now
	}
	c.last = now
}

// overdue returns how long it has been silent, if that is past the deadline (also
// returned); 0 otherwise.
func (c *silenceClock) overdue(now time.Time, evaluating bool) (quiet, deadline time.Duration) {
	deadline = 2 * c.staff
	if c.steps >= 2 {
		deadline = max(10*c.sum/time.Duration(c.steps), 3*c.longest) + 5*time.Second + 3*c.outerGap + 4*c.syncMax
		if evaluating {
			deadline = max(deadline, c.staff)
		}
	}
	if q := now.Sub(c.last); q > deadline {
		return q, deadline
	}
	return 0, deadline
}

// stopWait bounds how long a pipeline whose node is stopping waits for all of its
// stages to stop after the same step before it is taken out regardless.
const stopWait = 15 * time.Second

// stageOrders is how watch tells a run's stages when to checkpoint and stop. Each
// returns at once; the calls go on on their own goroutines.
type stageOrders struct {
	// checkpoint orders every cell to checkpoint at step too; acked is sent step if
	// every cell took the order in time.
	checkpoint func(step int, acked chan<- int)
	// recorded tells every cell that every row up to step, a checkpoint step of every
	// stage, is recorded.
	recorded func(step int)
	// stopAt tells the cells of replica pipeline r to stop after step.
	stopAt func(r, step int, reason string)
}

// rejoiner is how watch brings a broken replica pipeline back: reach connects to its
// nodes, join gives them a signed rejoin plan and starts it (returning its nonce).
type rejoiner struct {
	reach func(r int) bool
	join  func(r, step int) (uint64, error)
	broke func(r int, broken bool) // the watch loop says which pipelines are broken
}
