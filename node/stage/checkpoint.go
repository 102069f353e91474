package stage

import (
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"strconv"

	"github.com/pipeswarm/pipeswarm/shard"
)

// A unit's checkpoint is two files. The weights file is the stage's tensors under
// their global names, as shard.SaveCheckpoint writes them, so that an export can
// assemble a model from the stages' files. The state file beside it holds the rest a
// resumed unit needs, as flat tensors named in the constants below. Both carry the
// caller's metadata (the run's spec and step, the data position, ...) and the
// checksum shard seals every file with, checked when they are read.

// Names of the state file's tensors and metadata.
const (
	// MetaFormat says the state file is this package's format, which Restore reads.
	MetaFormat = "pipeswarm.stage_format"
	format     = "1"
	// MetaSpec and MetaStep are the run's spec and the step a checkpoint is of: every
	// checkpoint's caller puts them in its metadata.
	MetaSpec = "pipeswarm.spec"
	MetaStep = "pipeswarm.step"
	// MetaSampler is the data sampler's position (hex) at the checkpoint's step; its
	// loop, which owns the sampler, puts it in the first stage's metadata.
	MetaSampler = "sampler"

	stateAdamStep   = "adam_step"       // metadata: the update rule's step count (AdamW's, or NAdam's)
	stateAdamM      = "adam_m"          // its first moment
	stateAdamV      = "adam_v"          // its second moment
	stateGlobal     = "global"          // with replicas: the weights the replicas last agreed on
	stateMomentum   = "outer_momentum"  // with replicas: the outer optimiser's momentum
	stateOuterRes   = "ef_residual"     // with a lossy outer codec: what this replica's contributions left out
	stateOuterSteps = "outer_steps"     // metadata: outer steps taken
	stateInRes      = "in_ef_residual"  // a lossy gradient codec's residual at the boundary with the previous stage
	stateOutRes     = "out_ef_residual" // the same at the boundary with the next stage
	statePast       = "past."           // + N, in an async run: the weights as they were N updates ago
)

// ErrFormat is wrapped by Restore's error for a state file of another format.
var ErrFormat = errors.New("not a stage checkpoint this version reads")

// Paths are the two files of a unit's checkpoint.
type Paths struct{ Weights, State string }

// Name is the file name, without extension, of the checkpoint of stage idx of
// replica pipeline rep in a run of replicas pipelines.
func Name(idx, rep, replicas int) string {
	if replicas > 1 {
		return fmt.Sprintf("stage-%d-replica-%d", idx, rep)
	}
	return fmt.Sprintf("stage-%d", idx)
}

// At is the checkpoint called name in dir.
func At(dir, name string) Paths {
	return Paths{filepath.Join(dir, name+".safetensors"), filepath.Join(dir, name+".state.safetensors")}
}

// Save writes the unit's checkpoint to p: the weights and optimiser state as they
// are now, the boundaries' residuals as Mark last kept them. meta goes into both
// files, but for MetaSampler, which goes into the state file only; Save does not
// change it.
func (u *Unit) Save(p Paths, meta map[string]string) error {
	wm := meta
	if _, ok := meta[MetaSampler]; ok {
		wm = maps.Clone(meta)
		delete(wm, MetaSampler)
	}
	if err := shard.SaveCheckpoint(p.Weights, wm, u.Stage); err != nil {
		return err
	}
	sm := make(map[string]string, len(meta)+3)
	for k, v := range meta {
		sm[k] = v
	}
	sm[MetaFormat] = format
	m, v := u.opt.Moments()
	ts := []shard.Named{{Name: stateAdamM, Data: m}, {Name: stateAdamV, Data: v}}
	sm[stateAdamStep] = strconv.Itoa(u.opt.StepCount())
	if o := u.Outer; o != nil {
		ts = append(ts, shard.Named{Name: stateGlobal, Data: o.Global}, shard.Named{Name: stateMomentum, Data: o.Momentum()})
		if r := o.Residual(); r != nil {
			ts = append(ts, shard.Named{Name: stateOuterRes, Data: r})
		}
		sm[stateOuterSteps] = strconv.Itoa(o.Rounds)
	}
	for a, p := range u.past {
		ts = append(ts, shard.Named{Name: statePast + strconv.Itoa(a+1), Data: p})
	}
	if u.markIn != nil {
		ts = append(ts, shard.Named{Name: stateInRes, Data: u.markIn})
	}
	if u.markOut != nil {
		ts = append(ts, shard.Named{Name: stateOutRes, Data: u.markOut})
	}
	return shard.SaveTensors(p.State, sm, ts)
}

// Restore loads the checkpoint at p, which Save wrote for the same stage of a run of
// the same spec, into the unit, after checking both files against their checksums,
// and returns the state file's metadata (the caller's, as Save was given it). On an
// error the unit may hold part of the checkpoint: the caller discards it. The
// boundaries' residuals become what Mark keeps, so the unit saves what it restored
// until its next step.
func (u *Unit) Restore(p Paths) (map[string]string, error) {
	wk, err := shard.LoadSealed(p.Weights)
	if err != nil {
		return nil, err
	}
	sk, err := shard.LoadSealed(p.State)
	if err != nil {
		return nil, err
	}
	// State files written before this format had no format key and the same names,
	// so they read as format 1.
	if f, ok := sk.Metadata[MetaFormat]; ok && f != format {
		return nil, fmt.Errorf("%s: %w: its %s is %q, this version of pipeswarm reads %q; start the run afresh, or resume it with the version that wrote it",
			p.State, ErrFormat, MetaFormat, f, format)
	}
	if err := u.Stage.Load(wk); err != nil {
		return nil, fmt.Errorf("%s: %w", p.Weights, err)
	}
	get := func(name string, dst []float32) error {
		t, ok := sk.Tensors[name]
		if !ok {
			return fmt.Errorf("%s has no %s", p.State, name)
		}
		if len(t.Data) != len(dst) {
			return fmt.Errorf("%s: %s has %d values, want %d", p.State, name, len(t.Data), len(dst))
		}
		copy(dst, t.Data)
		return nil
	}
	getInt := func(key string) (int, error) {
		n, err := strconv.Atoi(sk.Metadata[key])
		if err != nil {
			return 0, fmt.Errorf("%s: metadata %s: %w", p.State, key, err)
		}
		return n, nil
	}
	n := len(u.Stage.Params)
	m, v := make([]float32, n), make([]float32, n)
	if err := errors.Join(get(stateAdamM, m), get(stateAdamV, v)); err != nil {
		return nil, err
	}
	steps, err := getInt(stateAdamStep)
	if err != nil {
		return nil, err
	}
	if err := u.opt.SetState(steps, m, v); err != nil {
		return nil, fmt.Errorf("%s: %w", p.State, err)
	}
	for a, p := range u.past {
		if err := get(statePast+strconv.Itoa(a+1), p); err != nil {
			return nil, err
		}
	}
	if o := u.Outer; o != nil {
		if err := errors.Join(get(stateGlobal, o.Global), get(stateMomentum, o.Momentum())); err != nil {
			return nil, err
		}
		if r := o.Residual(); r != nil {
			if err := get(stateOuterRes, r); err != nil {
				return nil, err
			}
		}
		if o.Rounds, err = getInt(stateOuterSteps); err != nil {
			return nil, err
		}
	}
	for _, b := range []struct {
		name string
		b    *Boundary
	}{{stateInRes, u.In}, {stateOutRes, u.Out}} {
		if t, ok := sk.Tensors[b.name]; ok && b.b != nil {
			b.b.SetResidual(t.Data)
		}
	}
	u.Mark()
	return sk.Metadata, nil
}
