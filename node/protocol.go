package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/corpus"
	"github.com/pipeswarm/pipeswarm/p2p/traffic"
)

// Control message types on p2p.ProtoControl: one request and one reply per stream.
const (
	msgOffer  = "offer"  // launcher → node: what can you hold?
	msgAssign = "assign" // launcher → node: a signed run plan
	msgStart  = "start"  // launcher → node: every stage is staffed; go
	msgAbort  = "abort"  // launcher → node: drop the run
	msgNorm   = "norm"   // stage → stage: gradient sum of squares for a step
	msgReport = "report" // node → launcher: progress
	msgIdle   = "idle"   // launcher → node: your replica pipeline is broken; stop and keep your state
	// launcher → node: a cell of another replica pipeline passed to a new node (one
	// that took the place of a node gone); the stage's all-reduce counts it in.
	msgReplace = "replace"
	// launcher → node: checkpoint at step Step too (the time rule, turned into a step
	// every stage takes); refused if this stage has done that step already.
	msgCheckpoint = "checkpoint"
	// launcher → node: every metrics row up to step Step, a checkpoint step, is
	// recorded; older checkpoints will not be resumed from.
	msgRecorded = "recorded"
	// launcher → node: stop after step Step, keeping its checkpoint (Reason says why).
	msgStopAt = "stop-at"
	// launcher → node: Cell, of another replica pipeline, is broken (Reason says why);
	// the stage's all-reduce goes on without it at once, the round in progress too.
	msgDrop = "drop"
)

type ctlMsg struct {
	Type   string             `json:"type"`
	Run    uint64             `json:"run,omitempty"`
	Signed *p2p.Signed        `json:"signed,omitempty"`
	Norm   *normMsg           `json:"norm,omitempty"`
	Report *Report            `json:"report,omitempty"`
	Reason string             `json:"reason,omitempty"`
	Spec   string             `json:"spec,omitempty"` // an offer request for a resumed run: its spec
	Cell   *assign.Assignment `json:"cell,omitempty"` // msgReplace: the cell and its new peer; msgDrop: the cell dropped
	Step   int                `json:"step,omitempty"` // msgCheckpoint, msgRecorded, msgStopAt
}

type ctlReply struct {
	OK    bool          `json:"ok"`
	Error string        `json:"error,omitempty"`
	Offer *assign.Offer `json:"offer,omitempty"`
	// Held answers an offer request that names a run (Run and Spec of the request): the
	// stage checkpoints of that run this node can resume from.
	Held []Held `json:"held,omitempty"`
}

type normMsg struct {
	Step  int     `json:"step"`
	Stage int     `json:"stage"`
	SumSq float64 `json:"sumsq"`
}

// Plan is what a launcher signs: the run, and which peer holds which stage.
type Plan struct {
	ID            uint64              `json:"id"`
	Spec          string              `json:"spec"` // YAML, overrides applied
	Launcher      string              `json:"launcher"`
	LauncherAddrs []string            `json:"launcher_addrs"`
	Stages        []assign.Assignment `json:"stages"` // every cell of the grid: stage × replica
	Created       time.Time           `json:"created"`
	// Expires bounds when a node may accept the plan and how long it holds its slot for
	// a start that does not come: a replayed or delayed plan is refused, and a launcher
	// that dies between assign and start does not keep nodes busy.
	Expires time.Time `json:"expires"`
	Data    *DataPlan `json:"data"`
	// Resume, if set, continues an interrupted run: every stage loads its checkpoint of
	// that run at that step and trains on from the step after.
	Resume *ResumePlan `json:"resume,omitempty"`
	// Join, if set, brings one replica pipeline back into a running run: its cells take
	// their stage's global state from the live replicas as of the outer step after
	// Step and train on from the step after it.
	Join *JoinPlan `json:"join,omitempty"`

	// restarted: a resumed launch found no step to resume from and starts the run
	// again from its beginning (the launcher's own note; nodes see a fresh run).
	restarted bool
}

// JoinPlan is a rejoin of replica pipeline Replica at outer step Step. Nonce tells
// one rejoin of a run from another (a node refuses a plan it has taken already).
type JoinPlan struct {
	Replica int    `json:"replica"`
	Step    int    `json:"step"`
	Nonce   uint64 `json:"nonce"`
}

// MaxPlanLife is the longest a plan may stay valid; a node refuses one whose expiry is
// further away, so a signed plan cannot be replayed for long.
const MaxPlanLife = time.Hour

// DataPlan is the run's text as the launcher serves it over corpus.Proto: one shard
// of the training split per replica pipeline, and the validation split; or, for a
// prepared dataset, each replica's shard files (data.ReplicaShards: shard i to replica
// i mod replicas) and the validation shard files. Nodes fetch only what their stage
// reads, verify it by hash and cache it.
type DataPlan struct {
	Train []corpus.Blob `json:"train"` // [replica]; text
	Val   corpus.Blob   `json:"val"`   // text

	Shards    [][]corpus.Blob `json:"shards,omitempty"`     // [replica][k]; a prepared dataset's files
	ValShards []corpus.Blob   `json:"val_shards,omitempty"` // the prepared validation files
	ValTokens int64           `json:"val_tokens,omitempty"` // tokens in ValShards

	// TokenizerSHA256 binds the run to the exact tokenizer its ids come from (the
	// data.tokenizer file, or a prepared dataset's manifest's); empty for bytes. Nodes
	// read ids and need no tokenizer; stages record it in their checkpoints.
	TokenizerSHA256 string `json:"tokenizer_sha256,omitempty"`
}

// Prepared reports whether the plan serves a prepared dataset's shard files.
func (d *DataPlan) Prepared() bool { return len(d.Shards) > 0 }

// valTokens is the number of validation tokens.
func (d *DataPlan) valTokens() int64 {
	if d.Prepared() {
		return d.ValTokens
	}
	return d.Val.Size
}

// cell finds the assignment of stage s in replica pipeline r.
func (p *Plan) cell(s, r int) (assign.Assignment, bool) {
	for _, a := range p.Stages {
		if a.Stage == s && a.Replica == r {
			return a, true
		}
	}
	return assign.Assignment{}, false
}

// Report kinds.
const (
	ReportStep  = "step"  // last stage: a step's mean training loss
	ReportEval  = "eval"  // last stage: validation loss after a step
	ReportDone  = "done"  // any stage: finished, checkpoint written
	ReportError = "error" // any stage: the run failed here
	ReportOuter = "outer" // any stage of a replicated run: an outer step is done
	ReportIdle  = "idle"  // any stage: its replica pipeline is broken; it stopped and kept its state
	// ReportStopping: any stage whose node is stopping: it stops after step Step, and
	// the launcher stops the other stages of its pipeline after that step too.
	ReportStopping = "stopping"
)

// Report is a node's progress message to its launcher.
type Report struct {
	Run        uint64       `json:"run"`
	Join       uint64       `json:"join,omitempty"` // the nonce of the rejoin the stage was started by, 0 at first
	Stage      int          `json:"stage"`
	Replica    int          `json:"replica,omitempty"`
	Peer       string       `json:"peer"`
	Kind       string       `json:"kind"`
	Step       int          `json:"step,omitempty"`
	Loss       float64      `json:"loss,omitempty"`
	ValLoss    float64      `json:"val_loss,omitempty"`
	GradNorm   float64      `json:"grad_norm,omitempty"`
	LR         float64      `json:"lr,omitempty"`
	Checkpoint string       `json:"checkpoint,omitempty"`
	BytesFwd   int64        `json:"bytes_fwd,omitempty"` // training activation frames sent (encoded bytes)
	BytesBwd   int64        `json:"bytes_bwd,omitempty"` // training gradient frames sent (encoded bytes)
	Error      string       `json:"error,omitempty"`
	Outer      *OuterReport `json:"outer,omitempty"`
	Time       *StageTime   `json:"time,omitempty"`     // with ReportDone
	Diverged   bool         `json:"diverged,omitempty"` // with ReportError: this stage's own values went non-finite (Error says where); no replica can go on
	// CheckpointFailed, with ReportError: the stage could not write its checkpoint
	// (Error says why: a full disk, an I/O error); the run stops rather than waits.
	CheckpointFailed bool `json:"checkpoint_failed,omitempty"`
}

// StageTime is where one stage's wall time went: seconds computing and waiting
// for each thing (keys are core.Wait names), and its timeline over TimelineSteps.
type StageTime struct {
	Stage   int     `json:"stage"`
	Replica int     `json:"replica"`
	WallS   float64 `json:"wall_s"`
	// Start is when the ledger's time 0 was, in Unix nanoseconds: the spans of stages
	// on one machine line up by it.
	Start   int64              `json:"start_unix_ns,omitempty"`
	Seconds map[string]float64 `json:"seconds"`
	Spans   []core.Span        `json:"spans,omitempty"`
}

// NewStageTime summarises a stage's ledger (Stage and Replica are left to the caller).
func NewStageTime(l *core.Ledger) *StageTime {
	t := &StageTime{Seconds: map[string]float64{}, Spans: l.Spans}
	for w := core.Computing; w < core.Stopped; w++ {
		t.Seconds[w.String()] = l.Total[w].Seconds()
		t.WallS += l.Total[w].Seconds()
	}
	return t
}

// Utilisation is the fraction of the wall time spent computing.
func (t *StageTime) Utilisation() float64 {
	if t.WallS <= 0 {
		return 0
	}
	return t.Seconds[core.Computing.String()] / t.WallS
}

// TimelineSteps is the window of steps whose timeline stages keep: a few steps after
// the first (which pays for dials and warm caches).
func TimelineSteps(steps int) (lo, hi int) {
	return min(2, steps), min(4, steps)
}

// OuterReport is what a replica of a stage says after an outer step.
type OuterReport struct {
	OuterStep    int     `json:"outer_step"`
	SyncBytes    int64   `json:"sync_bytes"` // sent, both phases
	SyncS        float64 `json:"sync_s"`
	Hash         string  `json:"weights_hash"`
	Contributors int     `json:"contributors"`
	Missing      []int   `json:"missing,omitempty"` // replicas not heard from
	Fetched      bool    `json:"fetched,omitempty"` // fell behind and fetched the global state instead
}

// callClock gives control calls deadlines from what it has measured: for each
// message type, the time calls of it took to be answered (4 times their mean or
// twice the slowest, whichever is longer), plus 8 round trips to the peer and
// callMargin. Until a type has been answered once, a call may take first (the run's
// staffing timeout: as long as a node may take to join at all).
type callClock struct {
	first time.Duration
	mu    sync.Mutex
	seen  map[string]*callTimes
}

// callMargin covers what a measured call time does not: a busy machine (a node's
// compute saturates its cores) can hold a reply back for seconds.
const callMargin = 5 * time.Second

// wireWindow is how long the end that answers a control call gives each of its two
// halves on the wire, reading the message and writing the reply: a control message
// is small, so round trips to the peer and the margin.
func wireWindow(h *p2p.Host, p peer.ID) time.Duration {
	return callMargin + 8*h.Peerstore().LatencyEWMA(p)
}

type callTimes struct {
	n         int
	sum, slow time.Duration
}

func newCallClock(first time.Duration) *callClock {
	return &callClock{first: first, seen: map[string]*callTimes{}}
}

// deadline is how long a call of typ to a peer rtt away may take.
func (c *callClock) deadline(typ string, rtt time.Duration) time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := c.seen[typ]
	if t == nil {
		return c.first
	}
	return max(4*t.sum/time.Duration(t.n), 2*t.slow) + 8*rtt + callMargin
}

// took records a call of typ answered after d.
func (c *callClock) took(typ string, d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := c.seen[typ]
	if t == nil {
		t = &callTimes{}
		c.seen[typ] = t
	}
	t.n++
	t.sum += d
	t.slow = max(t.slow, d)
}

// call sends one control message to id and waits for the reply, within the deadline
// clock gives (and ctx's, if sooner), counting both on meter (which may be nil).
func call(ctx context.Context, h *p2p.Host, clock *callClock, meter *traffic.Meter, id peer.ID, m ctlMsg) (*ctlReply, error) {
	began := time.Now()
	ctx, cancel := context.WithTimeout(ctx, clock.deadline(m.Type, h.Peerstore().LatencyEWMA(id)))
	defer cancel()
	s, err := h.NewStream(p2p.AllowRelayed(ctx, "control"), id, p2p.ProtoControl)
	if err != nil {
		return nil, fmt.Errorf("%s to %s: %w", m.Type, id, err)
	}
	defer s.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = s.SetDeadline(dl)
	}
	cw := &traffic.CountingWriter{W: s}
	if err := p2p.WriteMsg(cw, m); err != nil {
		s.Reset()
		return nil, fmt.Errorf("%s to %s: %w", m.Type, id, err)
	}
	meter.Out(cw.N)
	var r ctlReply
	cr := &traffic.CountingReader{R: s}
	if err := p2p.ReadMsg(cr, &r, p2p.MaxMsgBytes); err != nil {
		s.Reset()
		return nil, fmt.Errorf("%s to %s: no reply: %w", m.Type, id, err)
	}
	meter.In(cr.N)
	clock.took(m.Type, time.Since(began))
	return &r, nil
}

func decodePlan(b []byte) (*Plan, error) {
	var p Plan
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("run plan: %w", err)
	}
	return &p, nil
}

// validate checks a plan's data section against the spec's replica count.
func (d *DataPlan) validate(replicas int) error {
	if d == nil {
		return errors.New("plan names no data (a launcher from before data was served over libp2p?)")
	}
	if d.Prepared() {
		if len(d.Shards) != replicas || len(d.Train) != 0 {
			return fmt.Errorf("plan data has shard lists for %d replicas, want %d (and no text)", len(d.Shards), replicas)
		}
		for r, bs := range d.Shards {
			if len(bs) == 0 {
				return fmt.Errorf("plan data: replica %d has no shards", r)
			}
			for k, b := range bs {
				if err := b.Validate(); err != nil {
					return fmt.Errorf("plan data: replica %d's shard %d: %w", r, k, err)
				}
			}
		}
		if len(d.ValShards) == 0 || d.ValTokens < 1 {
			return errors.New("plan data: no validation shards")
		}
		for k, b := range d.ValShards {
			if err := b.Validate(); err != nil {
				return fmt.Errorf("plan data: validation shard %d: %w", k, err)
			}
		}
		return nil
	}
	if len(d.Train) != replicas {
		return fmt.Errorf("plan data has %d training shards for %d replicas", len(d.Train), replicas)
	}
	for r, b := range d.Train {
		if err := b.Validate(); err != nil {
			return fmt.Errorf("plan data: training shard %d: %w", r, err)
		}
	}
	if err := d.Val.Validate(); err != nil {
		return fmt.Errorf("plan data: validation split: %w", err)
	}
	return nil
}
