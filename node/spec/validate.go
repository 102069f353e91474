package spec

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"

	"github.com/pipeswarm/pipeswarm/p2p/codec"
)

// Validate checks every field and returns all problems joined, each wrapping ErrInvalid.
// For a spec that came from Parse, each problem names the line of the field in the file.
func (s *Spec) Validate() error {
	return errors.Join(s.problems()...)
}

// fieldError is one problem with a spec, located as precisely as is known.
type fieldError struct {
	file  string // "" when the spec did not come from a file
	line  int    // 0 when the field was not written in the file
	field string // dotted path; "" for problems with the document's shape
	msg   string
	kind  error // ErrInvalid or ErrDecode
	cause error // the underlying error, if any
}

func (e *fieldError) Error() string {
	var b strings.Builder
	switch {
	case e.file != "" && e.line > 0:
		fmt.Fprintf(&b, "%s:%d: ", e.file, e.line)
	case e.file != "":
		fmt.Fprintf(&b, "%s: ", e.file)
	case e.line > 0:
		fmt.Fprintf(&b, "line %d: ", e.line)
	}
	if e.field != "" {
		b.WriteString(e.field + ": ")
	}
	b.WriteString(e.msg)
	return b.String()
}

func (e *fieldError) Unwrap() []error {
	if e.cause != nil {
		return []error{e.kind, e.cause}
	}
	return []error{e.kind}
}

// checker collects validation problems, locating each through the spec's source.
type checker struct {
	src  source
	errs []error
}

func (c *checker) failf(path, format string, args ...any) {
	c.errs = append(c.errs, &fieldError{
		file:  c.src.file,
		line:  c.src.lines[path],
		field: path,
		msg:   fmt.Sprintf(format, args...),
		kind:  ErrInvalid,
	})
}

func (c *checker) positive(path string, v int) bool {
	switch {
	case v == 0 && !c.src.written(path):
		c.failf(path, "missing; want a positive integer")
		return false
	case v <= 0:
		c.failf(path, "%d is not positive", v)
		return false
	}
	return true
}

func (c *checker) positiveFloat(path string, v float64) bool {
	if !c.finite(path, v) {
		return false
	}
	switch {
	case v == 0 && !c.src.written(path):
		c.failf(path, "missing; want a positive number")
		return false
	case !(v > 0):
		c.failf(path, "%v is not positive", v)
		return false
	}
	return true
}

func (c *checker) nonNegative(path string, v float64) bool {
	if !c.finite(path, v) {
		return false
	}
	if !(v >= 0) {
		c.failf(path, "%v is negative", v)
		return false
	}
	return true
}

func (c *checker) finite(path string, v float64) bool {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		c.failf(path, "%v is not a finite number", v)
		return false
	}
	return true
}

// problems checks every field, in the order they appear in the struct.
func (s *Spec) problems() []error {
	c := &checker{src: s.src}
	s.checkRun(c)
	dOK, layersOK := s.checkModel(c)
	microOK := s.checkPipeline(c, layersOK)
	s.checkTrain(c, microOK)
	s.checkCompression(c, dOK)
	s.checkDiLoCo(c)
	return c.errs
}

func (s *Spec) checkRun(c *checker) {
	switch {
	case s.Name == "" && !c.src.written("name"):
		c.failf("name", "missing; a run needs a name")
	case s.Name == "":
		c.failf("name", `"" is empty; a run needs a name`)
	case len(s.Name) > 64 || strings.IndexFunc(s.Name, badNameRune) >= 0:
		// The name ends up in file names and topic names.
		c.failf("name", "%q must be 1-64 letters, digits, '-', '_' or '.'", s.Name)
	}
	if s.EvalInterval < 0 {
		c.failf("eval_interval", "%d is negative", s.EvalInterval)
	}
	if s.CheckpointInterval < 0 {
		c.failf("checkpoint_interval", "%d is negative; 0 checkpoints by time only (checkpoint_seconds)", s.CheckpointInterval)
	}
	if s.CheckpointSeconds < 0 {
		c.failf("checkpoint_seconds", "%d is negative; 0 checkpoints by step count only (checkpoint_interval)", s.CheckpointSeconds)
	}
	if s.EvalBatches < 0 {
		c.failf("eval_batches", "%d is negative; 0 evaluates the whole validation split", s.EvalBatches)
	}
	if s.Export != ExportAllowed && s.Export != ExportNever {
		c.failf("export", "%q is not %s or %s", s.Export, ExportAllowed, ExportNever)
	}
}

// checkModel reports whether d_model and n_layers are usable for the checks after it.
func (s *Spec) checkModel(c *checker) (dOK, layersOK bool) {
	m := s.Model
	if m.Vocab < 2 || m.Vocab > MaxVocab {
		c.failf("model.vocab", "%d is outside [2, %d]", m.Vocab, MaxVocab)
	}
	dOK = c.positive("model.d_model", m.DModel)
	layersOK = c.positive("model.n_layers", m.NLayers)
	if c.positive("model.n_heads", m.NHeads) && dOK {
		switch {
		case m.DModel%m.NHeads != 0:
			c.failf("model.n_heads", "%d does not divide d_model %d", m.NHeads, m.DModel)
		case m.HeadDim()%2 != 0:
			// RoPE rotates the head's dimensions in pairs.
			c.failf("model.n_heads", "head dim d_model/n_heads = %d/%d = %d is odd; RoPE needs it even",
				m.DModel, m.NHeads, m.HeadDim())
		}
	}
	c.positive("model.d_ff", m.DFF)
	c.positive("model.seq_len", m.SeqLen)
	c.positiveFloat("model.rope_theta", m.RopeTheta)
	c.positiveFloat("model.norm_eps", m.NormEps)
	if !slices.Contains(Precisions, m.Precision) {
		c.failf("model.precision", "%q is not one of %s", m.Precision, strings.Join(Precisions, ", "))
	}
	return dOK, layersOK
}

// checkPipeline reports whether micro_batches is usable for the checks after it.
func (s *Spec) checkPipeline(c *checker, layersOK bool) (microOK bool) {
	m, p := s.Model, s.Pipeline
	switch {
	case p.Stages < 1:
		c.failf("pipeline.stages", "%d is less than 1", p.Stages)
	case layersOK && p.Stages > m.NLayers:
		c.failf("pipeline.stages", "%d exceeds n_layers %d; each stage needs a layer", p.Stages, m.NLayers)
	}
	c.positive("pipeline.staff_timeout", p.StaffTimeout)
	if p.PauseTimeout < 0 {
		c.failf("pipeline.pause_timeout", "%d is negative; 0 fails the run at once when a stage has no live node", p.PauseTimeout)
	}
	microOK = c.positive("pipeline.micro_batches", p.MicroBatches)
	switch {
	case p.InFlight < 0:
		c.failf("pipeline.in_flight", "%d is negative", p.InFlight)
	case microOK && p.InFlight > p.MicroBatches && p.Schedule != ScheduleAsync:
		// An async stage's forwards run on into later updates; a sync step's cannot.
		c.failf("pipeline.in_flight", "%d exceeds micro_batches %d; more forwards than a step has cannot be in flight (unless schedule: async)", p.InFlight, p.MicroBatches)
	}
	switch {
	case p.Schedule == "" && c.src.written("pipeline.schedule"):
		c.failf("pipeline.schedule", `"" is empty; want %s or %s`, ScheduleSync, ScheduleAsync)
	case p.Schedule != "" && p.Schedule != ScheduleSync && p.Schedule != ScheduleAsync:
		c.failf("pipeline.schedule", "%q is not %s or %s", p.Schedule, ScheduleSync, ScheduleAsync)
	}
	return microOK
}

func (s *Spec) checkTrain(c *checker, microOK bool) {
	p, t, d := s.Pipeline, s.Train, s.Data
	if c.positive("train.batch_size", t.BatchSize) && microOK && t.BatchSize%p.MicroBatches != 0 {
		c.failf("train.batch_size", "%d is not divisible by micro_batches %d", t.BatchSize, p.MicroBatches)
	}
	stepsOK := c.positive("train.steps", t.Steps)
	lrOK := c.positiveFloat("train.lr", t.LR)
	if c.nonNegative("train.min_lr", t.MinLR) && lrOK && t.MinLR > t.LR {
		c.failf("train.min_lr", "%v exceeds lr %v", t.MinLR, t.LR)
	}
	switch {
	case t.Warmup < 0:
		c.failf("train.warmup", "%d is negative", t.Warmup)
	case stepsOK && t.Warmup >= t.Steps:
		c.failf("train.warmup", "%d is not less than steps %d", t.Warmup, t.Steps)
	}
	c.nonNegative("train.weight_decay", t.WeightDecay)
	switch {
	case !p.Async() && (t.Delay != "" || c.src.written("train.delay")):
		c.failf("train.delay", "%q is set but pipeline.schedule is not async; a sync pipeline has no weight delay: remove it, or set pipeline.schedule: async", t.Delay)
	case p.Async() && !slices.Contains(Delays, t.Delay):
		c.failf("train.delay", "%q is not one of %s", t.Delay, strings.Join(Delays, ", "))
	}
	c.nonNegative("train.grad_clip", t.GradClip)
	for _, b := range []struct {
		path string
		v    float64
	}{{"train.beta1", t.Beta1}, {"train.beta2", t.Beta2}} {
		if !(b.v >= 0 && b.v < 1) {
			c.failf(b.path, "%v is outside [0, 1)", b.v)
		}
	}

	if !(d.ValFraction > 0 && d.ValFraction < 1) {
		c.failf("data.val_fraction", "%v is outside (0, 1)", d.ValFraction)
	}
}

func (s *Spec) checkCompression(c *checker, dOK bool) {
	m, p := s.Model, s.Pipeline
	k := s.Compression
	if k.Subspace < 0 || (dOK && k.Subspace > m.DModel) {
		c.failf("compression.subspace", "%d is outside [0, d_model %d]", k.Subspace, m.DModel)
	}
	if lastLayers := lastStageLayers(m.NLayers, p.Stages); k.DenseTail < 0 || (lastLayers > 0 && k.DenseTail > lastLayers) {
		c.failf("compression.dense_tail", "%d is outside [0, %d]: the dense layers must all be in the last stage, after every boundary", k.DenseTail, lastLayers)
	}
	for _, f := range []struct{ path, v string }{{"compression.activations", k.Activations}, {"compression.gradients", k.Gradients}} {
		if err := CheckCodec(f.v); err != nil {
			c.failf(f.path, "%v", err)
		}
	}
}

func (s *Spec) checkDiLoCo(c *checker) {
	p := s.Pipeline
	if p.Replicas < 1 || p.Replicas > MaxReplicas {
		c.failf("pipeline.replicas", "%d is outside [1, %d]", p.Replicas, MaxReplicas)
	}
	o := s.DiLoCo
	innerOK := c.positive("diloco.inner_steps", o.InnerSteps)
	c.positiveFloat("diloco.outer_lr", o.OuterLR)
	if !(o.OuterMomentum >= 0 && o.OuterMomentum < 1) {
		c.failf("diloco.outer_momentum", "%v is outside [0, 1)", o.OuterMomentum)
	}
	if err := CheckCodec(o.Sync); err != nil {
		c.failf("diloco.sync", "%v", err)
	}
	if c.positive("diloco.fragments", o.Fragments) && innerOK && o.Fragments > o.InnerSteps {
		c.failf("diloco.fragments", "%d exceeds inner_steps %d: each fragment needs its own inner step to sync at", o.Fragments, o.InnerSteps)
	}
	if o.WarmupSteps < 0 {
		c.failf("diloco.warmup_steps", "%d is negative", o.WarmupSteps)
	}
	if p.Replicas > 1 && innerOK && s.CheckpointInterval > 0 && s.CheckpointInterval%o.InnerSteps != 0 {
		c.failf("checkpoint_interval", "%d is not a multiple of diloco.inner_steps %d: with replicas, checkpoints are taken right after an outer step",
			s.CheckpointInterval, o.InnerSteps)
	}
	if p.Replicas > 1 && innerOK && s.EvalInterval > 0 && s.EvalInterval%o.InnerSteps != 0 {
		// Validation is taken on the global weights, which exist right after an outer step.
		c.failf("eval_interval", "%d is not a multiple of diloco.inner_steps %d: with replicas, validation runs right after an outer step",
			s.EvalInterval, o.InnerSteps)
	}
}

// lastStageLayers is how many layers the last of stages holds when n layers are split
// as shard.SplitLayers splits them (the first n%stages stages take one more); 0 if
// the split is impossible.
func lastStageLayers(n, stages int) int {
	if stages < 1 || n < stages {
		return 0
	}
	return n / stages // the last stage is never one of the first n%stages
}

func badNameRune(r rune) bool {
	switch {
	case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		return false
	case r == '-', r == '_', r == '.':
		return false
	}
	return true
}

// CheckCodec reports whether s names a wire codec a boundary can use.
func CheckCodec(s string) error {
	if _, err := codec.Parse(s); err != nil {
		return err
	}
	return nil
}
