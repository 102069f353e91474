package wan

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/config"
	"github.com/pipeswarm/pipeswarm/node/daemon"
	"github.com/pipeswarm/pipeswarm/node/launcher"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/probe"
	"github.com/pipeswarm/pipeswarm/p2p/simlink"
	"github.com/pipeswarm/pipeswarm/shard/compute"
)

// runSim runs the swarm in this process: one real daemon per cell and the launcher,
// every libp2p host on QUIC over a simulated network with the profile's links.
func runSim(ctx context.Context, o Options) (*outcome, error) {
	sp := o.Spec
	S, R := sp.Pipeline.Stages, sp.Pipeline.Replicas
	grid := cells(S, R)
	compute.SetWorkers(o.Threads)
	defer compute.SetWorkers(0)

	logf, err := os.Create(filepath.Join(o.OutDir, "nodes.log"))
	if err != nil {
		return nil, fmt.Errorf("wan: %w", err)
	}
	defer logf.Close()
	nlog := slog.New(slog.NewTextHandler(logf, &slog.HandlerOptions{Level: slog.LevelInfo}))
	dirs, err := os.MkdirTemp("", "pipeswarm-sim-")
	if err != nil {
		return nil, fmt.Errorf("wan: %w", err)
	}
	defer os.RemoveAll(dirs)

	simnet := simlink.New(1)
	defer simnet.Close()
	lkey, err := p2p.GenerateKey()
	if err != nil {
		return nil, err
	}
	lid, err := peer.IDFromPrivateKey(lkey)
	if err != nil {
		return nil, err
	}

	// Each daemon's Run closes it when ctx ends: cancel, then wait for them.
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	daemons := make([]*daemon.Daemon, len(grid))
	listens := make([]string, len(grid))
	trs := make([][]libp2p.Option, len(grid))
	var started []simNode // every daemon started, restarted ones too: each has its own penalty record
	startDaemon := func(i int) error {
		cell := Cell(grid[i][0], grid[i][1])
		// A restarted node comes back on its own link and address, as a process
		// restarted on the same port would: peers' QUIC connections to the one that
		// was killed are reset when they next send to it.
		tr, listen := trs[i], []string{listens[i]}
		if tr == nil {
			l := o.Profile.Link(cell)
			var err error
			if tr, listen, err = simnet.Node(simlink.Link{Mbps: l.Mbps, Latency: l.Latency, Loss: l.Loss}); err != nil {
				return fmt.Errorf("wan: sim: node %s: %w", cell, err)
			}
		}
		cfg := &config.Config{DataDir: filepath.Join(dirs, cell), Listen: listen, Trust: []string{lid.String()}}
		cfg.EnsureDefaults()
		d, err := daemon.New(ctx, cfg, nlog.With("node", cell), func(h *p2p.HostOptions) {
			// Simulated links: no NAT to find out about or traverse.
			h.Transports, h.Reachability, h.HolePunch, h.PortMap, h.Relays = tr, false, false, false, nil
		})
		if err != nil {
			return fmt.Errorf("wan: sim: node %s: %w", cell, err)
		}
		daemons[i], listens[i], trs[i] = d, listen[0], tr
		started = append(started, simNode{cell: cell, d: d})
		probe.Register(d.Host().Host)
		wg.Go(func() {
			if err := d.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
				nlog.Error("node stopped", "node", cell, "err", err)
			}
		})
		return nil
	}
	var addrs []string
	for i := range grid {
		if err := startDaemon(i); err != nil {
			return nil, err
		}
		addrs = append(addrs, daemons[i].Addrs()[0])
	}
	o.OnNote(fmt.Sprintf("sim: %d nodes up (%d stage(s) × %d replica(s)), %d compute thread(s) each", len(grid), S, R, o.Threads))

	links, err := measureSim(ctx, o, grid, daemons, addrs)
	if err != nil {
		return nil, err
	}

	ll := o.Profile.Link("launcher")
	ltr, llisten, err := simnet.Node(simlink.Link{Mbps: ll.Mbps, Latency: ll.Latency, Loss: ll.Loss})
	if err != nil {
		return nil, fmt.Errorf("wan: sim: launcher: %w", err)
	}
	var notes []string
	// Churn: a killed node's endpoints are cut first, so its host can say no goodbye
	// (peers find out by their deadlines, as from a SIGKILLed process over UDP), then
	// it is closed and its memory dropped; a restarted one comes back on its data
	// directory, at the same address.
	var churnMu sync.Mutex
	restart := func(i int, c Churn) {
		churnMu.Lock()
		defer churnMu.Unlock()
		if err := startDaemon(i); err != nil {
			o.OnNote(fmt.Sprintf("churn %s: %v", c, err))
		}
	}
	churn := &churner{events: o.Churn, do: func(c Churn) {
		for i, g := range grid {
			if Cell(g[0], g[1]) != c.Cell {
				continue
			}
			o.OnNote(fmt.Sprintf("churn: %s %s at step %d", c.Action, c.Cell, c.Step))
			if c.Action != "kill" {
				restart(i, c)
				return
			}
			churnMu.Lock()
			d := daemons[i]
			_ = simnet.Cut(listens[i])
			churnMu.Unlock()
			wg.Go(func() {
				d.Close()
				if c.Down > 0 {
					select {
					case <-time.After(c.Down):
					case <-ctx.Done():
						return
					}
					o.OnNote(fmt.Sprintf("churn: restart %s, %s after its kill", c.Cell, c.Down))
					restart(i, c)
				}
			})
			return
		}
		o.OnNote(fmt.Sprintf("churn %s: no such cell in this run", c))
	}}
	swarmDir := filepath.Join(o.OutDir, "swarm")
	res, err := launcher.Launch(ctx, launcher.Options{Spec: sp, Key: lkey, Peers: addrs, Listen: llisten, Transports: ltr,
		OutDir: swarmDir, Log: o.Log.With("sys", "launch"),
		OnPlan: func(plan []assign.Assignment) {
			for _, a := range plan {
				for i, d := range daemons {
					if d.ID().String() == a.Peer && grid[i] != [2]int{a.Stage, a.Replica} {
						notes = append(notes, fmt.Sprintf("node with the link of %s was given %s", Cell(grid[i][0], grid[i][1]), Cell(a.Stage, a.Replica)))
					}
				}
			}
		},
		OnStep: func(s metrics.Step) {
			o.OnStep("swarm", s)
			churn.step(s.Step)
		}})
	if err != nil {
		return nil, fmt.Errorf("wan: sim: %w (node logs: %s)", err, logf.Name())
	}
	out, err := launched(sp, swarmDir, res, links, notes, churn.fired())
	if err != nil {
		return nil, err
	}
	churnMu.Lock() // a restart may still be under way
	for _, n := range started {
		out.penalties = append(out.penalties, nodePenalties(n.cell, n.d.Host().Penalties().Stats()))
	}
	churnMu.Unlock()
	out.penalties = append(out.penalties, nodePenalties("launcher", res.Penalties))
	return out, nil
}

// simNode is a daemon of a sim run and the cell whose link it has.
type simNode struct {
	cell string
	d    *daemon.Daemon
}

// measureSim measures a chain of links between the nodes (node i−1 ↔ node i, and
// every node whose link is overridden against node 0), at most maxMeasured.
func measureSim(ctx context.Context, o Options, grid [][2]int, daemons []*daemon.Daemon, addrs []string) ([]LinkFigures, error) {
	var pairs [][2]int
	for i := 1; i < len(grid) && len(pairs) < maxMeasured; i++ {
		pairs = append(pairs, [2]int{i - 1, i})
	}
	for _, c := range o.Profile.Overridden() {
		for i, g := range grid {
			if Cell(g[0], g[1]) == c && i > 1 {
				pairs = append(pairs, [2]int{0, i})
			}
		}
	}
	var out []LinkFigures
	for _, p := range pairs {
		a, b := daemons[p[0]], daemons[p[1]]
		ca, cb := Cell(grid[p[0]][0], grid[p[0]][1]), Cell(grid[p[1]][0], grid[p[1]][1])
		if _, err := a.Host().Connect(ctx, addrs[p[1]]); err != nil {
			return nil, fmt.Errorf("wan: sim: measure %s ↔ %s: %w", ca, cb, err)
		}
		f, err := measureLink(o, ca, cb, func(n int64) (time.Duration, float64, float64, error) {
			r, err := probe.Measure(ctx, a.Host().Host, b.ID(), n)
			return r.RTT, r.UpMbps, r.DownMbps, err
		})
		if err != nil {
			return nil, err
		}
		out = append(out, f)
	}
	return out, nil
}
