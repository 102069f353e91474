package membership

import (
	"log/slog"
	"maps"
	"slices"
)

// probe is the search for nodes to hold broken pipeline rep's cells, one question at
// a time. Each cell's own node is asked first; a node that answers with a free slot
// takes its cell again. A cell whose node does not passes to a newcomer (a candidate
// holding no cell, with a free slot and the memory the cell needs); failing one, to
// the idle survivor of a broken pipeline after rep (re-pairing: two broken pipelines
// make one whole one; always into the lower, so two probes never trade nodes). A cell
// no one can take ends the search until the next probe.
type probe struct {
	cells  []Cell          // as they were when the probe began
	todo   []int           // rep's cells still to place, by index
	held   map[string]bool // nodes holding a cell, or found for one
	taken  map[string]bool // survivors of other pipelines found for one
	moved  map[int]string  // cell index -> its new node
	phase  int
	next   int // the next candidate (newcomers) or cell (survivors) to consider
	cands  []Candidate
	asking string
	need   int64
}

const (
	askOwn = iota
	askNewcomer
	askSurvivor
)

func (r *Run) startProbe(rep int) {
	p := &probe{cells: slices.Clone(r.cells), held: map[string]bool{}, taken: map[string]bool{}, moved: map[int]string{}}
	for i, a := range p.cells {
		p.held[a.Peer] = true
		if a.Replica == rep {
			p.todo = append(p.todo, i)
		}
	}
	r.probes[rep] = p
	r.advance(rep, p)
}

// advance asks the next question of p, or ends it.
func (r *Run) advance(rep int, p *probe) {
	ask := func(peer string, addrs []string, need int64) {
		p.asking, p.need = peer, need
		r.do(AskOffer{Replica: rep, Peer: peer, Addrs: addrs})
	}
	for len(p.todo) > 0 {
		a := p.cells[p.todo[0]]
		switch p.phase {
		case askOwn:
			ask(a.Peer, nil, 0)
			return
		case askNewcomer:
			for p.next < len(p.cands) {
				c := p.cands[p.next]
				p.next++
				if !p.held[c.Peer] {
					ask(c.Peer, c.Addrs, a.Need)
					return
				}
			}
			p.phase, p.next = askSurvivor, 0
		case askSurvivor:
			for p.next < len(p.cells) {
				b := p.cells[p.next]
				p.next++
				if _, broken := r.broken[b.Replica]; b.Replica > rep && broken && !p.taken[b.Peer] {
					ask(b.Peer, nil, a.Need)
					return
				}
			}
			delete(r.probes, rep)
			r.probeAt[rep] = r.now.Add(ProbeEvery)
			return
		}
	}
	delete(r.probes, rep)
	r.moves[rep] = p.moved
	if _, ok := r.broken[rep]; ok {
		r.wantJoin[rep] = true
		r.log(slog.LevelInfo, "the nodes of a broken replica pipeline are reachable again; it rejoins at the next outer step", "replica", rep)
	}
}

func (r *Run) offerAnswered(e OfferAnswered) {
	p := r.probes[e.Replica]
	if p == nil || e.Peer != p.asking {
		return
	}
	p.asking = ""
	i := p.todo[0]
	if !e.Answered || e.MaxStages < 1 || e.Memory < p.need {
		if p.phase == askOwn {
			p.phase, p.next, p.cands = askNewcomer, 0, slices.Clone(r.newcomers)
		}
		r.advance(e.Replica, p)
		return
	}
	switch p.phase {
	case askNewcomer:
		p.moved[i], p.held[e.Peer] = e.Peer, true
	case askSurvivor:
		p.moved[i], p.taken[e.Peer] = e.Peer, true
	}
	p.todo, p.phase, p.next = p.todo[1:], askOwn, 0
	r.advance(e.Replica, p)
}

// nextJoin brings back the next pipeline of the join round, or ends the round.
func (r *Run) nextJoin() {
	jr := r.joining
	if len(jr.queue) == 0 {
		r.joining = nil
		r.missing(*jr.then)
		return
	}
	jr.current, jr.queue = jr.queue[0], jr.queue[1:]
	r.do(r.signJoin(jr.current, jr.step))
}

// signJoin passes the cells the probe found nodes for to them and asks for the rejoin
// of pipeline j after step. A survivor of another broken pipeline leaves its cell to
// the node gone (a swap: no cell is ever empty, and that pipeline rejoins when the
// node is back or another takes it). The other replicas of each cell's stage are told
// first, so that their all-reduce counts the new node in.
func (r *Run) signJoin(j, step int) SignJoin {
	moved := r.moves[j]
	delete(r.moves, j)
	act := SignJoin{Replica: j, Step: step}
	for _, i := range slices.Sorted(maps.Keys(moved)) {
		m := Move{Index: i, Peer: moved[i], Was: r.cells[i].Peer, Left: -1}
		for k, b := range r.cells {
			if k != i && b.Peer == m.Peer {
				r.cells[k].Peer, m.Left = m.Was, k
				break
			}
		}
		r.cells[i].Peer = m.Peer
		told := []int{i}
		if m.Left >= 0 {
			r.tally.Repaired++
			told = append(told, m.Left)
		}
		for _, c := range told {
			rp := Replace{Index: c}
			for k, b := range r.cells {
				if _, broken := r.broken[b.Replica]; b.Replica != j && b.Replica != r.cells[c].Replica && !broken {
					rp.To = append(rp.To, k)
				}
			}
			m.Tell = append(m.Tell, rp)
		}
		act.Moves = append(act.Moves, m)
	}
	return act
}

func (r *Run) joinDone(e JoinDone) {
	jr := r.joining
	if jr == nil || e.Replica != jr.current {
		return
	}
	j := e.Replica
	if e.Err != nil {
		r.log(slog.LevelWarn, "replica pipeline could not rejoin; trying again at the next outer step", "replica", j, "step", jr.step, "err", e.Err)
	} else {
		delete(r.wantJoin, j)
		delete(r.broken, j)
		delete(r.lagging, j)
		r.epoch[j], r.joined[j] = e.Nonce, jr.step
		for s := range r.c.Stages {
			delete(r.done, [2]int{s, j})
		}
		r.tally.Rejoined = append(r.tally.Rejoined, j)
		r.log(slog.LevelInfo, "replica pipeline rejoined", "replica", j, "after_step", jr.step, "whole", r.c.Replicas-len(r.broken))
	}
	r.nextJoin()
}
