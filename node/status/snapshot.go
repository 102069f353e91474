// Package status shows what a node is doing: a status page at / that updates itself,
// the same facts as JSON at /api/status, and Prometheus metrics at /metrics, all from
// a Snapshot that the daemon makes on request. The daemon owns the data; this package
// only reads the snapshots it is given. WarnRing keeps the node's recent warnings for
// them; Fetch and WriteText are `pipeswarm status`.
package status

import (
	"time"

	"github.com/pipeswarm/pipeswarm/node/build"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/traffic"
)

// Snapshot is a node as it is at one moment. Its JSON is the /api/status reply.
type Snapshot struct {
	Time         time.Time          `json:"time"`
	Peer         string             `json:"peer"`  // the node's peer ID
	Addrs        []string           `json:"addrs"` // where it listens, full multiaddrs
	Build        build.Info         `json:"build"`
	Started      time.Time          `json:"started"`
	Reachability p2p.Reachability   `json:"reachability"`
	Peers        []Peer             `json:"peers"`   // connected now
	Runs         []Run              `json:"runs"`    // held now, then recently ended; newest first in each
	Traffic      []traffic.Protocol `json:"traffic"` // frames and bytes per protocol since start
	Penalties    int                `json:"penalties"`
	Warnings     []Warning          `json:"warnings"`       // the most recent, oldest first
	WarningsSeen uint64             `json:"warnings_total"` // every warning since start

	// What the node accepts and offers: the launchers whose runs it trains, whether
	// it trains anyone's (open), its memory budget and how many stages it may hold,
	// how many run folders it keeps, and what it computes with.
	Trust        []string  `json:"trust"`
	Open         bool      `json:"open"`
	MemoryBudget string    `json:"memory_budget"`
	MaxStages    int       `json:"max_stages"`
	KeepRuns     int       `json:"keep_runs"` // 0: every one
	Compute      []Backend `json:"compute"`
	// CPUOnly: every backend of this build computes on the CPU; a GPU is not used.
	CPUOnly bool `json:"cpu_only"`
}

// Backend is a compute backend a node runs stages on.
type Backend struct {
	Name      string `json:"name"`      // cpu32, bf16
	Precision string `json:"precision"` // fp32, bf16
	Impl      string `json:"impl"`      // the implementation and instruction set in use
}

// Peer is a connected peer.
type Peer struct {
	ID    string `json:"id"`
	Addr  string `json:"addr"` // remote address of one connection
	Conns int    `json:"conns"`
	// Limited: every connection to it is limited (relayed through a third peer),
	// so it carries little data and may be cut any time.
	Limited   bool `json:"limited"`
	Penalties int  `json:"penalties,omitempty"`
}

// Run states.
const (
	RunAccepted = "accepted" // planned here, not started yet
	RunRunning  = "running"
	RunFinished = "finished"
	RunIdle     = "idle"    // its replica pipeline broke; state kept
	RunStopped  = "stopped" // ended early: Error says why
)

// Run is one stage of one run that the node holds or held.
type Run struct {
	Run      string    `json:"run"` // 16 hex digits
	Name     string    `json:"name"`
	Stage    int       `json:"stage"`
	Stages   int       `json:"stages"`
	Replica  int       `json:"replica"`
	Replicas int       `json:"replicas"`
	State    string    `json:"state"`
	Error    string    `json:"error,omitempty"`
	Started  time.Time `json:"started,omitzero"`
	Step     int       `json:"step"` // optimiser steps taken
	Steps    int       `json:"steps"`
	// Loss and LossCurve are known on the last stage, which computes the loss;
	// ValLoss after an evaluation there. Another stage shows the last stage's Loss
	// at LossStep as its heartbeat told it (LossFrom says so), without a curve.
	Loss       float64   `json:"loss,omitempty"`
	LossStep   int       `json:"loss_step,omitempty"`
	LossFrom   string    `json:"loss_from,omitempty"`
	ValLoss    float64   `json:"val_loss,omitempty"`
	LossCurve  []Point   `json:"loss_curve,omitempty"`
	TokensPerS float64   `json:"tokens_per_s"` // over the last few steps
	ComputeS   float64   `json:"compute_s"`    // seconds this stage spent computing
	BytesIn    int64     `json:"bytes_in"`     // tensor frames received for this run
	BytesOut   int64     `json:"bytes_out"`    // tensor frames sent for this run
	Updated    time.Time `json:"updated"`
}

// Point is a step's training loss.
type Point struct {
	Step int     `json:"step"`
	Loss float64 `json:"loss"`
}

// Curve keeps a run's loss curve within Max points: when full it drops every
// second point, so a long run keeps its whole shape at a coarser step; the first
// and the newest points always stay. The zero
// value is ready; Max 0 means DefaultCurvePoints.
type Curve struct {
	Max    int
	points []Point
	every  int // keep one step in every
}

// DefaultCurvePoints is how many points a Curve keeps unless told.
const DefaultCurvePoints = 512

// Add records a step's loss; steps must increase.
func (c *Curve) Add(step int, loss float64) {
	if c.every == 0 {
		c.every = 1
	}
	if c.Max == 0 {
		c.Max = DefaultCurvePoints
	}
	if step%c.every != 0 && len(c.points) > 0 {
		// Between kept steps: it replaces the last point only if that one is not on
		// the grid either (the newest step is always shown).
		if last := c.points[len(c.points)-1]; last.Step%c.every != 0 {
			c.points[len(c.points)-1] = Point{step, loss}
			return
		}
	}
	c.points = append(c.points, Point{step, loss})
	if len(c.points) > c.Max {
		c.every *= 2
		kept := c.points[:0]
		for i, p := range c.points {
			if p.Step%c.every == 0 || i == 0 || i == len(c.points)-1 {
				kept = append(kept, p)
			}
		}
		c.points = kept
	}
}

// Points is a copy of the curve.
func (c *Curve) Points() []Point { return append([]Point(nil), c.points...) }
