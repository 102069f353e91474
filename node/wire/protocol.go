// Package wire holds what the nodes and the launcher of a run say to each other, and
// the types both sides share: the signed run plan (Plan, DataPlan, JoinPlan,
// ResumePlan), control messages and their replies (Msg, Reply) with the call that
// carries them (Call, CallClock), stage reports (Report, OuterReport, StageTime),
// heartbeats, the checkpoints a node holds (Held), export requests, and how cells and
// divergence are named.
//
// Control messages are length-prefixed JSON on p2p.ProtoControl, one request and one
// reply per stream; gossipsub carries heartbeats and run announcements only.
package wire

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/corpus"
)

// Control message types on p2p.ProtoControl: one request and one reply per stream.
const (
	MsgOffer  = "offer"  // launcher → node: what can you hold?
	MsgAssign = "assign" // launcher → node: a signed run plan
	MsgStart  = "start"  // launcher → node: every stage is staffed; go
	MsgAbort  = "abort"  // launcher → node: drop the run
	MsgNorm   = "norm"   // stage → stage: gradient sum of squares for a step
	MsgReport = "report" // node → launcher: progress
	MsgIdle   = "idle"   // launcher → node: your replica pipeline is broken; stop and keep your state
	// launcher → node: a cell of another replica pipeline passed to a new node (one
	// that took the place of a node gone); the stage's all-reduce counts it in.
	MsgReplace = "replace"
	// launcher → node: checkpoint at step Step too (the time rule, turned into a step
	// every stage takes); refused if this stage has done that step already.
	MsgCheckpoint = "checkpoint"
	// launcher → node: every metrics row up to step Step, a checkpoint step, is
	// recorded; older checkpoints will not be resumed from.
	MsgRecorded = "recorded"
	// launcher → node: stop after step Step, keeping its checkpoint (Reason says why).
	MsgStopAt = "stop-at"
	// launcher → node: Cell, of another replica pipeline, is broken (Reason says why);
	// the stage's all-reduce goes on without it at once, the round in progress too.
	MsgDrop = "drop"
)

type Msg struct {
	Type   string             `json:"type"`
	Run    uint64             `json:"run,omitempty"`
	Signed *p2p.Signed        `json:"signed,omitempty"`
	Norm   *Norm              `json:"norm,omitempty"`
	Report *Report            `json:"report,omitempty"`
	Reason string             `json:"reason,omitempty"`
	Spec   string             `json:"spec,omitempty"` // an offer request for a resumed run: its spec
	Cell   *assign.Assignment `json:"cell,omitempty"` // MsgReplace: the cell and its new peer; MsgDrop: the cell dropped
	Step   int                `json:"step,omitempty"` // MsgCheckpoint, MsgRecorded, MsgStopAt
}

type Reply struct {
	OK    bool          `json:"ok"`
	Error string        `json:"error,omitempty"`
	Offer *assign.Offer `json:"offer,omitempty"`
	// Held answers an offer request that names a run (Run and Spec of the request): the
	// stage checkpoints of that run this node can resume from.
	Held []Held `json:"held,omitempty"`
}

type Norm struct {
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

	// Restarted: a resumed launch found no step to resume from and starts the run
	// again from its beginning (the launcher's own note; nodes see a fresh run).
	Restarted bool `json:"-"`
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

// ValidationTokens is the number of validation tokens.
func (d *DataPlan) ValidationTokens() int64 {
	if d.Prepared() {
		return d.ValTokens
	}
	return d.Val.Size
}

// Cell finds the assignment of stage s in replica pipeline r.
func (p *Plan) Cell(s, r int) (assign.Assignment, bool) {
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

func DecodePlan(b []byte) (*Plan, error) {
	var p Plan
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("run plan: %w", err)
	}
	return &p, nil
}

// Validate checks a plan's data section against the spec's replica count.
func (d *DataPlan) Validate(replicas int) error {
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

// ResumePlan tells the nodes of a resumed run where to continue from: the stage
// checkpoints each kept of run Run at step Step.
type ResumePlan struct {
	Run  uint64 `json:"run"`
	Step int    `json:"step"`
}

// Held is a stage checkpoint a node holds for a run, as it answers a resuming
// launcher's offer request.
type Held struct {
	Stage   int   `json:"stage"`
	Replica int   `json:"replica"`
	Steps   []int `json:"steps"` // the whole steps it can resume from, newest first
}

// HeartbeatInterval is how often a daemon announces itself on gossipsub (a variable
// so that tests need not wait as long).
var HeartbeatInterval = 5 * time.Second

// Heartbeat is what a node announces on p2p.TopicHeartbeats every
// HeartbeatInterval, as JSON: enough for any peer to draw the swarm. The field
// names are stable (docs/node.md lists them); new fields may be added.
type Heartbeat struct {
	Peer       string  `json:"peer"`
	Version    string  `json:"version"`      // module version, and the commit if known: build.Info.Short
	Reachable  string  `json:"reachable"`    // "public", "private" or "unknown"
	TokensPerS float64 `json:"tokens_per_s"` // summed over the stages held
	// Addrs are where the node can be dialled (with /p2p/ID): how a launcher that
	// hears an idle node can give it a cell whose node is gone.
	Addrs []string `json:"addrs"`
	// Runs are the stages held: each cell of a run this node trains, with its
	// progress. Empty when idle.
	Runs []HeartbeatRun `json:"runs"`
}

// HeartbeatRun is one stage a node holds.
type HeartbeatRun struct {
	Run        string  `json:"run"` // 16 hex digits
	Stage      int     `json:"stage"`
	Replica    int     `json:"replica"`
	State      string  `json:"state"` // accepted, running
	Step       int     `json:"step"`
	TokensPerS float64 `json:"tokens_per_s"`
	// Loss is the training loss of step LossStep, on the last stage only (which
	// computes it); the other stages of the run show it.
	Loss     float64 `json:"loss,omitempty"`
	LossStep int     `json:"loss_step,omitempty"`
}

// ErrDiverged is wrapped by the error of a stage whose own computation went
// non-finite (its loss, or values it was about to send), and by a launched run's
// error when a stage reported that: the run stops, and nobody is penalised.
var ErrDiverged = errors.New("diverged")

// CellName names a cell for people: "stage 1" in a run of one replica pipeline,
// "stage 1 of replica 2" otherwise.
func CellName(sp *spec.Spec, a assign.Assignment) string {
	if sp.Pipeline.Replicas > 1 {
		return fmt.Sprintf("stage %d of replica %d", a.Stage, a.Replica)
	}
	return fmt.Sprintf("stage %d", a.Stage)
}

// ErrExportRefused is wrapped by the error of an export a node or the spec refused.
var ErrExportRefused = errors.New("export refused")

// WeightsReq asks a node for its checkpoint of a cell of a run at a step.
type WeightsReq struct {
	Run     uint64 `json:"run"`
	Stage   int    `json:"stage"`
	Replica int    `json:"replica"`
	Step    int    `json:"step"`
}

// WeightsReply answers a WeightsReq; with OK, Bytes bytes of the checkpoint file follow.
type WeightsReply struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
	Bytes int64  `json:"bytes,omitempty"`
}

// MaxWeightsMsg bounds the request and the reply on p2p.ProtoWeights.
const MaxWeightsMsg = 4 << 10
