package node

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/build"
	"github.com/pipeswarm/pipeswarm/node/config"
	"github.com/pipeswarm/pipeswarm/node/core"
	"github.com/pipeswarm/pipeswarm/node/datadir"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/status"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/corpus"
	"github.com/pipeswarm/pipeswarm/p2p/reduce"
	"github.com/pipeswarm/pipeswarm/p2p/traffic"
	"github.com/pipeswarm/pipeswarm/shard"
	"github.com/pipeswarm/pipeswarm/shard/backend"
)

// Errors a daemon gives its runs when it stops them.
var (
	ErrShutdown = errors.New("node shutting down")
	ErrAborted  = errors.New("run aborted by its launcher")
	// ErrIdle stops a stage whose replica pipeline is broken (a neighbour is gone): it
	// keeps its state and says so; the run goes on with the pipelines still whole.
	ErrIdle = errors.New("idle")
	// ErrNeverStarted releases an accepted run whose launcher did not start it before
	// its plan expired.
	ErrNeverStarted = errors.New("run never started")
	// ErrLauncherGone stops a run whose launcher cannot be reached any more.
	ErrLauncherGone = errors.New("launcher gone")
)

// endedMemory is how long a daemon remembers a run that ended here, to drop its late
// frames without penalising their senders.
var endedMemory = 10 * time.Minute

// HeartbeatInterval is how often a daemon announces itself on gossipsub (a variable
// so that tests need not wait as long).
var HeartbeatInterval = 5 * time.Second

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

	mu    sync.Mutex
	runs  map[uint64]*worker
	seen  map[[2]uint64]time.Time // plans (run, rejoin nonce) accepted and not yet expired, with their expiry; kept in the data directory too
	ended map[uint64]bool         // runs held here that have stopped: their late frames are dropped, not penalised
	// members are the peers of each run held here (its cells, as moved since, and its
	// launcher): they alone may open tensor and reduce streams to this node.
	members map[uint64]map[peer.ID]bool
	// tensorIn are the tensor streams being read, by sender: a sender that is no
	// longer a peer of any run here has its streams reset, not left open idle.
	tensorIn map[peer.ID]map[network.Stream]bool
	// reserved are the addresses of each run's peers let past the host's connection
	// limits (p2p.Host.Reserve), released when the run ends here.
	reserved map[uint64][]reservation
	// ctlOpen counts each peer's control streams being served now (ctlPerPeer at most).
	ctlOpen map[peer.ID]int
	ctlIP   map[string]int // strangers' control streams being served, by remote IP address
	// refusedAt is when an untrusted launcher's offer request was last logged.
	refusedAt time.Time
	finished  []status.Run // the last few runs that ended here, as they ended, oldest first
	// heard is the newest training loss each run's last stage announced in its
	// heartbeats, for the status of the other stages (which never see the loss).
	heard map[uint64]heardLoss
	// faultStallSync, if set, makes this node's stages hang in the all-reduce of the
	// outer step after that inner step (fault injection for tests; see SetFaultStallSync).
	faultStallSync int
	wg             sync.WaitGroup

	closeOnce sync.Once
	closeErr  error
}

// HostOption adjusts the daemon's libp2p host options before the host is built (the
// WAN bench runs daemons over simulated links this way).
type HostOption func(*p2p.HostOptions)

// keptRuns is how many ended runs the status page keeps showing.
const keptRuns = 8

// NewDaemon locks the data directory, loads (or creates) the node's identity and
// starts listening, and serves its status page if cfg.Status says where. Close it,
// or Run it until its context ends.
func NewDaemon(ctx context.Context, cfg *config.Config, log *slog.Logger, hostOpts ...HostOption) (*Daemon, error) {
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
	d := &Daemon{cfg: cfg, log: log, dir: dir, host: h, trust: trust, runs: map[uint64]*worker{}, seen: map[[2]uint64]time.Time{}, ended: map[uint64]bool{},
		members: map[uint64]map[peer.ID]bool{}, reserved: map[uint64][]reservation{}, tensorIn: map[peer.ID]map[network.Stream]bool{}, ctlOpen: map[peer.ID]int{}, ctlIP: map[string]int{},
		heard: map[uint64]heardLoss{}, warns: warns, started: time.Now(), build: build.Read(), compute: computeBackends(cfg),
		meters: traffic.NewMeters(p2p.ProtoControl, p2p.ProtoActivation, p2p.ProtoGradient, reduce.Proto, corpus.Proto)}
	// Plans accepted before a restart stay refused until they expire.
	accepted, err := dir.ReadAccepted(time.Now())
	if err != nil {
		h.Close()
		dir.Close()
		return nil, err
	}
	for _, a := range accepted {
		d.seen[[2]uint64{a.Run, a.Nonce}] = a.Expires
	}
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
	d.mu.Lock()
	ws := make([]*worker, 0, len(d.runs))
	for _, w := range d.runs {
		ws = append(ws, w)
	}
	for i := len(d.finished) - 1; i >= 0; i-- {
		s.Runs = append(s.Runs, d.finished[i])
	}
	heard := maps.Clone(d.heard)
	d.mu.Unlock()
	// The newest plan first, as the runs that ended are.
	slices.SortFunc(ws, func(a, b *worker) int {
		if c := b.plan.Created.Compare(a.plan.Created); c != 0 {
			return c
		}
		return cmp.Compare(a.plan.ID, b.plan.ID)
	})
	held := make([]status.Run, 0, len(ws))
	for _, w := range ws {
		held = append(held, withHeardLoss(w.statusView(), heard))
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
func (d *Daemon) noteHeartbeat(from peer.ID, hb Heartbeat) {
	for _, r := range hb.Runs {
		if r.LossStep <= 0 {
			continue
		}
		id, err := strconv.ParseUint(r.Run, 16, 64)
		if err != nil {
			continue
		}
		w := d.run(id)
		if w == nil || r.Stage != w.sp.Pipeline.Stages-1 || w.idx == r.Stage || w.peerOf(r.Stage) != from {
			continue
		}
		d.mu.Lock()
		if h, ok := d.heard[id]; !ok || r.LossStep > h.step {
			d.heard[id] = heardLoss{stage: r.Stage, step: r.LossStep, loss: r.Loss}
		}
		d.mu.Unlock()
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
	d.mu.Lock()
	defer d.mu.Unlock()
	d.faultStallSync = step
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
	deadline := time.NewTimer(ReachabilityDeadline)
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
		case <-deadline.C:
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
				var hb Heartbeat
				if m.GetFrom() != d.host.ID() && json.Unmarshal(m.Data, &hb) == nil {
					d.noteHeartbeat(m.GetFrom(), hb)
				}
			}
		}()
	}
	tick := time.NewTicker(HeartbeatInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			if hb != nil {
				hb.Close()
			}
			return d.Close()
		case <-tick.C:
			if hb != nil {
				if b, err := json.Marshal(d.Heartbeat()); err == nil {
					_ = hb.Publish(ctx, b)
				}
			}
		}
	}
}

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

// Heartbeat is the node's heartbeat as of now.
func (d *Daemon) Heartbeat() Heartbeat {
	d.mu.Lock()
	ws := make([]*worker, 0, len(d.runs))
	for _, w := range d.runs {
		ws = append(ws, w)
	}
	d.mu.Unlock()
	hb := Heartbeat{Peer: d.host.ID().String(), Version: d.build.Short(), Reachable: d.host.Reachability().State, Runs: []HeartbeatRun{}}
	hb.Addrs = d.host.Addrs()
	for _, w := range ws {
		v := w.statusView()
		hr := HeartbeatRun{Run: v.Run, Stage: v.Stage, Replica: v.Replica, State: v.State, Step: v.Step, TokensPerS: v.TokensPerS}
		if n := len(v.LossCurve); n > 0 && v.Stage == v.Stages-1 {
			hr.LossStep, hr.Loss = v.LossCurve[n-1].Step, v.LossCurve[n-1].Loss
		}
		hb.Runs = append(hb.Runs, hr)
		hb.TokensPerS += v.TokensPerS
	}
	slices.SortFunc(hb.Runs, func(a, b HeartbeatRun) int { return strings.Compare(a.Run, b.Run) })
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
	d.mu.Lock()
	ws := make([]*worker, 0, len(d.runs))
	for _, w := range d.runs {
		ws = append(ws, w)
	}
	d.mu.Unlock()
	for _, w := range ws {
		w.stop(ErrShutdown)
		w.startOnce.Do(w.start) // an accepted run never started still has to wind down
	}
	done := make(chan struct{})
	go func() { d.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		d.log.Warn("runs did not stop in time")
	}
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
// d.mu is held.
func (d *Daemon) writeAccepted() error {
	now := time.Now()
	var all []datadir.Accepted
	for k, exp := range d.seen {
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
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.runs[run] != nil || d.ended[run]
}

func (d *Daemon) hasEnded(id uint64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ended[id]
}

func (d *Daemon) run(id uint64) *worker {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.runs[id]
}

// Bounds on control streams: what one peer, and every peer that is neither a
// trusted launcher nor a peer of a run here, may hold open at once, and the
// largest message those others may send (a plan from a launcher this node does
// not list in trust is one of those).
// The strangers' streams are bounded per address too (identities are free, addresses
// are not) so that one attacker's do not crowd out an honest stranger's, and in all,
// so that what they may send (ctlStrangers × maxStrangerMsg) stays small.
const (
	ctlPerPeer     = 8
	ctlPerIP       = 16
	ctlStrangers   = 256
	maxStrangerMsg = 256 << 10
)

// ctlClass is what a control stream's sender is to this node.
type ctlClass int

const (
	ctlStranger ctlClass = iota // no run here, not trusted
	ctlMember                   // a peer of a run held here
	ctlLauncher                 // a trusted launcher, or the launcher of a run held here
)

// ctlAdmit counts a control stream from p at ip, and reports what p is and whether
// it may open one more now; release undoes it.
func (d *Daemon) ctlAdmit(p peer.ID, ip string) (ctlClass, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	class := ctlStranger
	if d.trust[p] {
		class = ctlLauncher
	}
	for run, m := range d.members {
		if m[p] && class == ctlStranger {
			class = ctlMember
		}
		if w := d.runs[run]; w != nil && w.launcher == p {
			class = ctlLauncher
		}
	}
	if d.ctlOpen[p] >= ctlPerPeer {
		return class, false
	}
	if class == ctlStranger {
		if d.ctlOpen[""] >= ctlStrangers || d.ctlIP[ip] >= ctlPerIP {
			return class, false
		}
		d.ctlOpen[""]++ // "" is no peer: the strangers' total
		d.ctlIP[ip]++
	}
	d.ctlOpen[p]++
	return class, true
}

func (d *Daemon) ctlRelease(p peer.ID, ip string, class ctlClass) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if class == ctlStranger {
		d.ctlOpen[""]--
		if d.ctlIP[ip]--; d.ctlIP[ip] <= 0 {
			delete(d.ctlIP, ip)
		}
	}
	if d.ctlOpen[p]--; d.ctlOpen[p] <= 0 {
		delete(d.ctlOpen, p)
	}
}

func (d *Daemon) handleControl(s network.Stream) {
	from := s.Conn().RemotePeer()
	ip := "" // a connection with no IP (a relayed one): its relay's limits hold
	if a, err := manet.ToIP(s.Conn().RemoteMultiaddr()); err == nil {
		ip = a.String()
	}
	class, ok := d.ctlAdmit(from, ip)
	if !ok {
		d.log.Debug("control stream refused: too many open", "peer", from)
		s.Reset()
		return
	}
	defer d.ctlRelease(from, ip, class)
	defer s.Close()
	_ = s.SetReadDeadline(time.Now().Add(wireWindow(d.host, from)))
	meter := d.meters.For(p2p.ProtoControl)
	limit := p2p.MaxMsgBytes
	if class != ctlLauncher {
		limit = maxStrangerMsg
	}
	var m ctlMsg
	cr := &traffic.CountingReader{R: s}
	if err := p2p.ReadMsg(cr, &m, limit); err != nil {
		if class == ctlStranger && !errors.Is(err, p2p.ErrViolation) && !errors.Is(err, io.EOF) {
			// Holding a stream open, or a buffer part-filled, is how a peer with no
			// business here ties the node up: from it, a message that never arrives
			// whole is a violation.
			err = fmt.Errorf("%w: message cut short or stalled after %d bytes: %w", p2p.ErrBadMsg, cr.N, err)
		}
		d.penalise(s, from, err)
		return
	}
	meter.In(cr.N)
	r := d.control(from, m) // the caller's deadline bounds this
	_ = s.SetWriteDeadline(time.Now().Add(wireWindow(d.host, from)))
	cw := &traffic.CountingWriter{W: s}
	if err := p2p.WriteMsg(cw, r); err != nil {
		d.log.Debug("control reply not sent", "peer", from, "err", err)
		return
	}
	meter.Out(cw.N)
}

func (d *Daemon) control(from peer.ID, m ctlMsg) ctlReply {
	switch m.Type {
	case msgOffer:
		if !d.cfg.Open && !d.trust[from] {
			// Only what a launcher needs to hear that this node will not take its run:
			// not its memory, addresses or free slots.
			d.mu.Lock()
			quiet := time.Since(d.refusedAt) < time.Minute
			if !quiet {
				d.refusedAt = time.Now()
			}
			d.mu.Unlock()
			if !quiet { // once a minute at most: strangers' offers cost no disk
				d.log.Warn("refusing an offer request from an untrusted key", "key", from)
			}
			return ctlReply{Error: fmt.Sprintf("refused: %s is a key this node does not trust (trust it with --trust %s, or set open: true)", from, from)}
		}
		d.mu.Lock()
		free := d.cfg.MaxStages - len(d.runs)
		d.mu.Unlock()
		r := ctlReply{OK: true, Offer: &assign.Offer{Peer: d.host.ID().String(), Addrs: d.host.Addrs(),
			MemoryBytes: d.cfg.MemoryBudgetBytes(), MaxStages: free, Precisions: d.cfg.Precisions(), NoExport: !d.cfg.ExportAllowed()}}
		if m.Run != 0 && m.Spec != "" {
			if sp, err := spec.Parse([]byte(m.Spec), "run spec"); err == nil {
				r.Held = heldIn(d.dir.RunDir(fmt.Sprintf("%016x", m.Run)), sp.String(), sp.Pipeline.Stages, sp.Pipeline.Replicas, d.log)
			}
		}
		return r
	case msgAssign:
		if err := d.accept(from, m.Signed); err != nil {
			if errors.Is(err, p2p.ErrViolation) { // unsigned, or a signature that does not hold
				d.offence(from, err)
			}
			return ctlReply{Error: err.Error()}
		}
		return ctlReply{OK: true}
	case msgStart, msgAbort, msgIdle, msgReplace, msgDrop, msgNorm, msgCheckpoint, msgRecorded, msgStopAt:
	default:
		err := fmt.Errorf("%w: unknown control message %q", p2p.ErrBadMsg, m.Type)
		d.offence(from, err)
		return ctlReply{Error: err.Error()}
	}
	w := d.run(m.Run)
	if w == nil {
		return ctlReply{Error: fmt.Sprintf("no run %016x here", m.Run)}
	}
	switch m.Type {
	case msgStart:
		if from != w.launcher {
			return ctlReply{Error: "only the run's launcher may start it"}
		}
		w.startOnce.Do(w.start)
		return ctlReply{OK: true}
	case msgAbort:
		if from != w.launcher {
			return ctlReply{Error: "only the run's launcher may abort it"}
		}
		w.cancel(fmt.Errorf("%w: %s", ErrAborted, m.Reason))
		w.startOnce.Do(w.start) // a worker never started still has to finish
		return ctlReply{OK: true}
	case msgIdle:
		if from != w.launcher {
			return ctlReply{Error: "only the run's launcher may idle its stages"}
		}
		w.cancel(fmt.Errorf("%w: %s", ErrIdle, m.Reason))
		w.startOnce.Do(w.start)
		return ctlReply{OK: true}
	case msgReplace:
		if from != w.launcher {
			return ctlReply{Error: "only the run's launcher may move a cell"}
		}
		if m.Cell != nil {
			if id, err := peer.Decode(m.Cell.Peer); err == nil {
				d.addAddrs(id, m.Cell.Addrs)
				d.addMember(m.Run, id, m.Cell.Addrs)
			}
		}
		if err := w.replace(m.Cell); err != nil {
			return ctlReply{Error: err.Error()}
		}
		return ctlReply{OK: true}
	case msgDrop:
		if from != w.launcher {
			return ctlReply{Error: "only the run's launcher may drop a replica pipeline"}
		}
		if err := w.drop(m.Cell, m.Reason); err != nil {
			return ctlReply{Error: err.Error()}
		}
		return ctlReply{OK: true}
	case msgCheckpoint, msgRecorded, msgStopAt:
		if from != w.launcher {
			return ctlReply{Error: "only the run's launcher may say when its stages checkpoint or stop"}
		}
		e := launcherOrder{kind: m.Type, step: m.Step, reason: m.Reason, reply: make(chan error, 1)}
		w.post(e)
		select {
		case err := <-e.reply:
			if err != nil {
				return ctlReply{Error: err.Error()}
			}
			return ctlReply{OK: true}
		case <-w.done:
			return ctlReply{Error: "the run has stopped here"}
		case <-time.After(5 * time.Second):
			return ctlReply{Error: "the stage did not take the order in 5 s"}
		}
	case msgNorm:
		n := m.Norm
		if n == nil || n.Stage < 0 || n.Stage >= w.sp.Pipeline.Stages || w.peerOf(n.Stage) != from || n.Stage == w.idx {
			err := fmt.Errorf("%w: norm from a peer that does not hold that stage", p2p.ErrBadMsg)
			d.offence(from, err)
			return ctlReply{Error: err.Error()}
		}
		w.post(core.NormIn{Step: n.Step, Stage: n.Stage, SumSq: n.SumSq})
	}
	return ctlReply{OK: true}
}

// accept checks a signed run plan and, if this node trusts its launcher and can hold
// its stage, creates the worker (it starts on msgStart).
func (d *Daemon) accept(from peer.ID, signed *p2p.Signed) error {
	if signed == nil {
		return fmt.Errorf("%w: assign without a signed plan", p2p.ErrBadSignature)
	}
	signer, err := signed.Verify()
	if err != nil {
		d.log.Warn("refusing run: bad signature", "from", from, "err", err)
		return fmt.Errorf("refused: %w", err)
	}
	if !d.cfg.Open && !d.trust[signer] {
		d.log.Warn("refusing run: signed by an untrusted key", "key", signer, "from", from)
		return fmt.Errorf("refused: run signed by %s, a key this node does not trust (trust it with --trust %s, or accept any launcher with --open / open: true)", signer, signer)
	}
	plan, err := decodePlan(signed.Payload)
	if err != nil {
		return err
	}
	if plan.Launcher != signer.String() {
		return fmt.Errorf("refused: plan names launcher %s but is signed by %s", plan.Launcher, signer)
	}
	if from != signer {
		d.log.Warn("refusing run: plan relayed by another peer", "from", from, "launcher", signer)
		return fmt.Errorf("refused: plan signed by launcher %s but sent by %s; a node takes plans from their launcher only", signer, from)
	}
	switch now := time.Now(); {
	case plan.Expires.IsZero():
		return errors.New("refused: plan has no expiry (a launcher older than this node?)")
	case now.After(plan.Expires):
		d.log.Warn("refusing run: plan expired", "run", fmt.Sprintf("%016x", plan.ID), "expired", plan.Expires)
		return fmt.Errorf("refused: plan expired at %s (replayed or delayed)", plan.Expires.Format(time.RFC3339))
	case plan.Expires.Sub(now) > MaxPlanLife:
		return fmt.Errorf("refused: plan valid until %s, more than %s ahead", plan.Expires.Format(time.RFC3339), MaxPlanLife)
	}
	sp, err := spec.Parse([]byte(plan.Spec), "run spec")
	if err != nil {
		return fmt.Errorf("refused: %w", err)
	}
	S, R := sp.Pipeline.Stages, sp.Pipeline.Replicas
	if len(plan.Stages) != S*R {
		return fmt.Errorf("refused: plan has %d cells, spec %d stages × %d replicas", len(plan.Stages), S, R)
	}
	want, err := shard.SplitLayers(sp.Model.NLayers, S)
	if err != nil {
		return fmt.Errorf("refused: %w", err)
	}
	idx, rep := -1, -1
	seen := map[[2]int]bool{}
	for _, a := range plan.Stages {
		id, err := peer.Decode(a.Peer)
		if err != nil {
			return fmt.Errorf("refused: stage %d replica %d peer %q: %w", a.Stage, a.Replica, a.Peer, err)
		}
		if a.Stage < 0 || a.Stage >= S || a.Replica < 0 || a.Replica >= R || seen[[2]int{a.Stage, a.Replica}] {
			return fmt.Errorf("refused: cell stage %d replica %d is outside the %d×%d grid or given twice", a.Stage, a.Replica, S, R)
		}
		seen[[2]int{a.Stage, a.Replica}] = true
		if a.Range != want[a.Stage] {
			return fmt.Errorf("refused: stage %d holds layers %v, want %v", a.Stage, a.Range, want[a.Stage])
		}
		if id == d.host.ID() {
			if idx >= 0 {
				return errors.New("refused: the plan gives this node two cells of one run")
			}
			idx, rep = a.Stage, a.Replica
		}
		d.addAddrs(id, a.Addrs)
	}
	if idx < 0 {
		return errors.New("refused: the plan gives this node no stage")
	}
	var nonce uint64
	if j := plan.Join; j != nil {
		switch {
		case j.Replica != rep:
			return fmt.Errorf("refused: a rejoin of replica pipeline %d, but this node holds replica %d", j.Replica, rep)
		case R < 2 || sp.DiLoCo.Fragments != 1:
			return errors.New("refused: rejoining needs replicas with one fragment")
		case j.Step < 1 || j.Step >= sp.Train.Steps || !sp.DiLoCo.SyncAt(j.Step, sp.Train.Steps):
			return fmt.Errorf("refused: rejoin at step %d, not an outer step of the run", j.Step)
		case j.Nonce == 0 || plan.Resume != nil:
			return errors.New("refused: a rejoin needs a nonce and no resume")
		}
		nonce = j.Nonce
	}
	if err := plan.Data.validate(R); err != nil {
		return fmt.Errorf("refused: %w", err)
	}
	if lid, err := peer.Decode(plan.Launcher); err == nil {
		d.addAddrs(lid, plan.LauncherAddrs)
	}
	a, _ := plan.cell(idx, rep)
	mb := sp.Train.BatchSize / sp.Pipeline.MicroBatches
	slots := assign.Slots(S, idx, sp.Pipeline.MicroBatches, sp.Pipeline.InFlight)
	need := assign.Need(train.ModelConfig(sp), a.Range, idx == 0, idx == S-1, mb, slots, sp.Model.Recompute)
	if need > d.cfg.MemoryBudgetBytes() {
		return fmt.Errorf("refused: stage %d needs %d MiB, this node's memory budget is %d MiB", idx, need>>20, d.cfg.MemoryBudgetBytes()>>20)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, dup := d.runs[plan.ID]; dup || !d.seen[[2]uint64{plan.ID, nonce}].IsZero() {
		return fmt.Errorf("refused: run %016x already accepted here", plan.ID)
	}
	if len(d.runs) >= d.cfg.MaxStages {
		return fmt.Errorf("refused: this node already holds %d stage(s), its max_stages", len(d.runs))
	}
	var resumeDir string
	if plan.Resume != nil {
		if plan.Resume.Run == plan.ID || plan.Resume.Step < 1 || plan.Resume.Step >= sp.Train.Steps {
			return fmt.Errorf("refused: resume from run %016x step %d in a run of %d steps", plan.Resume.Run, plan.Resume.Step, sp.Train.Steps)
		}
		resumeDir = d.dir.RunDir(fmt.Sprintf("%016x", plan.Resume.Run))
	}
	// Recorded before anything else: a node restarted after this must refuse the plan.
	d.seen[[2]uint64{plan.ID, nonce}] = plan.Expires
	if err := d.writeAccepted(); err != nil {
		delete(d.seen, [2]uint64{plan.ID, nonce})
		return fmt.Errorf("refused: %w", err)
	}
	w, err := newWorker(context.Background(), workerEnv{host: d.host, log: d.log, reduce: d.reduce, fetch: d.fetch, corpus: d.cfg.Corpus,
		faultStallSync: d.faultStallSync, meters: d.meters},
		plan, sp, idx, rep, d.dir.RunDir(fmt.Sprintf("%016x", plan.ID)), resumeDir)
	if err != nil {
		delete(d.seen, [2]uint64{plan.ID, nonce}) // not taken: the launcher may send it again
		_ = d.writeAccepted()
		return fmt.Errorf("refused: %w", err)
	}
	d.runs[plan.ID] = w
	members := map[peer.ID]bool{signer: true}
	for _, a := range plan.Stages {
		if id, err := peer.Decode(a.Peer); err == nil && id != d.host.ID() {
			members[id] = true
		}
	}
	d.members[plan.ID] = members
	for _, a := range plan.Stages {
		if id, err := peer.Decode(a.Peer); err == nil && id != d.host.ID() {
			d.reserveLocked(plan.ID, id, a.Addrs)
		}
	}
	d.reserveLocked(plan.ID, signer, plan.LauncherAddrs)
	delete(d.ended, plan.ID) // frames of the run are for this worker again
	time.AfterFunc(time.Until(plan.Expires), func() {
		d.mu.Lock()
		delete(d.seen, [2]uint64{plan.ID, nonce})
		d.mu.Unlock()
		select {
		case <-w.started:
		default:
			d.log.Warn("releasing a run its launcher never started", "run", fmt.Sprintf("%016x", plan.ID), "expired", plan.Expires)
			w.cancel(fmt.Errorf("%w: plan expired at %s", ErrNeverStarted, plan.Expires.Format(time.RFC3339)))
			w.startOnce.Do(w.start)
		}
	})
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		<-w.started
		<-w.done
		d.endRun(plan.ID, w.finalView())
	}()
	if err := writeLauncherRecord(d.dir.RunDir(fmt.Sprintf("%016x", plan.ID)), plan); err != nil {
		d.log.Warn("launcher not recorded; after a restart this node will not find it", "err", err)
	}
	d.log.Info("accepted run", "run", fmt.Sprintf("%016x", plan.ID), "stage", idx, "replica", rep, "layers", fmt.Sprintf("%d-%d", a.Range.Lo, a.Range.Hi),
		"launcher", signer, "need_mib", need>>20)
	return nil
}

// endRun forgets a run that stopped here but remembers, for endedMemory, that it
// ended: late frames come within seconds of the end, and the record need not
// outlive them.
// last is how the run ended here, kept for the status page.
func (d *Daemon) endRun(id uint64, last status.Run) {
	d.mu.Lock()
	last = withHeardLoss(last, d.heard)
	delete(d.heard, id)
	delete(d.runs, id)
	gone := d.members[id]
	delete(d.members, id)
	// Its peers' tensor streams have nothing more to carry here, unless for another run.
	for p := range gone {
		if !d.isMemberLocked(p) {
			for s := range d.tensorIn[p] {
				s.Reset()
			}
		}
	}
	for _, r := range d.reserved[id] {
		d.host.Release(r.id, r.addrs)
	}
	delete(d.reserved, id)
	d.ended[id] = true
	d.finished = append(d.finished, last)
	if len(d.finished) > keptRuns {
		d.finished = slices.Delete(d.finished, 0, len(d.finished)-keptRuns)
	}
	d.mu.Unlock()
	time.AfterFunc(endedMemory, func() {
		d.mu.Lock()
		delete(d.ended, id)
		d.mu.Unlock()
	})
	d.pruneRuns()
}

// isMember reports whether p is a peer of a run held here (Host.Gate of the
// tensor and reduce protocols).
func (d *Daemon) isMember(p peer.ID) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.isMemberLocked(p)
}

func (d *Daemon) isMemberLocked(p peer.ID) bool {
	for _, m := range d.members {
		if m[p] {
			return true
		}
	}
	return false
}

// addMember counts p, at addrs, among run's peers (a cell passed to it).
func (d *Daemon) addMember(run uint64, p peer.ID, addrs []string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if m := d.members[run]; m != nil {
		m[p] = true
		d.reserveLocked(run, p, addrs)
	}
}

// reservation is one p2p.Host.Reserve a run made.
type reservation struct {
	id    peer.ID
	addrs []multiaddr.Multiaddr
}

// reserveLocked lets run's peer p at addrs (full or bare multiaddrs) past the host's
// connection limits while the run is held here. d.mu is held.
func (d *Daemon) reserveLocked(run uint64, p peer.ID, addrs []string) {
	var r reservation
	for _, s := range addrs {
		if a, err := multiaddr.NewMultiaddr(s); err == nil {
			r.addrs = append(r.addrs, a)
		}
	}
	if len(r.addrs) == 0 {
		return
	}
	r.id = p
	d.host.Reserve(p, r.addrs)
	d.reserved[run] = append(d.reserved[run], r)
}

func (d *Daemon) addAddrs(id peer.ID, addrs []string) {
	for _, s := range addrs {
		ma, err := multiaddr.NewMultiaddr(s)
		if err != nil {
			continue
		}
		if info, err := peer.AddrInfoFromP2pAddr(ma); err == nil && info.ID == id {
			d.host.Peerstore().AddAddrs(id, info.Addrs, peerstore.PermanentAddrTTL)
		} else {
			d.host.Peerstore().AddAddr(id, ma, peerstore.PermanentAddrTTL)
		}
	}
}

// handleFrames reads tensor frames from one stream until it ends; a frame that fails
// any check resets the stream and counts against its sender.
func (d *Daemon) handleFrames(proto protocol.ID) func(network.Stream) {
	meter := d.meters.For(proto)
	return func(s network.Stream) {
		from := s.Conn().RemotePeer()
		if !d.trackTensorIn(from, s) {
			s.Reset() // its run ended between the gate and here
			return
		}
		defer d.untrackTensorIn(from, s)
		d.host.NoteStream(s)
		r := &traffic.CountingReader{R: s}
		for {
			before := r.N
			f, err := p2p.ReadFrame(r, d.frameLimit())
			if errors.Is(err, io.EOF) {
				s.Close()
				return
			}
			if err != nil {
				d.penalise(s, from, err)
				return
			}
			meter.In(r.N - before)
			if err := d.route(proto, from, f, r.N-before); err != nil {
				d.penalise(s, from, err)
				return
			}
		}
	}
}

// trackTensorIn records s, a tensor stream from p being read, if p is still a peer of
// a run here.
func (d *Daemon) trackTensorIn(p peer.ID, s network.Stream) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.isMemberLocked(p) {
		return false
	}
	if d.tensorIn[p] == nil {
		d.tensorIn[p] = map[network.Stream]bool{}
	}
	d.tensorIn[p][s] = true
	return true
}

func (d *Daemon) untrackTensorIn(p peer.ID, s network.Stream) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.tensorIn[p], s)
	if len(d.tensorIn[p]) == 0 {
		delete(d.tensorIn, p)
	}
}

// frameLimit is the largest frame any run here expects, so a compressed frame cannot
// make the node allocate more than a real one would; with no run, frames are refused
// after their header anyway.
func (d *Daemon) frameLimit() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	limit := 1 << 20
	for _, w := range d.runs {
		for _, k := range []p2p.Kind{p2p.KindActivation, p2p.KindGradient, p2p.KindEval} {
			limit = max(limit, w.expect(k, 0).MaxBytes())
		}
	}
	return limit
}

// route hands a frame of size bytes on the wire to the run it is for.
func (d *Daemon) route(proto protocol.ID, from peer.ID, f *p2p.Frame, size int64) error {
	if (proto == p2p.ProtoGradient) != (f.Kind == p2p.KindGradient) {
		return fmt.Errorf("%w: kind %d on %s", p2p.ErrBadFrame, f.Kind, proto)
	}
	w := d.run(f.Run)
	if w == nil {
		if d.hasEnded(f.Run) {
			// A neighbour still sending when the run stopped here: late, not malicious.
			return fmt.Errorf("frame for run %016x, which has ended on this node", f.Run)
		}
		return fmt.Errorf("%w: frame for unknown run %016x", p2p.ErrBadFrame, f.Run)
	}
	if want, ok := w.from(f.Kind); !ok || want != from {
		return fmt.Errorf("%w: frame of kind %d from %s, which is not this stage's neighbour", p2p.ErrBadFrame, f.Kind, from)
	}
	if err := f.Check(w.expect(f.Kind, int(f.Micro))); err != nil {
		return err
	}
	w.recvd.add(f.Kind, size)
	w.post(frameIn{f})
	return nil
}

// penalise resets the stream and, if err is a protocol violation (p2p.ErrViolation),
// counts it against the sender. A stream cut short (reset, timeout, truncated by a
// peer that died mid-write) is not one: honest peers on lossy links and peers that
// crash do that.
func (d *Daemon) penalise(s network.Stream, from peer.ID, err error) {
	if !errors.Is(err, p2p.ErrViolation) {
		s.Reset()
		d.log.Debug("stream ended early; reset", "peer", from, "err", err)
		return
	}
	// Recorded before the reset, so a sender that sees its stream reset finds the
	// penalty already counted.
	d.offence(from, err)
	s.Reset()
}

// offence counts a protocol violation against from.
func (d *Daemon) offence(from peer.ID, err error) {
	score, banned := d.host.Penalties().Add(from, err.Error())
	d.log.Warn("protocol violation", "peer", from, "err", err, "score", fmt.Sprintf("%.1f", score), "banned", banned)
}
