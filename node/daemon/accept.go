package daemon

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	"github.com/multiformats/go-multiaddr"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/status"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/node/worker"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/shard"
)

// accept checks a signed run plan and, if this node trusts its launcher and can hold
// its stage, creates the worker (it starts on wire.MsgStart).
func (d *Daemon) accept(from peer.ID, signed *p2p.Signed) error {
	plan, signer, err := d.verifyPlan(from, signed)
	if err != nil {
		return err
	}
	sp, err := spec.Parse([]byte(plan.Spec), "run spec")
	if err != nil {
		return fmt.Errorf("refused: %w", err)
	}
	idx, rep, nonce, err := d.cellHere(plan, sp)
	if err != nil {
		return err
	}
	if err := plan.Data.Validate(sp.Pipeline.Replicas); err != nil {
		return fmt.Errorf("refused: %w", err)
	}
	if lid, err := peer.Decode(plan.Launcher); err == nil {
		d.addAddrs(lid, plan.LauncherAddrs)
	}
	a, _ := plan.Cell(idx, rep)
	mb := sp.Train.BatchSize / sp.Pipeline.MicroBatches
	mem := assign.StageMemory(train.ModelConfig(sp), a.Range, train.StaffSchedule(sp), idx, mb, sp.Model.Recompute)
	need := mem.Total()
	if budget := d.cfg.MemoryBudgetBytes(); need > budget {
		needs, has := assign.FormatSizes(need, budget)
		return fmt.Errorf("refused: stage %d needs %s%s, this node's memory budget is %s", idx, needs, mem.StashedNote(), has)
	}
	adm := &admitPlan{plan: plan, nonce: nonce, steps: sp.Train.Steps}
	if !d.ask(adm) {
		return fmt.Errorf("refused: %w", ErrShutdown)
	}
	if adm.err != nil {
		return adm.err
	}
	var resumeDir string
	if plan.Resume != nil {
		resumeDir = d.dir.RunDir(fmt.Sprintf("%016x", plan.Resume.Run))
	}
	// Built off the loop (it loads a checkpoint); the plan holds its slot meanwhile.
	w, err := worker.New(context.Background(), worker.Env{Host: d.host, Log: d.log, Reduce: d.reduce, Fetch: d.fetch, Corpus: d.cfg.Corpus,
		FaultStallSync: int(d.faultStallSync.Load()), Meters: d.meters, Clock: d.clock},
		plan, sp, idx, rep, d.dir.RunDir(fmt.Sprintf("%016x", plan.ID)), resumeDir)
	if err != nil {
		d.ask(&dropPlan{id: plan.ID, nonce: nonce})
		return fmt.Errorf("refused: %w", err)
	}
	hold := &holdRun{plan: plan, w: w, signer: signer}
	if !d.ask(hold) || !hold.held {
		w.Stop(ErrShutdown)
		w.Start() // never started: it has to wind down all the same
		return fmt.Errorf("refused: %w", ErrShutdown)
	}
	if err := writeLauncherRecord(d.dir.RunDir(fmt.Sprintf("%016x", plan.ID)), plan); err != nil {
		d.log.Warn("launcher not recorded; after a restart this node will not find it", "err", err)
	}
	attrs := []any{"run", fmt.Sprintf("%016x", plan.ID), "stage", idx, "replica", rep, "layers", fmt.Sprintf("%d-%d", a.Range.Lo, a.Range.Hi),
		"launcher", signer, "need_mib", need >> 20}
	if mem.Stashed > 0 {
		attrs = append(attrs, "past_weight_versions", mem.Versions(), "past_weights_mib", mem.Stashed>>20)
	}
	d.log.Info("accepted run", attrs...)
	return nil
}

// verifyPlan checks that signed is a plan its launcher signed and sent itself, that
// this node trusts that launcher, and that the plan is within its life.
func (d *Daemon) verifyPlan(from peer.ID, signed *p2p.Signed) (*wire.Plan, peer.ID, error) {
	if signed == nil {
		return nil, "", fmt.Errorf("%w: assign without a signed plan", p2p.ErrBadSignature)
	}
	signer, err := signed.Verify()
	if err != nil {
		d.log.Warn("refusing run: bad signature", "from", from, "err", err)
		return nil, "", fmt.Errorf("refused: %w", err)
	}
	if !d.cfg.Open && !d.trust[signer] {
		d.log.Warn("refusing run: signed by an untrusted key", "key", signer, "from", from)
		return nil, "", fmt.Errorf("refused: run signed by %s, a key this node does not trust (trust it with --trust %s, or accept any launcher with --open / open: true)", signer, signer)
	}
	plan, err := wire.DecodePlan(signed.Payload)
	if err != nil {
		return nil, "", err
	}
	if plan.Launcher != signer.String() {
		return nil, "", fmt.Errorf("refused: plan names launcher %s but is signed by %s", plan.Launcher, signer)
	}
	if from != signer {
		d.log.Warn("refusing run: plan relayed by another peer", "from", from, "launcher", signer)
		return nil, "", fmt.Errorf("refused: plan signed by launcher %s but sent by %s; a node takes plans from their launcher only", signer, from)
	}
	switch now := d.clock.Now(); {
	case plan.Expires.IsZero():
		return nil, "", errors.New("refused: plan has no expiry (a launcher older than this node?)")
	case now.After(plan.Expires):
		d.log.Warn("refusing run: plan expired", "run", fmt.Sprintf("%016x", plan.ID), "expired", plan.Expires)
		return nil, "", fmt.Errorf("refused: plan expired at %s (replayed or delayed)", plan.Expires.Format(time.RFC3339))
	case plan.Expires.Sub(now) > wire.MaxPlanLife:
		return nil, "", fmt.Errorf("refused: plan valid until %s, more than %s ahead", plan.Expires.Format(time.RFC3339), wire.MaxPlanLife)
	}
	return plan, signer, nil
}

// cellHere checks plan's grid against sp and finds this node's cell in it, and the
// nonce of the rejoin the plan is (0 if none). The peers' addresses are noted as the
// cells are read.
func (d *Daemon) cellHere(plan *wire.Plan, sp *spec.Spec) (idx, rep int, nonce uint64, err error) {
	S, R := sp.Pipeline.Stages, sp.Pipeline.Replicas
	if len(plan.Stages) != S*R {
		return 0, 0, 0, fmt.Errorf("refused: plan has %d cells, spec %d stages × %d replicas", len(plan.Stages), S, R)
	}
	want, err := shard.SplitLayers(sp.Model.NLayers, S)
	if err != nil {
		return 0, 0, 0, fmt.Errorf("refused: %w", err)
	}
	idx, rep = -1, -1
	seen := map[[2]int]bool{}
	for _, a := range plan.Stages {
		id, err := peer.Decode(a.Peer)
		if err != nil {
			return 0, 0, 0, fmt.Errorf("refused: stage %d replica %d peer %q: %w", a.Stage, a.Replica, a.Peer, err)
		}
		if a.Stage < 0 || a.Stage >= S || a.Replica < 0 || a.Replica >= R || seen[[2]int{a.Stage, a.Replica}] {
			return 0, 0, 0, fmt.Errorf("refused: cell stage %d replica %d is outside the %d×%d grid or given twice", a.Stage, a.Replica, S, R)
		}
		seen[[2]int{a.Stage, a.Replica}] = true
		if a.Range != want[a.Stage] {
			return 0, 0, 0, fmt.Errorf("refused: stage %d holds layers %v, want %v", a.Stage, a.Range, want[a.Stage])
		}
		if id == d.host.ID() {
			if idx >= 0 {
				return 0, 0, 0, errors.New("refused: the plan gives this node two cells of one run")
			}
			idx, rep = a.Stage, a.Replica
		}
		d.addAddrs(id, a.Addrs)
	}
	if idx < 0 {
		return 0, 0, 0, errors.New("refused: the plan gives this node no stage")
	}
	if j := plan.Join; j != nil {
		switch {
		case j.Replica != rep:
			return 0, 0, 0, fmt.Errorf("refused: a rejoin of replica pipeline %d, but this node holds replica %d", j.Replica, rep)
		case R < 2 || sp.DiLoCo.Fragments != 1:
			return 0, 0, 0, errors.New("refused: rejoining needs replicas with one fragment")
		case j.Step < 1 || j.Step >= sp.Train.Steps || !sp.DiLoCo.SyncAt(j.Step, sp.Train.Steps):
			return 0, 0, 0, fmt.Errorf("refused: rejoin at step %d, not an outer step of the run", j.Step)
		case j.Nonce == 0 || plan.Resume != nil:
			return 0, 0, 0, errors.New("refused: a rejoin needs a nonce and no resume")
		}
		nonce = j.Nonce
	}
	return idx, rep, nonce, nil
}

// hold makes w the run's worker here: the run's members and their connection
// reservations, the release of a plan never started, and the end of the run once w
// is done. It runs on the loop.
func (d *Daemon) hold(t *table, plan *wire.Plan, w *worker.Worker, signer peer.ID) {
	t.runs[plan.ID] = w
	t.changed = true
	members := map[peer.ID]bool{signer: true}
	for _, a := range plan.Stages {
		if id, err := peer.Decode(a.Peer); err == nil && id != d.host.ID() {
			members[id] = true
		}
	}
	t.members[plan.ID] = members
	for _, a := range plan.Stages {
		if id, err := peer.Decode(a.Peer); err == nil && id != d.host.ID() {
			d.reserve(t, plan.ID, id, a.Addrs)
		}
	}
	d.reserve(t, plan.ID, signer, plan.LauncherAddrs)
	delete(t.ended, plan.ID) // frames of the run are for this worker again
	// The timer touches the worker alone (safe from any goroutine), not the table: the
	// plan's entry in seen goes when a later accept finds it expired.
	d.clock.AfterFunc(plan.Expires.Sub(d.clock.Now()), func() {
		select {
		case <-w.Started():
		default:
			d.log.Warn("releasing a run its launcher never started", "run", fmt.Sprintf("%016x", plan.ID), "expired", plan.Expires)
			w.Cancel(fmt.Errorf("%w: plan expired at %s", ErrNeverStarted, plan.Expires.Format(time.RFC3339)))
			w.Start()
		}
	})
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		<-w.Started()
		<-w.Done()
		d.endRun(plan.ID, w.FinalView())
	}()
}

// endRun forgets a run that stopped here; last is how it ended here, kept for the
// status page.
func (d *Daemon) endRun(id uint64, last status.Run) {
	d.ask(&runEnded{id: id, last: last})
	d.pruneRuns()
}

// forget forgets a run that stopped here but remembers, for endedMemory, that it
// ended: late frames come within seconds of the end, and the record need not
// outlive them. It runs on the loop.
func (d *Daemon) forget(t *table, id uint64, last status.Run) {
	last = withHeardLoss(last, t.heard)
	delete(t.heard, id)
	delete(t.runs, id)
	gone := t.members[id]
	delete(t.members, id)
	t.changed = true
	// Its peers' tensor streams have nothing more to carry here, unless for another run.
	for p := range gone {
		if !t.isMember(p) {
			for s := range t.tensorIn[p] {
				s.Reset()
			}
		}
	}
	for _, r := range t.reserved[id] {
		d.host.Release(r.id, r.addrs)
	}
	delete(t.reserved, id)
	now := d.clock.Now()
	t.ended[id] = now
	for r, at := range t.ended {
		if now.Sub(at) >= endedMemory {
			delete(t.ended, r)
		}
	}
	t.finished = append(t.finished, last)
	if len(t.finished) > keptRuns {
		t.finished = slices.Delete(t.finished, 0, len(t.finished)-keptRuns)
	}
}

// isMember reports whether p is a peer of a run held here (Host.Gate of the tensor
// and reduce protocols, asked on every stream: it reads the loop's view).
func (d *Daemon) isMember(p peer.ID) bool { return d.view.Load().members[p] }

// addMember counts p, at addrs, among run's peers (a cell passed to it).
func (d *Daemon) addMember(run uint64, p peer.ID, addrs []string) {
	d.ask(&memberAdded{run: run, p: p, addrs: addrs})
}

// reservation is one p2p.Host.Reserve a run made.
type reservation struct {
	id    peer.ID
	addrs []multiaddr.Multiaddr
}

// reserve lets run's peer p at addrs (full or bare multiaddrs) past the host's
// connection limits while the run is held here. It runs on the loop.
func (d *Daemon) reserve(t *table, run uint64, p peer.ID, addrs []string) {
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
	t.reserved[run] = append(t.reserved[run], r)
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
