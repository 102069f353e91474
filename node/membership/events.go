package membership

import (
	"log/slog"

	"github.com/pipeswarm/pipeswarm/node/metrics"
)

// Event is what a Run is told: a stage's report, a node lost, an answer to a probe, a
// newcomer heard, the result of an order, the passing of time. The set is closed.
type Event interface{ isEvent() }

// From says who sent a report: the cell it claims and the node the stream proved,
// with the nonce of the rejoin that started it (0 at first). A report whose node does
// not hold that cell, or from an earlier incarnation of a pipeline, is ignored.
type From struct {
	Stage, Replica int
	Peer           string
	Join           uint64
}

// StepTaken: the last stage of a pipeline took a training step.
type StepTaken struct {
	From
	Step               int
	Loss, LR, GradNorm float64
}

// Evaluated: replica pipeline 0's last stage has the validation loss after Step.
type Evaluated struct {
	From
	Step    int
	ValLoss float64
}

// OuterTaken: a stage of a replicated run finished the outer step after Step.
type OuterTaken struct {
	From
	Step, OuterStep int
	Hash            string // the stage's global weights after it
	SyncBytes       int64
	SyncS           float64
	Contributors    int
	// Fetched: the stage fell behind and took the others' global state instead; Hash
	// is of a later outer step than Step says.
	Fetched bool
	Missing []Missing // replicas the all-reduce did not hear from
}

// Missing is a replica the outer step went on without, and whether the node holding
// its cell of the reporting stage is still connected to the launcher.
type Missing struct {
	Replica int
	Up      bool
}

// StageDone: a stage finished the run and wrote its checkpoint.
type StageDone struct{ From }

// Stopping: a stage's node is stopping gracefully after Step.
type Stopping struct {
	From
	Step int
}

// StageStopped: a stage stopped without finishing: idle (its pipeline is broken) or
// failed with Error.
type StageStopped struct {
	From
	Failed bool // an error report, not an idle one
	Error  string
	// Diverged: the stage's own values went non-finite; no replica can go on.
	Diverged bool
	// CheckpointFailed: the stage could not write its checkpoint.
	CheckpointFailed bool
}

// PeerLost: the launcher has no connection left to Peer.
type PeerLost struct{ Peer string }

// Tick is the passing of time (about once a second).
type Tick struct{}

// NewcomersHeard replaces the nodes that might take a cell whose node is gone: the
// --peers, then the nodes heard holding nothing, in that order.
type NewcomersHeard struct{ Candidates []Candidate }

// Candidate is a node that might take a cell, with the addresses it is known at.
type Candidate struct {
	Peer  string
	Addrs []string
}

// OfferAnswered answers AskOffer: whether Peer answered in time, and with what room.
type OfferAnswered struct {
	Replica   int // the probe's pipeline
	Peer      string
	Answered  bool
	MaxStages int
	Memory    int64
}

// CheckpointTaken: every cell took the order to checkpoint at Step.
type CheckpointTaken struct{ Step int }

// JoinDone answers SignJoin: the rejoin plan's nonce, or why it failed.
type JoinDone struct {
	Replica int
	Nonce   uint64
	Err     error
}

// Interrupted: the launcher itself is stopping.
type Interrupted struct{}

func (StepTaken) isEvent()       {}
func (Evaluated) isEvent()       {}
func (OuterTaken) isEvent()      {}
func (StageDone) isEvent()       {}
func (Stopping) isEvent()        {}
func (StageStopped) isEvent()    {}
func (PeerLost) isEvent()        {}
func (Tick) isEvent()            {}
func (NewcomersHeard) isEvent()  {}
func (OfferAnswered) isEvent()   {}
func (CheckpointTaken) isEvent() {}
func (JoinDone) isEvent()        {}
func (Interrupted) isEvent()     {}

// Action is what a Run asks of the launcher. The set is closed.
type Action interface{ isAction() }

// Abort tells every node holding a cell that the run is over.
type Abort struct{ Reason string }

// Idle stops the nodes of broken replica pipeline Replica, keeping their state.
type Idle struct {
	Replica int
	Reason  string
	Peers   []string
}

// Drop tells the node of cell To (a cell of a pipeline still whole) to leave the cell
// Gone, its stage's replica in a broken pipeline, out of the all-reduce.
type Drop struct {
	To, Gone Cell
	Reason   string
}

// AskOffer asks Peer, at Addrs if it is not connected, whether it has a free slot for
// a cell of replica pipeline Replica; answered by OfferAnswered.
type AskOffer struct {
	Replica int
	Peer    string
	Addrs   []string
}

// SignJoin brings broken pipeline Replica back after outer step Step: the cells in
// Moves pass to their new nodes first (the other replicas told), then every cell of
// the pipeline gets a signed rejoin plan and starts. Answered by JoinDone.
type SignJoin struct {
	Replica, Step int
	Moves         []Move
}

// Move is one cell passing to another node: Cells[Index] goes from Was to Peer. If
// Peer was the idle survivor of another broken pipeline, its cell Cells[Left] passes
// to Was (a swap: no cell is ever empty); Left is -1 otherwise. Tell lists, for each
// cell that changed hands, the cells told of its new node.
type Move struct {
	Index     int
	Peer, Was string
	Left      int
	Tell      []Replace
}

// Replace tells the nodes of cells To that cell Index has a new node.
type Replace struct {
	Index int
	To    []int
}

// OrderCheckpoint orders every cell to checkpoint at Step too (the time rule);
// CheckpointTaken follows if every cell took it.
type OrderCheckpoint struct{ Step int }

// TellRecorded tells every cell that the rows through Step, a checkpoint step of
// every stage, are recorded: older checkpoints may go.
type TellRecorded struct{ Step int }

// StopAt tells the cells of replica pipeline Replica to stop after Step.
type StopAt struct {
	Replica, Step int
	Reason        string
}

// WriteStep records a step's row in metrics.jsonl.
type WriteStep struct{ Row metrics.Step }

// WriteOuter records an outer step's row in metrics.jsonl.
type WriteOuter struct{ Row metrics.Outer }

// OuterComplete: every live replica of a stage reported the outer step; Rows are theirs.
type OuterComplete struct{ Rows []metrics.Outer }

// KeepEnd notes in the run's result what the stage whose report is being handled
// said as it stopped: where its checkpoint is, what it sent, where its time went.
type KeepEnd struct{ Stage, Replica int }

// Log is a line for the launcher's log.
type Log struct {
	Level slog.Level
	Msg   string
	Args  []any
}

// Finish ends the run: Outcome says how, Why in words.
type Finish struct {
	Outcome Outcome
	Why     string
}

// Outcome is how a run ended.
type Outcome int

const (
	RunFinished    Outcome = iota // every stage of every pipeline still whole is done
	RunFailed                     // the run cannot go on
	RunDown                       // failed because a stage has no live node (it may be resumed)
	RunDiverged                   // a stage's values went non-finite
	RunInterrupted                // the launcher was stopped
)

func (Abort) isAction()           {}
func (Idle) isAction()            {}
func (Drop) isAction()            {}
func (AskOffer) isAction()        {}
func (SignJoin) isAction()        {}
func (OrderCheckpoint) isAction() {}
func (TellRecorded) isAction()    {}
func (StopAt) isAction()          {}
func (WriteStep) isAction()       {}
func (WriteOuter) isAction()      {}
func (OuterComplete) isAction()   {}
func (KeepEnd) isAction()         {}
func (Log) isAction()             {}
func (Finish) isAction()          {}
