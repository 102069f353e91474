package core

import "fmt"

// The asynchronous schedule (Config.Async) as the core drives it: each stage follows
// Async.Order exactly, whatever the timing. While it holds fewer than its bound of
// forwards not yet matched by a backward, its next piece of work is the next forward
// (it waits for that activation even if a gradient is already in); otherwise it is the
// next backward. After every MicroBatches backwards it takes an update at once: no
// norm exchange, no flush. Then, as in a sync step, come the outer step if one is due,
// the checkpoint if one is due and the evaluation if one is due, on the weights the
// stage holds after that update; then the next forward. "Step" counts updates.
//
// Because the order is fixed, every forward and backward runs on a weight version the
// schedule knows; Forward.Age and Backward.Age say how many updates older than the
// current weights it is. In a run that never stopped a forward's age is 0 (its version
// is the current one when the order reaches it); a resumed run, which restarts every
// stage at the first micro-batch of the update after its checkpoint and so runs again
// the forwards that were in flight at the cut, runs those on the past versions the
// checkpoint holds. A stage that joins a run in progress (Config.Joined: its replica
// pipeline comes back after an outer step, every stage of it at once) also starts at
// the first micro-batch after From and fills to its bound, but holds no version
// before From: the forwards the schedule would run on one run on From's weights, the
// newest it has. That touches the fill alone: every later forward's version is From
// or newer, so from then on the order and the versions are the whole run's. A
// backward's age is its forward's with Stash, else 0.
//
// Micro-batches are numbered over the run, j = (step−1)·MicroBatches + micro; frames
// and events keep (Step, Micro), the update j belongs to and its place in it.

func (c Config) schedule() Async {
	return Async{Stages: c.Stages, MicroBatches: c.MicroBatches, InFlight: c.MaxInFlight}
}

func (c *Core) index(step, micro int) int { return (step-1)*c.cfg.MicroBatches + micro }

func (c *Core) item(j int) (step, micro int) {
	return j/c.cfg.MicroBatches + 1, j % c.cfg.MicroBatches
}

// asyncStart readies the tapes at the run's (or the resumed run's) first micro-batch.
func (c *Core) asyncStart() {
	c.fwd, c.bwd = c.cfg.From*c.cfg.MicroBatches, c.cfg.From*c.cfg.MicroBatches
	c.free = c.free[:0]
	for s := c.cfg.Slots() - 1; s >= 0; s-- {
		c.free = append(c.free, s)
	}
	clear(c.slotOf)
}

func (c *Core) asyncActivation(e ActivationIn) error {
	if err := c.checkItem(e.Step, e.Micro, c.cfg.MicroBatches, "micro-batch"); err != nil {
		return err
	}
	k := key{e.Step, e.Micro}
	if c.acts[k] || c.index(e.Step, e.Micro) < c.fwd {
		return fmt.Errorf("%w: activation for step %d micro-batch %d twice", ErrStale, e.Step, e.Micro)
	}
	c.acts[k] = true
	return nil
}

func (c *Core) asyncGradient(e GradientIn) error {
	if e.Step < 1 || e.Step > c.cfg.Steps || e.Micro < 0 || e.Micro >= c.cfg.MicroBatches {
		return fmt.Errorf("%w: gradient for micro-batch %d of step %d", ErrProtocol, e.Micro, e.Step)
	}
	j := c.index(e.Step, e.Micro)
	backing := c.busy && c.cur.kind == kindBackward && c.cur.micro == j // its gradient already came
	switch {
	case j < c.bwd || backing || c.grads[key{e.Step, e.Micro}]:
		return fmt.Errorf("%w: gradient for step %d micro-batch %d twice", ErrStale, e.Step, e.Micro)
	case j >= c.fwd:
		return fmt.Errorf("%w: gradient for step %d micro-batch %d never sent", ErrProtocol, e.Step, e.Micro)
	}
	c.grads[key{e.Step, e.Micro}] = true
	return nil
}

// forwardLimit is the first micro-batch the stage does not run forward: the run's
// end, or, once a stage before it is down, the end of the update in hand (which it
// finishes, to stop after it).
func (c *Core) forwardLimit() int {
	if c.downAfter >= 0 {
		return c.step * c.cfg.MicroBatches
	}
	return c.cfg.Steps * c.cfg.MicroBatches
}

// asyncNextIsForward says whether the next piece of work in the stage's order is a
// forward (else it is a backward).
func (c *Core) asyncNextIsForward() bool {
	return c.fwd < c.forwardLimit() && c.fwd-c.bwd < c.cfg.Slots()
}

// forwardAge is how many updates older than the current weights the ones the
// forward of j runs on are.
func (c *Core) forwardAge(j int) int {
	return c.step - 1 - c.forwardVersion(j)
}

// forwardVersion is the weight version the forward of j runs on: the schedule's, or
// on a joined stage, which holds none before From, From's if the schedule's is older.
func (c *Core) forwardVersion(j int) int {
	v := c.cfg.schedule().ForwardVersion(c.cfg.Stage, j)
	if c.cfg.Joined {
		v = max(v, c.cfg.From)
	}
	return v
}

func (c *Core) backward(j, slot int) Action {
	step, micro := c.item(j)
	age := 0
	if c.cfg.Stash {
		age = c.forwardAge(j)
	}
	c.busy, c.cur = true, pending{kind: kindBackward, micro: j, slot: slot}
	return Backward{Step: step, Micro: micro, Slot: slot, Send: !c.cfg.first(), Age: age}
}

func (c *Core) nextAsync() []Action {
	if c.asyncNextIsForward() {
		j := c.fwd
		step, micro := c.item(j)
		k := key{step, micro}
		if !c.cfg.first() && !c.acts[k] {
			return nil // the order waits for this activation
		}
		delete(c.acts, k)
		slot := c.free[len(c.free)-1]
		c.free = c.free[:len(c.free)-1]
		c.slotOf[j] = slot
		c.fwd++
		c.busy, c.cur = true, pending{kind: kindForward, micro: j, slot: slot}
		return []Action{Forward{Step: step, Micro: micro, Slot: slot, Send: !c.cfg.last(), Age: c.forwardAge(j)}}
	}
	if c.cfg.last() || c.bwd >= c.fwd {
		return nil // the last stage's backwards follow its forwards at once
	}
	j := c.bwd
	step, micro := c.item(j)
	k := key{step, micro}
	if !c.grads[k] {
		return nil
	}
	delete(c.grads, k)
	return []Action{c.backward(j, c.slotOf[j])}
}

// asyncCompleted is completed for the training work of an async run.
func (c *Core) asyncCompleted(out []Action) []Action {
	switch p := c.cur; p.kind {
	case kindForward:
		if c.cfg.last() {
			out = append(out, c.backward(p.micro, p.slot))
		}
	case kindBackward:
		delete(c.slotOf, p.micro)
		c.free = append(c.free, p.slot)
		c.bwd++
		if c.bwd%c.cfg.MicroBatches == 0 {
			c.phase = stepping
			c.busy, c.cur = true, pending{kind: kindOptimize}
			return append(out, Optimize{Step: c.step, Own: true})
		}
	}
	return out
}
