// Package daemon is the node a GPU owner keeps running (`pipeswarm node`): it holds
// the data directory and the node's identity, answers launchers' offers, accepts
// signed run plans from trusted launchers and trains their stages (node/worker),
// routes control messages and tensor frames to them, serves its status page and
// heartbeats, gives an exportable run's weights to its launcher, prunes old run
// folders, and after a restart dials the launchers of the runs it held.
package daemon

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/multiformats/go-multiaddr"

	"github.com/pipeswarm/pipeswarm/node/build"
	"github.com/pipeswarm/pipeswarm/node/config"
	"github.com/pipeswarm/pipeswarm/node/datadir"
	"github.com/pipeswarm/pipeswarm/node/status"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/node/worker"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/clock"
	"github.com/pipeswarm/pipeswarm/p2p/corpus"
	"github.com/pipeswarm/pipeswarm/p2p/reduce"
	"github.com/pipeswarm/pipeswarm/p2p/traffic"
	"github.com/pipeswarm/pipeswarm/shard/backend"
)

// Errors a daemon gives its runs when it stops them.
var (
	ErrShutdown = errors.New("node shutting down")
	ErrAborted  = errors.New("run aborted by its launcher")
	// ErrNeverStarted releases an accepted run whose launcher did not start it before
	// its plan expired.
	ErrNeverStarted = errors.New("run never started")
)

// endedMemory is how long a daemon remembers a run that ended here, to drop its late
// frames without penalising their senders.
var endedMemory = 10 * time.Minute

// Daemon is a long-running node: it holds a data directory and a libp2p identity,
// answers launchers' offers, accepts signed runs from trusted launchers, and trains
// the stages it is given.
type Daemon struct {
	cfg   *config.Config
	log   *slog.Logger
	dir   *datadir.Dir
	host  *p2p.Host
	trust map[peer.ID]bool
	// reduce carries the all-reduces of every replicated stage held here; fetch brings
	// run text from launchers into the data directory's cache.
	reduce *reduce.Service
	fetch  *corpus.Fetcher
	// What the status page and metrics read: frames and bytes per protocol, recent
	// warnings, the HTTP server (nil without cfg.Status).
	meters  *traffic.Meters
	warns   *status.WarnRing
	status  *status.Server
	local   *status.Server // on the data directory's unix socket; nil if it could not be bound
	started time.Time
	build   build.Info
	compute []status.Backend // what this node's stages compute with

	// clock times what the daemon decides by time (plan expiries, the memory of ended
	// runs, heartbeats, waits) and its stages; clock.Real but in tests. Stream deadlines
	// and file times stay on the wall clock, which the network and the disk use.
	clock clock.Clock
	// The run table is owned by the loop goroutine (table.go): reqs carries requests
	// to it, quit ends it, stopped is closed once it has ended. view is what it
	// publishes for the stream gates and the frames path.
	reqs    chan envelope
	quit    chan struct{}
	stopped chan struct{}
	view    atomic.Pointer[view]
	// faultStallSync, if set, makes this node's stages hang in the all-reduce of the
	// outer step after that inner step (fault injection for tests; see SetFaultStallSync).
	faultStallSync atomic.Int64
	wg             sync.WaitGroup

	closeOnce sync.Once
	closeErr  error
}

// HostOption adjusts the daemon's libp2p host options before the host is built (the
// WAN bench runs daemons over simulated links this way).
type HostOption func(*p2p.HostOptions)

// keptRuns is how many ended runs the status page keeps showing.
const keptRuns = 8

// New locks the data directory, loads (or creates) the node's identity and
// starts listening, and serves its status page if cfg.Status says where. Close it,
// or Run it until its context ends.
func New(ctx context.Context, cfg *config.Config, log *slog.Logger, hostOpts ...HostOption) (*Daemon, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	// Every subsystem logs through log, so the ring sees the whole node's warnings.
	warns := status.NewWarnRing(status.DefaultWarnings)
	log = slog.New(warns.Handler(log.Handler()))
	trust := map[peer.ID]bool{}
	for _, t := range cfg.Trust {
		id, err := peer.Decode(t)
		if err != nil {
			return nil, fmt.Errorf("trust %q: %w", t, err)
		}
		trust[id] = true
	}
	dir, err := datadir.Open(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	if n, err := dir.CleanTemp(); err == nil && n > 0 {
		log.Info("removed temp files left by a crash", "count", n)
	}
	key, created, err := p2p.LoadOrCreateKey(dir.KeyPath())
	if err != nil {
		dir.Close()
		return nil, err
	}
	if created {
		log.Info("created node identity", "path", dir.KeyPath())
	}
	ho := p2p.HostOptions{Key: key, Listen: cfg.Listen, MDNS: cfg.MDNS, Log: log.With("sys", "p2p"),
		Reachability: true, HolePunch: true, PortMap: cfg.PortMap, Announce: cfg.Announce, Relays: cfg.RelayCandidates()}
	if cfg.Relay {
		l := cfg.RelayLimits()
		ho.RelayService = &l
	}
	for _, f := range hostOpts {
		f(&ho)
	}
	// Told nowhere in particular, a node listens where it did the first time: the
	// address others were given (and a port forwarded) stays right across restarts.
	kept := []string(nil)
	ho.PortsKept = cfg.ListenIsDefault()
	if cfg.ListenIsDefault() {
		if kept = dir.ReadListen(); len(kept) > 0 {
			ho.Listen = kept
		}
	}
	h, err := p2p.NewHost(ctx, ho)
	if err != nil && len(kept) > 0 {
		log.Warn("cannot listen on the ports kept from earlier starts (another program holds them?); listening on new ones",
			"kept", strings.Join(kept, " "), "file", dir.ListenPath(), "err", err)
		ho.Listen = cfg.Listen
		h, err = p2p.NewHost(ctx, ho)
	}
	if err != nil {
		dir.Close()
		return nil, err
	}
	if cfg.ListenIsDefault() {
		var bound []string
		for _, a := range h.Network().ListenAddresses() {
			if _, err := a.ValueForProtocol(multiaddr.P_IP4); err == nil {
				bound = append(bound, a.String()) // not the relay's /p2p-circuit
			} else if _, err := a.ValueForProtocol(multiaddr.P_IP6); err == nil {
				bound = append(bound, a.String())
			}
		}
		slices.Sort(bound)
		if len(bound) > 0 && !slices.Equal(bound, kept) {
			if err := dir.WriteListen(bound); err != nil {
				log.Warn("listen ports not kept for the next start", "err", err)
			}
		}
	}
	d := &Daemon{cfg: cfg, log: log, dir: dir, host: h, trust: trust, clock: clock.Real,
		reqs: make(chan envelope), quit: make(chan struct{}), stopped: make(chan struct{}), warns: warns, started: time.Now(), build: build.Read(), compute: computeBackends(cfg),
		meters: traffic.NewMeters(p2p.ProtoControl, p2p.ProtoActivation, p2p.ProtoGradient, reduce.Proto, corpus.Proto)}
	// Plans accepted before a restart stay refused until they expire.
	accepted, err := dir.ReadAccepted(d.clock.Now())
	if err != nil {
		h.Close()
		dir.Close()
		return nil, err
	}
	t := newTable()
	for _, a := range accepted {
		t.seen[[2]uint64{a.Run, a.Nonce}] = a.Expires
	}
	d.view.Store(t.view())
	go d.loop(t)
	penalise := func(p peer.ID, err error) {
		if !errors.Is(err, p2p.ErrViolation) {
			log.Debug("stream failed; no penalty", "peer", p, "err", err)
			return
		}
		score, banned := h.Penalties().Add(p, err.Error())
		log.Warn("protocol violation", "peer", p, "err", err, "score", fmt.Sprintf("%.1f", score), "banned", banned)
	}
	d.reduce = reduce.NewService(h.Host, log.With("sys", "reduce"), penalise, reduce.WithMeter(d.meters.For(reduce.Proto)),
		reduce.WithRuns(d.holdsRun))
	d.fetch = &corpus.Fetcher{Host: h.Host, CacheDir: filepath.Join(dir.Path, "corpus"), Log: log.With("sys", "corpus"), Penalise: penalise,
		Meter: d.meters.For(corpus.Proto)}
	for _, proto := range []protocol.ID{reduce.Proto, p2p.ProtoActivation, p2p.ProtoGradient} {
		h.Gate(proto, d.isMember)
	}
	h.Handle(reduce.Proto, d.reduce.HandleStream)
	h.Handle(p2p.ProtoControl, d.handleControl)
	h.Handle(p2p.ProtoActivation, d.handleFrames(p2p.ProtoActivation))
	h.Handle(p2p.ProtoGradient, d.handleFrames(p2p.ProtoGradient))
	h.Handle(p2p.ProtoWeights, d.handleWeights)
	if err := dir.WriteAddrs(h.Addrs()); err != nil {
		d.Close()
		return nil, err
	}
	if cfg.Open {
		log.Warn("open: this node accepts runs from ANY launcher: anyone who can reach it can make it train their run on this machine; " +
			"to accept only your launchers, drop --open (open: true) and name them with --trust ID (trust:)")
	}
	d.pruneRuns()
	// The local socket needs no port, so every node has one: `pipeswarm status
	// --data-dir DIR` reads it. One left by a killed node is replaced (the lock is ours).
	sock := dir.StatusSockPath()
	_ = os.Remove(sock)
	if d.local, err = status.Listen(status.Options{Unix: sock, Snapshot: d.Snapshot, Log: log.With("sys", "status")}); err != nil {
		log.Warn("no local status socket; 'pipeswarm status --data-dir' cannot reach this node (use --status ADDR)", "err", err)
		d.local = nil
	}
	if cfg.Status != "" {
		if d.status, err = status.Listen(status.Options{Addr: cfg.Status, Snapshot: d.Snapshot, Log: log.With("sys", "status")}); err != nil {
			d.Close()
			return nil, err
		}
		if err := dir.WriteStatusAddr(d.status.Addr()); err != nil {
			d.Close()
			return nil, err
		}
	}
	return d, nil
}

// StatusAddr is where the status page is served (host:port), or "" without one.
func (d *Daemon) StatusAddr() string {
	if d.status == nil {
		return ""
	}
	return d.status.Addr()
}

// Snapshot is the node as it is now, for the status page, /metrics and `pipeswarm
// status`. It is safe to call from any goroutine.
func (d *Daemon) Snapshot() status.Snapshot {
	s := status.Snapshot{Time: time.Now(), Peer: d.host.ID().String(), Addrs: d.host.Addrs(), Build: d.build, Started: d.started,
		Reachability: d.host.Reachability(), Traffic: d.meters.Snapshot(), Warnings: d.warns.Recent(), WarningsSeen: d.warns.Total()}
	pen := d.host.Penalties().Counts()
	for _, n := range pen {
		s.Penalties += n
	}
	nw := d.host.Network()
	for _, p := range nw.Peers() {
		conns := nw.ConnsToPeer(p)
		if len(conns) == 0 {
			continue
		}
		q := status.Peer{ID: p.String(), Addr: conns[0].RemoteMultiaddr().String(), Conns: len(conns), Limited: true, Penalties: pen[p]}
		for _, c := range conns {
			q.Limited = q.Limited && c.Stat().Limited
		}
		s.Peers = append(s.Peers, q)
	}
	slices.SortFunc(s.Peers, func(a, b status.Peer) int { return strings.Compare(a.ID, b.ID) })
	s.Trust, s.Open, s.MemoryBudget, s.MaxStages, s.KeepRuns = slices.Clone(d.cfg.Trust), d.cfg.Open, d.cfg.MemoryBudget, d.cfg.MaxStages, d.cfg.KeepRuns
	s.Compute, s.CPUOnly = d.compute, true // cpu32 and bf16, this build's backends, both run on the CPU
	var st statusOf
	d.ask(&st)
	ws, heard := st.runs, st.heard
	s.Runs = st.finished
	// The newest plan first, as the runs that ended are.
	slices.SortFunc(ws, func(a, b *worker.Worker) int {
		if c := b.Plan().Created.Compare(a.Plan().Created); c != 0 {
			return c
		}
		return cmp.Compare(a.Plan().ID, b.Plan().ID)
	})
	held := make([]status.Run, 0, len(ws))
	for _, w := range ws {
		held = append(held, withHeardLoss(w.StatusView(), heard))
	}
	s.Runs = append(held, s.Runs...)
	return s
}

// heardLoss is a training loss a run's last stage announced.
type heardLoss struct {
	stage, step int
	loss        float64
}

// withHeardLoss gives a stage that does not compute the loss the loss its run's last
// stage announced.
func withHeardLoss(r status.Run, heard map[uint64]heardLoss) status.Run {
	id, err := strconv.ParseUint(r.Run, 16, 64)
	h, ok := heard[id]
	if err != nil || !ok || r.Stage == r.Stages-1 {
		return r
	}
	r.Loss, r.LossStep, r.LossFrom = h.loss, h.step, fmt.Sprintf("from the heartbeat of stage %d", h.stage)
	return r
}

// noteHeartbeat takes the loss a heartbeat from peer from announces for a run held
// here, if from holds the last stage of this node's replica pipeline in it.
func (d *Daemon) noteHeartbeat(from peer.ID, hb wire.Heartbeat) {
	for _, r := range hb.Runs {
		if r.LossStep <= 0 {
			continue
		}
		id, err := strconv.ParseUint(r.Run, 16, 64)
		if err != nil {
			continue
		}
		w := d.run(id)
		if w == nil || r.Stage != w.Spec().Pipeline.Stages-1 || !w.PeerHolds(from, r.Stage) {
			continue
		}
		d.ask(&lossHeard{run: id, loss: heardLoss{stage: r.Stage, step: r.LossStep, loss: r.Loss}})
	}
}

// computeBackends are the backends cfg lets this node run stages on, as this build
// and CPU provide them.
func computeBackends(cfg *config.Config) []status.Backend {
	names := cfg.Backends
	if len(names) == 0 {
		names = backend.Available()
	}
	var out []status.Backend
	for _, name := range names {
		if b, err := backend.Open(name); err == nil {
			out = append(out, status.Backend{Name: name, Precision: b.Precision(), Impl: b.Describe()})
		}
	}
	return out
}

// Compute is what this node's stages compute with.
func (d *Daemon) Compute() []status.Backend { return d.compute }

// SetFaultStallSync makes the stages this node holds from now on hang in the middle
// of the all-reduce of the outer step after inner step step, as a process that stops
// responding would: they send their contributions, then never publish the chunks
// they own. Fault injection for testing how the other replicas cope; 0 turns it off.
func (d *Daemon) SetFaultStallSync(step int) {
	d.faultStallSync.Store(int64(step))
}

// ID is the node's peer ID.
func (d *Daemon) ID() peer.ID { return d.host.ID() }

// Host is the node's libp2p host (the WAN bench measures links through it).
func (d *Daemon) Host() *p2p.Host { return d.host }

// Addrs are the node's full multiaddrs.
func (d *Daemon) Addrs() []string { return d.host.Addrs() }

// ReachabilityDeadline is how long a node waits for its reachability to be known
// before it says it is unknown, and why.
const ReachabilityDeadline = 30 * time.Second

// ReachabilityNotices calls say with the node's reachability when it is first
// known (at once for a node with private addresses only), after
// ReachabilityDeadline if it is still unknown then, and whenever it changes to
// another known state, until ctx ends.
func (d *Daemon) ReachabilityNotices(ctx context.Context, say func(p2p.Reachability)) {
	changes := d.host.WatchReachability(ctx)
	deadline := d.clock.NewTimer(ReachabilityDeadline)
	defer deadline.Stop()
	var n notices
	for {
		var tell bool
		select {
		case r, ok := <-changes:
			if !ok {
				return
			}
			tell = n.changed(r)
		case <-deadline.C():
			tell = n.deadline()
		case <-ctx.Done():
			return
		}
		if tell {
			say(n.said)
		}
	}
}

// notices decides which reachability values an operator is told: the first
// known one, an unknown one once the deadline has passed with nothing told,
// and every later change that is known.
type notices struct {
	cur, said p2p.Reachability
	told      bool
}

// changed takes a new value and reports whether to tell it (it is then said).
func (n *notices) changed(r p2p.Reachability) bool {
	n.cur = r
	if r.State == p2p.ReachUnknown || (n.told && n.said.Equal(r)) {
		return false
	}
	n.said, n.told = r, true
	return true
}

// deadline reports whether to tell the current value because nothing has
// been told by the deadline.
func (n *notices) deadline() bool {
	if n.told || n.cur.State == "" {
		return false
	}
	n.said, n.told = n.cur, true
	return true
}

// Run dials the bootstrap peers, announces heartbeats, and serves until ctx ends;
// then it stops every run (each writes its checkpoint) and closes.
func (d *Daemon) Run(ctx context.Context) error {
	for _, a := range d.cfg.Bootstrap {
		if _, err := d.host.Connect(ctx, a); err != nil {
			d.log.Warn("bootstrap peer unreachable", "addr", a, "err", err)
		}
	}
	go d.redialLaunchers(ctx)
	hb, err := d.host.PubSub.Join(p2p.TopicHeartbeats)
	if err != nil {
		d.log.Warn("no heartbeat topic", "err", err)
	} else if sub, err := hb.Subscribe(); err == nil {
		// Subscribed, a node relays the others' heartbeats in the gossip mesh, so that
		// they reach peers it is connected to and they are not (a launcher, a monitor).
		go func() {
			defer sub.Cancel()
			for {
				m, err := sub.Next(ctx)
				if err != nil {
					return
				}
				// The last stage's heartbeats carry its loss, which the others show.
				var hb wire.Heartbeat
				if m.GetFrom() != d.host.ID() && json.Unmarshal(m.Data, &hb) == nil {
					d.noteHeartbeat(m.GetFrom(), hb)
				}
			}
		}()
	}
	tick := d.clock.NewTicker(wire.HeartbeatInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			if hb != nil {
				hb.Close()
			}
			return d.Close()
		case <-tick.C():
			if hb != nil {
				if b, err := json.Marshal(d.Heartbeat()); err == nil {
					_ = hb.Publish(ctx, b)
				}
			}
		}
	}
}

// Heartbeat is the node's heartbeat as of now.
func (d *Daemon) Heartbeat() wire.Heartbeat {
	ws := slices.Collect(maps.Values(d.view.Load().runs))
	hb := wire.Heartbeat{Peer: d.host.ID().String(), Version: d.build.Short(), Reachable: d.host.Reachability().State, Runs: []wire.HeartbeatRun{}}
	hb.Addrs = d.host.Addrs()
	for _, w := range ws {
		v := w.StatusView()
		hr := wire.HeartbeatRun{Run: v.Run, Stage: v.Stage, Replica: v.Replica, State: v.State, Step: v.Step, TokensPerS: v.TokensPerS}
		if n := len(v.LossCurve); n > 0 && v.Stage == v.Stages-1 {
			hr.LossStep, hr.Loss = v.LossCurve[n-1].Step, v.LossCurve[n-1].Loss
		}
		hb.Runs = append(hb.Runs, hr)
		hb.TokensPerS += v.TokensPerS
	}
	slices.SortFunc(hb.Runs, func(a, b wire.HeartbeatRun) int { return strings.Compare(a.Run, b.Run) })
	return hb
}

// Close stops every run (each writes its checkpoint and tells its launcher), then
// closes the host and releases the data directory. It may be called more than once
// and from several goroutines; the first call does the work.
func (d *Daemon) Close() error {
	d.closeOnce.Do(func() { d.closeErr = d.close() })
	return d.closeErr
}

func (d *Daemon) close() error {
	var stop stopRuns
	d.ask(&stop)
	for _, w := range stop.runs {
		w.Stop(ErrShutdown)
		w.Start() // an accepted run never started still has to wind down
	}
	done := make(chan struct{})
	go func() { d.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-d.clock.After(10 * time.Second):
		d.log.Warn("runs did not stop in time")
	}
	// The runs' ends are in (or given up on): the table is done with.
	close(d.quit)
	<-d.stopped
	var statusErr error
	if d.status != nil {
		statusErr = errors.Join(d.status.Close(), d.dir.RemoveStatusAddr())
	}
	if d.local != nil {
		statusErr = errors.Join(statusErr, d.local.Close()) // removes the socket
	}
	return errors.Join(statusErr, d.reduce.Close(), d.host.Close(), d.dir.Close())
}

// writeAccepted keeps the plans accepted and not yet expired in the data directory.
// It runs on the loop.
func (d *Daemon) writeAccepted(t *table) error {
	now := d.clock.Now()
	var all []datadir.Accepted
	for k, exp := range t.seen {
		if exp.After(now) {
			all = append(all, datadir.Accepted{Run: k[0], Nonce: k[1], Expires: exp})
		}
	}
	slices.SortFunc(all, func(a, b datadir.Accepted) int { return a.Expires.Compare(b.Expires) })
	return d.dir.WriteAccepted(all)
}

// holdsRun reports whether run is held here or ended here a moment ago (its peers'
// late all-reduce frames are then dropped, not penalised).
func (d *Daemon) holdsRun(run uint64) bool {
	v := d.view.Load()
	return v.runs[run] != nil || d.endedIn(v, run)
}

func (d *Daemon) hasEnded(id uint64) bool { return d.endedIn(d.view.Load(), id) }

// endedIn reports whether run id ended here less than endedMemory ago, as of v.
func (d *Daemon) endedIn(v *view, id uint64) bool {
	t, ok := v.ended[id]
	return ok && d.clock.Since(t) < endedMemory
}

// run is the worker of run id held here, or nil.
func (d *Daemon) run(id uint64) *worker.Worker { return d.view.Load().runs[id] }
