package stage

import (
	"bytes"
	"errors"
	"math"
	"math/rand/v2"
	"os"
	"slices"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/optim"
	"github.com/pipeswarm/pipeswarm/shard"
)

// Two stages with every piece of state a unit holds: a subspace (projected gradients
// and parameters), a lossy gradient codec (boundary residuals), replicas with a lossy
// outer codec (global weights, momentum, residual), and a clip that bites.
const fullSpec = `name: unit
seed: 7
eval_interval: 0
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 16}
pipeline: {stages: 2, micro_batches: 1, replicas: 2}
train: {batch_size: 2, steps: 10, lr: 0.01, warmup: 1, grad_clip: 0.05}
diloco: {inner_steps: 2, outer_lr: 0.7, outer_momentum: 0.9, sync: int8/32}
compression: {subspace: 8, gradients: int8/32}
data: {val_fraction: 0.01}
`

func testSpec(t *testing.T, src string) *spec.Spec {
	t.Helper()
	sp, err := spec.Parse([]byte(src), "test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return sp
}

// pipeline is the units of one replica pipeline of sp.
func pipeline(t *testing.T, sp *spec.Spec) []*Unit {
	t.Helper()
	ranges, err := shard.SplitLayers(sp.Model.NLayers, sp.Pipeline.Stages)
	if err != nil {
		t.Fatal(err)
	}
	sub, err := RunSubspace(sp)
	if err != nil {
		t.Fatal(err)
	}
	var us []*Unit
	for i, r := range ranges {
		u, err := New(sp, i, r, sub)
		if err != nil {
			t.Fatal(err)
		}
		us = append(us, u)
	}
	return us
}

// batch is step n's tokens and targets, the same for every caller.
func batch(sp *spec.Spec, n int) (tokens, targets []int32) {
	rng := rand.New(rand.NewPCG(uint64(n), 1))
	N := sp.Train.BatchSize * sp.Model.SeqLen
	tokens, targets = make([]int32, N), make([]int32, N)
	for i := range tokens {
		tokens[i], targets[i] = int32(rng.IntN(sp.Model.Vocab)), int32(rng.IntN(sp.Model.Vocab))
	}
	return tokens, targets
}

// step trains us one step on step n's batch, carrying the residual stream and its
// gradient across each boundary as the wire does, and returns the loss.
func step(t *testing.T, sp *spec.Spec, us []*Unit, n int) float64 {
	t.Helper()
	tokens, targets := batch(sp, n)
	B, T := sp.Train.BatchSize, sp.Model.SeqLen
	tapes := make([]*shard.Tape, len(us))
	var x []float32
	var loss float64
	for i, u := range us {
		u.Stage.ZeroGrads()
		tapes[i] = u.Stage.NewTape(B, T)
		if i > 0 {
			x = u.In.Forward(x, tokens, targets, B, T, true)
		}
		x = u.Stage.Forward(tapes[i], tokens, x)
	}
	last := len(us) - 1
	loss = us[last].Stage.Loss(tapes[last], targets, 1)
	var g []float32
	for i := last; i >= 0; i-- {
		g = us[i].Stage.Backward(tapes[i], g)
		if i > 0 {
			g = us[i].In.Backward(g, B, T)
		}
	}
	var ss float64
	for _, u := range us {
		ss += u.GradSumSquares()
	}
	norm := math.Sqrt(ss)
	lr := float32(sp.Train.LR)
	for _, u := range us {
		u.Update(norm, sp.Train.GradClip, lr)
	}
	if math.IsNaN(loss) {
		t.Fatalf("step %d: loss is NaN", n)
	}
	return loss
}

// outerStep takes an outer step on every fragment of every unit as a replica alone
// would, except that the all-reduce's decoded contribution is made to differ from
// what was sent, so that the outer residual carries something.
func outerStep(us []*Unit) {
	for _, u := range us {
		o := u.Outer
		for f := range o.Frags {
			y := o.Contribution(f, u.Stage.Params)
			own := make([]float32, len(y))
			for i, v := range y {
				own[i] = v * 0.75
			}
			o.Apply(f, y, own, own, u.Stage, false)
		}
		o.Rounds++
	}
}

// The optimiser step of a unit is, bit for bit: the gradients projected into the
// subspace, their sum of squares (summed over the stages into the global norm),
// clipping by that norm, AdamW, the parameters projected back.
func TestUpdateIsProjectNormClipAdamWProject(t *testing.T) {
	sp := testSpec(t, fullSpec)
	us := pipeline(t, sp)
	// The reference: the same stages stepped by hand.
	ref := pipeline(t, sp)
	opts := make([]*optim.AdamW, len(ref))
	for i, r := range ref {
		var err error
		if opts[i], err = optim.NewAdamW(len(r.Stage.Params), AdamWConfig(sp, r.Stage)); err != nil {
			t.Fatal(err)
		}
	}
	rng := rand.New(rand.NewPCG(3, 4))
	clipped := false
	for n := range 4 {
		for i := range us {
			for j := range us[i].Stage.Grads {
				g := float32(rng.NormFloat64() * 0.01)
				us[i].Stage.Grads[j], ref[i].Stage.Grads[j] = g, g
			}
		}
		var ss, want float64
		for i, u := range us {
			ss += u.GradSumSquares()
			ref[i].Stage.ProjectGrads()
			want += optim.SumSquares(ref[i].Stage.Grads)
		}
		if ss != want {
			t.Fatalf("step %d: sum of squares %v, want %v", n, ss, want)
		}
		norm := math.Sqrt(ss)
		f := optim.ClipFactor(norm, sp.Train.GradClip)
		clipped = clipped || f != 1
		lr := float32(sp.Train.LR) * float32(n+1) / 4
		for i, u := range us {
			u.Update(norm, sp.Train.GradClip, lr)
			r := ref[i].Stage
			if f != 1 {
				optim.Scale(r.Grads, f)
			}
			opts[i].Step(r.Params, r.Grads, lr)
			r.ProjectParams()
			if !slices.Equal(u.Stage.Params, r.Params) {
				t.Fatalf("step %d stage %d: parameters differ from the reference step's", n, i)
			}
		}
	}
	if !clipped {
		t.Fatal("the clip never bit: the test does not cover clipping")
	}
	if us[0].Steps() != 4 {
		t.Errorf("Steps() = %d, want 4", us[0].Steps())
	}
}

// A unit saved after some steps and restored into a fresh one continues exactly as
// the unit that never stopped: every piece of its state is in the checkpoint.
func TestSaveRestoreThenStepEqualsUninterrupted(t *testing.T) {
	sp := testSpec(t, fullSpec)
	run := pipeline(t, sp)
	for n := range 3 {
		step(t, sp, run, n)
	}
	outerStep(run)
	step(t, sp, run, 3)
	for _, u := range run {
		if u.Outer.Residual() == nil || slices.Max(u.Outer.Residual()) == 0 {
			t.Fatal("no outer residual to keep: the test does not cover it")
		}
	}
	if run[1].In.Residual() == nil {
		t.Fatal("no boundary residual to keep: the test does not cover it")
	}
	dir := t.TempDir()
	meta := map[string]string{"pipeswarm.step": "4", MetaSampler: "00"}
	for i, u := range run {
		u.Mark()
		if err := u.Save(At(dir, Name(i, 1, 2)), meta); err != nil {
			t.Fatal(err)
		}
	}
	resumed := pipeline(t, sp)
	for i, u := range resumed {
		got, err := u.Restore(At(dir, Name(i, 1, 2)))
		if err != nil {
			t.Fatal(err)
		}
		if got["pipeswarm.step"] != "4" || got[MetaSampler] != "00" {
			t.Errorf("stage %d: restored metadata %v lacks the caller's", i, got)
		}
	}
	for n := 4; n < 7; n++ {
		a, b := step(t, sp, run, n), step(t, sp, resumed, n)
		if a != b {
			t.Fatalf("step %d: loss %v resumed, %v uninterrupted", n, b, a)
		}
		if n == 5 {
			outerStep(run)
			outerStep(resumed)
		}
	}
	for i := range run {
		a, b := run[i], resumed[i]
		if !slices.Equal(a.Stage.Params, b.Stage.Params) || !slices.Equal(a.Outer.Global, b.Outer.Global) ||
			!slices.Equal(a.Outer.Momentum(), b.Outer.Momentum()) || !slices.Equal(a.Outer.Residual(), b.Outer.Residual()) ||
			a.Outer.Rounds != b.Outer.Rounds || a.Steps() != b.Steps() {
			t.Errorf("stage %d: the resumed unit's state differs from the uninterrupted one's", i)
		}
		if i > 0 && !slices.Equal(a.In.Residual(), b.In.Residual()) {
			t.Errorf("stage %d: boundary residuals differ", i)
		}
	}
}

// Mark keeps the residuals of a step's end: what the boundary carries into later
// micro-batches is not what a checkpoint of the step holds.
func TestSaveWritesTheResidualsMarkKept(t *testing.T) {
	sp := testSpec(t, fullSpec)
	us := pipeline(t, sp)
	step(t, sp, us, 0)
	us[1].Mark()
	kept := slices.Clone(us[1].In.Residual())
	step(t, sp, us, 1)
	if slices.Equal(kept, us[1].In.Residual()) {
		t.Fatal("the residual did not change in a step")
	}
	p := At(t.TempDir(), Name(1, 0, 2))
	if err := us[1].Save(p, nil); err != nil {
		t.Fatal(err)
	}
	ck, err := shard.LoadSealed(p.State)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(ck.Tensors[stateInRes].Data, kept) {
		t.Error("the checkpoint holds the residual as it is now, not as Mark kept it")
	}
}

// A checkpoint is read only if it is intact and of this format.
func TestRestoreRefusesACorruptFileAndAnotherFormat(t *testing.T) {
	sp := testSpec(t, fullSpec)
	us := pipeline(t, sp)
	step(t, sp, us, 0)
	dir := t.TempDir()
	p := At(dir, Name(0, 0, 2))
	if err := us[0].Save(p, nil); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p.State)
	if err != nil {
		t.Fatal(err)
	}
	flipped := slices.Clone(b)
	flipped[len(flipped)-3] ^= 1
	if err := os.WriteFile(p.State, flipped, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := pipeline(t, sp)[0].Restore(p); !errors.Is(err, shard.ErrCorrupt) {
		t.Errorf("a flipped byte: %v, want an error wrapping shard.ErrCorrupt", err)
	}
	ck, err := shard.ReadCheckpoint(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	ck.Metadata[MetaFormat] = "2"
	delete(ck.Metadata, shard.MetaSHA256)
	var ts []shard.Named
	for name, tn := range ck.Tensors {
		ts = append(ts, shard.Named{Name: name, Data: tn.Data})
	}
	if err := shard.SaveTensors(p.State, ck.Metadata, ts); err != nil {
		t.Fatal(err)
	}
	if _, err := pipeline(t, sp)[0].Restore(p); !errors.Is(err, ErrFormat) {
		t.Errorf("another format: %v, want an error wrapping ErrFormat", err)
	}
}

// An async unit keeps the weights of its last updates, newest first, saves and
// restores them, and with train.delay nesterov steps with NAdam, β1 raised by the
// delay.
func TestAsyncUnitKeepsPastVersionsAndStepsWithNAdam(t *testing.T) {
	src := `name: unit
seed: 7
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 16}
pipeline: {stages: 2, micro_batches: 1, schedule: async}
train: {batch_size: 2, steps: 10, lr: 0.01, warmup: 1, delay: nesterov}
data: {val_fraction: 0.01}
`
	sp := testSpec(t, src)
	run := pipeline(t, sp)
	if err := run[0].SetAsync(sp, 2, 0.5); err != nil {
		t.Fatal(err)
	}
	if _, ok := run[0].opt.(*optim.NAdam); !ok {
		t.Fatalf("update rule %T with delay nesterov, want *optim.NAdam", run[0].opt)
	}
	if _, ok := run[1].opt.(*optim.AdamW); !ok {
		t.Fatalf("update rule %T without SetAsync, want *optim.AdamW", run[1].opt)
	}
	if c := NAdamConfig(sp, run[0].Stage, 0.5); math.Abs(float64(c.Beta1)-(1-0.1/1.5)) > 1e-7 || c.Beta2 != 0.95 || c.WeightDecay != 0.1 {
		t.Errorf("NAdam config %+v, want beta1 1-0.1/1.5, beta2 0.95, weight decay 0.1", c)
	}
	var versions [][]float32
	for n := range 3 {
		versions = append(versions, slices.Clone(run[0].Stage.Params))
		step(t, sp, run, n)
	}
	if !slices.Equal(run[0].Past(1), versions[2]) || !slices.Equal(run[0].Past(2), versions[1]) {
		t.Fatal("Past(1), Past(2) are not the weights of one and two updates ago")
	}
	if got, want := run[0].Kept(), int64(2*len(run[0].Stage.Params)*4); got != want {
		t.Errorf("Kept() = %d, want %d", got, want)
	}
	dir := t.TempDir()
	for i, u := range run {
		u.Mark()
		if err := u.Save(At(dir, Name(i, 0, 1)), map[string]string{}); err != nil {
			t.Fatal(err)
		}
	}
	resumed := pipeline(t, sp)
	if err := resumed[0].SetAsync(sp, 2, 0.5); err != nil {
		t.Fatal(err)
	}
	for i, u := range resumed {
		if _, err := u.Restore(At(dir, Name(i, 0, 1))); err != nil {
			t.Fatal(err)
		}
	}
	if !slices.Equal(resumed[0].Past(2), versions[1]) {
		t.Fatal("the restored unit's Past(2) is not the saved one's")
	}
	for n := 3; n < 6; n++ {
		if a, b := step(t, sp, run, n), step(t, sp, resumed, n); a != b {
			t.Fatalf("step %d: loss %v resumed, %v uninterrupted", n, b, a)
		}
	}
	if !slices.Equal(run[0].Stage.Params, resumed[0].Stage.Params) {
		t.Error("the resumed unit's weights differ from the uninterrupted one's")
	}
}

// A unit that joins an async run holds its current weights for every past version:
// after k updates its versions older than k updates are the ones it joined with.
func TestAsyncUnitJoinedHoldsItsWeightsForTheVersionsBeforeIt(t *testing.T) {
	src := `name: unit
seed: 7
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 16}
pipeline: {stages: 2, micro_batches: 1, schedule: async}
train: {batch_size: 2, steps: 10, lr: 0.01, warmup: 1, delay: nesterov}
data: {val_fraction: 0.01}
`
	sp := testSpec(t, src)
	run := pipeline(t, sp)
	for _, u := range run {
		if err := u.SetAsync(sp, 3, 1); err != nil {
			t.Fatal(err)
		}
	}
	step(t, sp, run, 0) // the weights it joins with are not the initial ones
	joined := slices.Clone(run[0].Stage.Params)
	run[0].FillPast()
	for age := 1; age <= 3; age++ {
		if !slices.Equal(run[0].Past(age), joined) {
			t.Fatalf("Past(%d) right after FillPast is not the current weights", age)
		}
	}
	step(t, sp, run, 1)
	next := slices.Clone(run[0].Stage.Params)
	step(t, sp, run, 2)
	if !slices.Equal(run[0].Past(1), next) || !slices.Equal(run[0].Past(2), joined) || !slices.Equal(run[0].Past(3), joined) {
		t.Error("two updates after FillPast: Past(1) is not the weights of the update before, or Past(2), Past(3) not the joined ones")
	}
}

// A run that does not clip exchanges no norm: Update alone projects the gradients,
// and takes the same step as after GradSumSquares.
func TestUpdateWithoutANormProjectsTheGradientsItself(t *testing.T) {
	sp := testSpec(t, fullSpec)
	a, b := pipeline(t, sp), pipeline(t, sp)
	rng := rand.New(rand.NewPCG(8, 9))
	for n := range 3 {
		for i := range a {
			for j := range a[i].Stage.Grads {
				g := float32(rng.NormFloat64() * 0.01)
				a[i].Stage.Grads[j], b[i].Stage.Grads[j] = g, g
			}
			a[i].GradSumSquares()
			a[i].Update(0, 0, 0.01)
			b[i].Update(0, 0, 0.01)
			if !slices.Equal(a[i].Stage.Params, b[i].Stage.Params) {
				t.Fatalf("step %d stage %d: Update without GradSumSquares took another step", n, i)
			}
		}
	}
}

// A delay-corrected stage steps at the learning rate scaled by optim.DelayLR of its
// delay: the same step as NAdam taking the scaled rate itself.
func TestAsyncUnitStepsAtTheLearningRateScaledByItsDelay(t *testing.T) {
	src := `name: unit
seed: 7
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 16}
pipeline: {stages: 2, micro_batches: 1, schedule: async}
train: {batch_size: 2, steps: 10, lr: 0.01, warmup: 1, delay: nesterov, grad_clip: 0}
data: {val_fraction: 0.01}
`
	sp := testSpec(t, src)
	u := pipeline(t, sp)[0]
	const delay, lr = 1.5, 0.01
	if err := u.SetAsync(sp, 0, delay); err != nil {
		t.Fatal(err)
	}
	ref, err := optim.NewNAdam(len(u.Stage.Params), NAdamConfig(sp, u.Stage, delay))
	if err != nil {
		t.Fatal(err)
	}
	params := slices.Clone(u.Stage.Params)
	for i := range u.Stage.Grads {
		u.Stage.Grads[i] = float32(i%7-3) * 1e-3
	}
	grads := slices.Clone(u.Stage.Grads)
	u.Update(0, 0, lr)
	ref.Step(params, grads, lr*optim.DelayLR(delay))
	if !slices.Equal(u.Stage.Params, params) {
		t.Error("the unit's step is not NAdam's at lr × DelayLR(delay)")
	}
}
