package daemon

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/node/status"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/node/worker"
)

// table is what the daemon knows of the runs it holds and their peers. One goroutine,
// the daemon's loop, owns it: everything else asks the loop by a request (below), so
// no lock guards it and nothing is sent on a channel while one is held.
type table struct {
	runs map[uint64]*worker.Worker
	// pending are plans accepted whose workers are being built (outside the loop: a
	// worker loads its checkpoint); they count as held for slots, duplicates and pruning.
	pending map[uint64]*wire.Plan
	seen    map[[2]uint64]time.Time // plans (run, rejoin nonce) accepted and not yet expired, with their expiry; kept in the data directory too
	ended   map[uint64]time.Time    // when runs held here stopped: their late frames are dropped, not penalised, for endedMemory
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
	// closing is set once the daemon stops its runs: no run is held after that.
	closing bool
	// changed says the view must be published again after this request.
	changed bool
}

func newTable() *table {
	return &table{runs: map[uint64]*worker.Worker{}, pending: map[uint64]*wire.Plan{}, seen: map[[2]uint64]time.Time{}, ended: map[uint64]time.Time{},
		members: map[uint64]map[peer.ID]bool{}, reserved: map[uint64][]reservation{}, tensorIn: map[peer.ID]map[network.Stream]bool{},
		ctlOpen: map[peer.ID]int{}, ctlIP: map[string]int{}, heard: map[uint64]heardLoss{}}
}

// view is the part of the table the stream gates and the frames path read: the loop
// publishes a new one (never changed after) through an atomic pointer whenever runs,
// members or ended runs change. A gate on every stream and a route on every frame
// read it rather than ask the loop, so that they never queue behind an accept or an
// end; a view a moment old decides as the table would have a moment earlier, which a
// frame racing a run's start or end cannot tell from arriving a moment earlier.
// What must agree with the table at once (a tensor stream tracked only while its
// sender is a member, which a run's end resets) asks the loop.
type view struct {
	runs    map[uint64]*worker.Worker
	pending int
	members map[peer.ID]bool // the peers of every run held here
	ended   map[uint64]time.Time
}

func (t *table) view() *view {
	v := &view{runs: maps.Clone(t.runs), pending: len(t.pending), members: map[peer.ID]bool{}, ended: maps.Clone(t.ended)}
	for _, m := range t.members {
		for p := range m {
			v.members[p] = true
		}
	}
	return v
}

// request is a message to the daemon's loop: do runs on the loop with the table, and
// writes any answer into the request, which its sender reads once ask returns.
type request interface {
	do(d *Daemon, t *table)
}

// envelope carries a request to the loop; done is closed (never sent on) once it ran.
type envelope struct {
	r    request
	done chan struct{}
}

// loop owns the table until the daemon closes.
func (d *Daemon) loop(t *table) {
	defer close(d.stopped)
	for {
		select {
		case e := <-d.reqs:
			e.r.do(d, t)
			if t.changed {
				t.changed = false
				d.view.Store(t.view())
			}
			close(e.done)
		case <-d.quit:
			return
		}
	}
}

// ask has the loop do r and waits until it has; false if the loop has stopped (the
// daemon closed), r then not done.
func (d *Daemon) ask(r request) bool {
	e := envelope{r: r, done: make(chan struct{})}
	select {
	case d.reqs <- e:
	case <-d.stopped:
		return false
	}
	<-e.done
	return true
}

// admitPlan takes a slot for a checked plan, recording it as accepted (in the data
// directory too), or says why not.
type admitPlan struct {
	plan  *wire.Plan
	nonce uint64
	steps int
	err   error
}

func (r *admitPlan) do(d *Daemon, t *table) {
	plan, key := r.plan, [2]uint64{r.plan.ID, r.nonce}
	if t.closing {
		r.err = fmt.Errorf("refused: %w", ErrShutdown)
		return
	}
	// Plans expired are refused by their expiry: no need to remember them.
	for k, exp := range t.seen {
		if !exp.After(d.clock.Now()) {
			delete(t.seen, k)
		}
	}
	_, dup := t.runs[plan.ID]
	if _, p := t.pending[plan.ID]; dup || p || !t.seen[key].IsZero() {
		r.err = fmt.Errorf("refused: run %016x already accepted here", plan.ID)
		return
	}
	if n := len(t.runs) + len(t.pending); n >= d.cfg.MaxStages {
		r.err = fmt.Errorf("refused: this node already holds %d stage(s), its max_stages", n)
		return
	}
	if plan.Resume != nil && (plan.Resume.Run == plan.ID || plan.Resume.Step < 1 || plan.Resume.Step >= r.steps) {
		r.err = fmt.Errorf("refused: resume from run %016x step %d in a run of %d steps", plan.Resume.Run, plan.Resume.Step, r.steps)
		return
	}
	// Recorded before anything else: a node restarted after this must refuse the plan.
	t.seen[key] = plan.Expires
	if err := d.writeAccepted(t); err != nil {
		delete(t.seen, key)
		r.err = fmt.Errorf("refused: %w", err)
		return
	}
	t.pending[plan.ID] = plan
	t.changed = true
}

// dropPlan gives back the slot of an admitted plan whose worker could not be built:
// the launcher may send it again.
type dropPlan struct {
	id, nonce uint64
}

func (r *dropPlan) do(d *Daemon, t *table) {
	delete(t.pending, r.id)
	delete(t.seen, [2]uint64{r.id, r.nonce})
	_ = d.writeAccepted(t)
	t.changed = true
}

// holdRun makes w the worker of an admitted plan; held is false if the daemon is
// closing (w is then the caller's to stop).
type holdRun struct {
	plan   *wire.Plan
	w      *worker.Worker
	signer peer.ID
	held   bool
}

func (r *holdRun) do(d *Daemon, t *table) {
	delete(t.pending, r.plan.ID)
	t.changed = true
	if t.closing {
		return
	}
	d.hold(t, r.plan, r.w, r.signer)
	r.held = true
}

// runEnded forgets a run that stopped here.
type runEnded struct {
	id   uint64
	last status.Run
}

func (r *runEnded) do(d *Daemon, t *table) { d.forget(t, r.id, r.last) }

// memberAdded counts p, at addrs, among run's peers (a cell passed to it).
type memberAdded struct {
	run   uint64
	p     peer.ID
	addrs []string
}

func (r *memberAdded) do(d *Daemon, t *table) {
	if m := t.members[r.run]; m != nil {
		m[r.p] = true
		d.reserve(t, r.run, r.p, r.addrs)
		t.changed = true
	}
}

// tensorOpened records s, a tensor stream from p being read, if p is still a peer
// of a run here (ok).
type tensorOpened struct {
	p  peer.ID
	s  network.Stream
	ok bool
}

func (r *tensorOpened) do(d *Daemon, t *table) {
	if !t.isMember(r.p) {
		return
	}
	if t.tensorIn[r.p] == nil {
		t.tensorIn[r.p] = map[network.Stream]bool{}
	}
	t.tensorIn[r.p][r.s] = true
	r.ok = true
}

type tensorClosed struct {
	p peer.ID
	s network.Stream
}

func (r *tensorClosed) do(d *Daemon, t *table) {
	delete(t.tensorIn[r.p], r.s)
	if len(t.tensorIn[r.p]) == 0 {
		delete(t.tensorIn, r.p)
	}
}

// ctlOpened counts a control stream from p at ip, and says what p is and whether
// it may open one more now (ok); ctlClosed undoes it.
type ctlOpened struct {
	p     peer.ID
	ip    string
	class ctlClass
	ok    bool
}

func (r *ctlOpened) do(d *Daemon, t *table) {
	p, ip := r.p, r.ip
	class := ctlStranger
	if d.trust[p] {
		class = ctlLauncher
	}
	for run, m := range t.members {
		if m[p] && class == ctlStranger {
			class = ctlMember
		}
		if w := t.runs[run]; w != nil && w.Launcher() == p {
			class = ctlLauncher
		}
	}
	r.class = class
	if t.ctlOpen[p] >= ctlPerPeer {
		return
	}
	if class == ctlStranger {
		if t.ctlOpen[""] >= ctlStrangers || t.ctlIP[ip] >= ctlPerIP {
			return
		}
		t.ctlOpen[""]++ // "" is no peer: the strangers' total
		t.ctlIP[ip]++
	}
	t.ctlOpen[p]++
	r.ok = true
}

type ctlClosed struct {
	p     peer.ID
	ip    string
	class ctlClass
}

func (r *ctlClosed) do(d *Daemon, t *table) {
	if r.class == ctlStranger {
		if t.ctlOpen[""]--; t.ctlOpen[""] <= 0 {
			delete(t.ctlOpen, "")
		}
		if t.ctlIP[r.ip]--; t.ctlIP[r.ip] <= 0 {
			delete(t.ctlIP, r.ip)
		}
	}
	if t.ctlOpen[r.p]--; t.ctlOpen[r.p] <= 0 {
		delete(t.ctlOpen, r.p)
	}
}

// offerRefused notes an untrusted launcher's offer request; quiet if one was logged
// less than a minute ago.
type offerRefused struct{ quiet bool }

func (r *offerRefused) do(d *Daemon, t *table) {
	if r.quiet = d.clock.Since(t.refusedAt) < time.Minute; !r.quiet {
		t.refusedAt = d.clock.Now()
	}
}

// lossHeard keeps a loss a run's last stage announced, if newer than the one kept.
type lossHeard struct {
	run  uint64
	loss heardLoss
}

func (r *lossHeard) do(d *Daemon, t *table) {
	if t.runs[r.run] == nil {
		return // ended meanwhile: nothing to show it on
	}
	if h, ok := t.heard[r.run]; !ok || r.loss.step > h.step {
		t.heard[r.run] = r.loss
	}
}

// statusOf is what the status page needs of the table: the runs held, those that
// ended (newest first) and the losses heard.
type statusOf struct {
	runs     []*worker.Worker
	finished []status.Run
	heard    map[uint64]heardLoss
}

func (r *statusOf) do(d *Daemon, t *table) {
	r.runs = slices.Collect(maps.Values(t.runs))
	for i := len(t.finished) - 1; i >= 0; i-- {
		r.finished = append(r.finished, t.finished[i])
	}
	r.heard = maps.Clone(t.heard)
}

// pruneFolders renames away the folders of folders that keep_runs lets go, sparing the
// runs held or being accepted and the runs they resume from: done on the loop, so a
// plan being accepted either sees its resume folder whole or not at all.
type pruneFolders struct {
	folders []RunFolder
	moved   []RunFolder
}

func (r *pruneFolders) do(d *Daemon, t *table) {
	inUse := map[string]bool{}
	use := func(id uint64, plan *wire.Plan) {
		inUse[fmt.Sprintf("%016x", id)] = true
		if plan.Resume != nil {
			inUse[fmt.Sprintf("%016x", plan.Resume.Run)] = true
		}
	}
	for id, w := range t.runs {
		use(id, w.Plan())
	}
	for id, plan := range t.pending {
		use(id, plan)
	}
	for _, f := range Prunable(r.folders, d.cfg.KeepRuns, inUse) {
		tmp := filepath.Join(filepath.Dir(f.Path), ".pruned-"+f.ID)
		if err := os.Rename(f.Path, tmp); err != nil {
			d.log.Warn("run folder not pruned", "run", f.ID, "err", err)
			continue
		}
		f.Path = tmp
		r.moved = append(r.moved, f)
	}
}

// stopRuns marks the daemon closing and gives the runs it holds, to stop.
type stopRuns struct{ runs []*worker.Worker }

func (r *stopRuns) do(d *Daemon, t *table) {
	t.closing = true
	r.runs = slices.Collect(maps.Values(t.runs))
}

func (t *table) isMember(p peer.ID) bool {
	for _, m := range t.members {
		if m[p] {
			return true
		}
	}
	return false
}
