// Package spec is the run spec: one plain struct, read from YAML, that says which model to
// train, how to split it into pipeline stages, how to optimise it and on what text.
//
// The life of a spec follows pebble's Options: Parse (or Load) decodes the file strictly,
// EnsureDefaults fills what the file left out, Validate checks every field, and Marshal
// writes back the effective spec so that every run can record exactly what it used.
// Errors name the file, line and field of what is wrong.
package spec

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"slices"

	"gopkg.in/yaml.v3"

	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/data/tokenizer"
)

// ErrInvalid is wrapped by every error Validate reports: the spec decoded, but a value is out
// of range or inconsistent with another.
var ErrInvalid = errors.New("invalid spec")

// DiLoCo defaults, chosen by a sweep on tiny (docs/runs.md, "Replicas and DiLoCo").
const (
	DefaultInnerSteps    = 30
	DefaultOuterLR       = 1.0
	DefaultOuterMomentum = 0.0
	DefaultSync          = "int8/32"
	// MaxReplicas bounds replica pipelines; the all-reduce tracks members in a 64-bit set.
	MaxReplicas = 64
)

// DefaultEvalBatches is eval_batches when a spec names none: 16 batches of 16 windows,
// 256 windows of seq_len+1 bytes. On tiny an evaluation then costs about as much as 7
// training steps, 3.5% of the 200 between its evaluations (docs/runs.md, "Data and
// evaluation").
const DefaultEvalBatches = 16

// DefaultCheckpointSeconds is checkpoint_seconds when a spec names none: a crash loses
// at most five minutes of training, and a checkpoint of tiny's (a few MB per stage)
// costs well under 1% of that.
const DefaultCheckpointSeconds = 300

// Values of Pipeline.Schedule and Train.Delay.
const (
	ScheduleSync  = "sync"
	ScheduleAsync = "async"

	DelayNone     = "none"
	DelayStash    = "stash"
	DelayNesterov = "nesterov"
	// DefaultDelay is train.delay in an async run that names none (docs/runs.md,
	// "The asynchronous pipeline").
	DefaultDelay = DelayNesterov
)

// Delays are the values train.delay takes.
var Delays = []string{DelayNone, DelayStash, DelayNesterov}

// Async reports whether the pipeline runs the async schedule.
func (p Pipeline) Async() bool { return p.Schedule == ScheduleAsync }

// Values of Export.
const (
	ExportAllowed = "allowed"
	ExportNever   = "never"
)

// ErrDecode is wrapped by every error about the text itself: malformed YAML, an empty file,
// unknown or repeated fields, values of the wrong type.
var ErrDecode = errors.New("cannot decode spec")

// Spec is a training run: model shape, pipeline split, optimiser and data.
type Spec struct {
	Name         string `yaml:"name"`
	Seed         uint64 `yaml:"seed"`
	EvalInterval int    `yaml:"eval_interval"` // steps between validation evals; 0 = only at the end
	// EvalBatches caps an evaluation at the first EvalBatches batches of validation
	// windows (train.EvalBatch windows each), the final one included, so that it costs
	// a bounded fraction of training; 0 evaluates the whole validation split. Default
	// DefaultEvalBatches.
	EvalBatches int `yaml:"eval_batches"`
	// CheckpointInterval: every stage writes a checkpoint every CheckpointInterval
	// steps (0: none by count). CheckpointSeconds: and when that many seconds have
	// passed since the last one (0: none by time; default DefaultCheckpointSeconds);
	// a launcher turns the time into a step, so that every stage checkpoints the same
	// one. Both are apart from evaluation; the last step is always checkpointed.
	CheckpointInterval int `yaml:"checkpoint_interval"`
	CheckpointSeconds  int `yaml:"checkpoint_seconds"`
	// Export says whether the trained model may be assembled from its stages:
	// "allowed" (the launcher collects every stage's final weights into
	// model.safetensors where each node consents), or "never" (the default: a protocol
	// model, whose weights stay on the nodes that trained them).
	Export      string      `yaml:"export"`
	Model       Model       `yaml:"model"`
	Pipeline    Pipeline    `yaml:"pipeline"`
	Train       Train       `yaml:"train"`
	Data        Data        `yaml:"data"`
	Compression Compression `yaml:"compression"`
	DiLoCo      DiLoCo      `yaml:"diloco"`

	// src remembers where each field was written so that Validate can point at the line, and
	// so that EnsureDefaults leaves alone a zero the file asked for (grad_clip: 0 disables
	// clipping; it must not become the default 1.0).
	src source
	// notes say what Parse changed in the file's values (see Notes).
	notes []string
}

// Precisions are the values model.precision takes.
var Precisions = []string{"fp32", "bf16"}

// Model is the shape of the transformer.
type Model struct {
	Vocab     int     `yaml:"vocab"` // default 256 (byte-level)
	DModel    int     `yaml:"d_model"`
	NLayers   int     `yaml:"n_layers"`
	NHeads    int     `yaml:"n_heads"`
	DFF       int     `yaml:"d_ff"`
	SeqLen    int     `yaml:"seq_len"`
	RopeTheta float64 `yaml:"rope_theta"` // default 10000
	NormEps   float64 `yaml:"norm_eps"`   // default 1e-5
	// Precision is what the stages compute in: fp32 (the cpu32 backend) or bf16 (GEMM
	// inputs in bfloat16 with float32 accumulation, everything else and the weights,
	// optimiser state and checkpoints float32). Default fp32.
	Precision string `yaml:"precision"`
	// Recompute makes each stage keep only its input per micro-batch in flight and run its
	// blocks' forward again in backward: activation memory of one micro-batch instead of
	// one per micro-batch in flight, for about a third more compute. The gradients are
	// the same, bit for bit. Default false.
	Recompute bool `yaml:"recompute"`
}

// Pipeline is how the model is cut into stages and a step into micro-batches.
type Pipeline struct {
	Stages       int `yaml:"stages"`        // default 1
	MicroBatches int `yaml:"micro_batches"` // micro-batches per step, default 1; batch_size must divide by it
	// InFlight bounds the forwards a stage runs ahead of their backwards (one activation
	// tape each). 0 (default) is the one-forward-one-backward bound, stages − stage,
	// which holds least memory; up to micro_batches lets every forward go as soon as its
	// input arrives, so over slow links a stage does not wait a round trip for a
	// gradient before its next forward. The arithmetic is the same either way.
	InFlight int `yaml:"in_flight,omitempty"`
	// Schedule is sync (empty means sync): every step ends when the last micro-batch's
	// backward is back and the stages step together; or async: no stage waits for the
	// pipeline to drain, each applies an update after every micro_batches backwards,
	// so its forwards and backwards run on weights a fixed number of updates old (the
	// schedule's delay, handled as train.delay says). In async, in_flight bounds the
	// forwards stage 0 runs ahead of its backwards (0: stages), and the stages after it
	// proportionally fewer, down to one at the last; it may exceed micro_batches (the
	// forwards then span updates), which covers a longer round trip with work at the
	// price of a longer delay.
	Schedule string `yaml:"schedule,omitempty"`
	// StaffTimeout is how many seconds a launcher waits for enough peers to hold
	// every stage before it gives up; default 60.
	StaffTimeout int `yaml:"staff_timeout"`
	// PauseTimeout is how many seconds a launcher keeps a run paused when a stage has
	// no live node (its only node, or every replica's, died or stalled): it waits for
	// the nodes to come back and resumes from the newest step every stage checkpointed.
	// Default 600; 0 fails the run at once.
	PauseTimeout int `yaml:"pause_timeout"`
	// Replicas is how many replica pipelines train side by side (default 1). Replica r
	// of stage s feeds replica r of stage s+1, reads its own shard of the training text,
	// and its stages sync with the other replicas of their stage every diloco.inner_steps.
	// train.batch_size is per replica pipeline.
	Replicas int `yaml:"replicas"`
}

// DiLoCo is how the replicas of a stage agree on weights: each trains alone for
// InnerSteps, then the averaged change (global − local) is the gradient of an outer
// SGD step with momentum on the global weights. Inert with one replica.
type DiLoCo struct {
	InnerSteps    int     `yaml:"inner_steps"`    // H: inner steps between outer steps
	OuterLR       float64 `yaml:"outer_lr"`       // outer learning rate
	OuterMomentum float64 `yaml:"outer_momentum"` // outer momentum in [0, 1)
	Nesterov      bool    `yaml:"nesterov"`       // Nesterov momentum (default true)
	// Sync is the codec of the pseudo-gradient on the wire: fp32, bf16, int8/BLOCK or
	// int4/BLOCK, each optionally +zstd; lossy codecs keep error feedback per replica.
	Sync string `yaml:"sync"`
	// Fragments splits each stage's parameters into F parts whose outer steps are
	// staggered over the H inner steps (Streaming DiLoCo), so each sync moves 1/F of
	// the stage; with F > 1 each all-reduce also overlaps the next inner step. 1 syncs
	// everything at once.
	Fragments int `yaml:"fragments"`
	// WarmupSteps is how many first inner steps sync after every step (outer step
	// with H = 1) before the H-step rhythm starts: replicas that start from the same
	// weights drift apart fastest at the start.
	WarmupSteps int `yaml:"warmup_steps"`
}

// Train is the inner optimiser (AdamW) and its schedule.
type Train struct {
	BatchSize   int     `yaml:"batch_size"` // sequences per optimiser step
	Steps       int     `yaml:"steps"`
	LR          float64 `yaml:"lr"`
	MinLR       float64 `yaml:"min_lr"` // default lr/10
	Warmup      int     `yaml:"warmup"`
	WeightDecay float64 `yaml:"weight_decay"` // default 0.1
	GradClip    float64 `yaml:"grad_clip"`    // default 1.0; 0 disables
	Beta1       float64 `yaml:"beta1"`        // default 0.9
	Beta2       float64 `yaml:"beta2"`        // default 0.95
	// Delay is how an async pipeline's stages handle their weight delay: none (the
	// backward runs on the current weights), stash (on the weights its forward used)
	// or nesterov (stash, and a NAdam update whose momentum grows with the stage's
	// delay). Only with pipeline.schedule: async; default DefaultDelay there.
	Delay string `yaml:"delay,omitempty"`
}

// Data is where the training text comes from.
type Data struct {
	// Path is a text file, a directory of text files, a .jsonl file, a glob of those, or
	// a dataset 'pipeswarm data prepare' wrote (its directory or manifest.json); empty =
	// the built-in default corpus.
	Path        string  `yaml:"path"`
	ValFraction float64 `yaml:"val_fraction"` // default 0.1; not used with val_path
	// ValPath, if set, is the validation text (any form Path takes; prepared when Path
	// is): the run trains on all of Path and evaluates on this. A prepared Path needs it.
	ValPath string `yaml:"val_path,omitempty"`
	// TextField is the field of .jsonl records that holds the text; empty = "text".
	TextField string `yaml:"text_field,omitempty"`
	// Tokenizer is "bytes" (or empty: a token is a byte) or the path of a Hugging Face
	// tokenizer.json of the byte-level BPE kind; model.vocab then defaults to its size.
	Tokenizer string `yaml:"tokenizer,omitempty"`
}

// ByteLevel reports whether tokens are bytes (no tokenizer file).
func (d Data) ByteLevel() bool { return d.Tokenizer == "" || d.Tokenizer == "bytes" }

// TokenizerName is "bytes" or the tokenizer's path, for logs.
func (d Data) TokenizerName() string {
	if d.ByteLevel() {
		return "bytes"
	}
	return d.Tokenizer
}

// MaxVocab bounds model.vocab: token ids are int32 on the wire, and a vocabulary far
// beyond the largest in use (Llama 3's 128,256, Gemma's 262,144) is a mistake.
const MaxVocab = 1 << 20

// Compression is what crosses a stage boundary: the residual subspace the model is
// constrained to (Pluralis protocol models) and the wire codecs on top.
type Compression struct {
	// Subspace is the rank k of the shared residual subspace; 0 leaves the model dense.
	// With it, a boundary carries k numbers per token (plus the token id) each way.
	Subspace int `yaml:"subspace"`
	// DenseTail is how many of the last layers write outside the subspace (they must
	// all be in the last stage, after every boundary); it matters at small width.
	DenseTail int `yaml:"dense_tail"`
	// Activations and Gradients are the wire codecs forward and backward: fp32, bf16,
	// int8 or int4 with per-block scales ("int8/32"), each optionally "+zstd". Default fp32.
	Activations string `yaml:"activations"`
	Gradients   string `yaml:"gradients"`
}

// source is where a spec came from. The map is written only while parsing and shared
// read-only by clones.
type source struct {
	file  string
	lines map[string]int // field path ("model.n_heads") -> line of its key
}

func (src source) written(path string) bool {
	_, ok := src.lines[path]
	return ok
}

// Due reports whether fragment f of a stage takes an outer step after inner step
// step of a run of steps: every step during the warmup, then when step%H reaches the
// fragment's offset ((f+1)·H/F mod H, so the last fragment syncs at multiples of H and
// the others are spread evenly before it), and always after the last step, so a run
// ends on global weights.
func (o DiLoCo) Due(f, step, steps int) bool {
	if step <= o.WarmupSteps || step == steps {
		return true
	}
	h := o.InnerSteps
	return step%h == (f+1)*h/o.Fragments%h
}

// Overlapped reports whether outer steps overlap the next inner step (Streaming
// DiLoCo, with more than one fragment): an outer step due after step s (other than
// the last) starts its all-reduce then and is applied after step s+1.
func (o DiLoCo) Overlapped() bool { return o.Fragments > 1 }

// SyncAt reports whether a stage has outer-step work after step: one due, or with
// overlap one begun after the step before to apply.
func (o DiLoCo) SyncAt(step, steps int) bool {
	return o.AnyDue(step, steps) || (o.Overlapped() && step > 1 && step-1 < steps && o.AnyDue(step-1, steps))
}

// AnyDue reports whether some fragment takes an outer step after step.
func (o DiLoCo) AnyDue(step, steps int) bool {
	for f := range o.Fragments {
		if o.Due(f, step, steps) {
			return true
		}
	}
	return false
}

// HeadDim is the width of one attention head, d_model/n_heads (0 if n_heads is not set).
func (m Model) HeadDim() int {
	if m.NHeads <= 0 {
		return 0
	}
	return m.DModel / m.NHeads
}

// TokensPerStep is the number of tokens in one optimiser step: batch_size * seq_len.
func (s *Spec) TokensPerStep() int {
	return s.Train.BatchSize * s.Model.SeqLen
}

// Load reads the spec file at path and parses it with Parse.
func Load(path string) (*Spec, error) {
	src, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load spec: %w", err)
	}
	return Parse(src, path)
}

// Parse decodes a spec from YAML, fills defaults and validates it. name is used in error
// messages ("tiny.yaml:7: model.n_heads: ..."). Unknown fields are errors. All problems
// found are returned together, joined with errors.Join.
func Parse(src []byte, name string) (*Spec, error) {
	d := decoder{file: name, what: "spec", lines: map[string]int{}, failed: map[string]bool{}}
	s := &Spec{}
	root, err := d.document(src)
	if err != nil {
		return nil, err
	}
	d.mapping(root, "", "", fieldsOf(s))
	s.src = source{file: name, lines: d.lines}
	s.EnsureDefaults()
	errs := d.errs
	if was, now, ok := s.FitWarmup(); ok && !d.failedAt("train.warmup") && !d.failedAt("train.steps") {
		s.notes = append(s.notes, (&fieldError{file: name, line: d.lines["train.warmup"], field: "train.warmup",
			msg: fmt.Sprintf("%d is not less than train.steps %d; shortened to %d (a tenth of the steps; set train.warmup below train.steps to choose it)", was, s.Train.Steps, now)}).Error())
	}
	// A field that failed to decode holds a zero; complaining that it is not positive as well
	// would only repeat the decode error.
	for _, e := range s.problems() {
		if !d.failedAt(e.(*fieldError).field) {
			errs = append(errs, e)
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return s, nil
}

// DecodeStrict decodes the single YAML document src into the struct ptr points to, the way
// Parse reads a spec, for other files that want the same strictness (the node config).
// Fields are matched by their yaml tags; the kinds understood are string, int, uint64,
// float64, bool, []string and nested structs. Unknown and repeated fields, values of the
// wrong type and malformed YAML are errors of the form "name:line: field: message", all
// found returned joined, each wrapping ErrDecode. A field written with no value ("mdns:")
// is left as it was. what names the document in errors about its shape ("empty node
// config").
//
// It returns the line of each field's key by dotted path ("listen"), and of each list item
// as "listen[0]", so that the caller's own validation can point at the line too.
func DecodeStrict(src []byte, name, what string, ptr any) (map[string]int, error) {
	d := decoder{file: name, what: what, lines: map[string]int{}, failed: map[string]bool{}}
	root, err := d.document(src)
	if err != nil {
		return d.lines, err
	}
	d.mapping(root, "", "", fieldsOf(ptr))
	return d.lines, errors.Join(d.errs...)
}

// EnsureDefaults fills the fields that are zero and were not written in the spec file with
// their defaults. A zero written in the file is kept, so "grad_clip: 0" disables clipping;
// for a spec built in Go, set such zeros after calling EnsureDefaults.
func (s *Spec) EnsureDefaults() {
	unset := func(path string, zero bool) bool { return zero && !s.src.written(path) }
	m, p, t, d := &s.Model, &s.Pipeline, &s.Train, &s.Data
	if unset("eval_batches", s.EvalBatches == 0) {
		s.EvalBatches = DefaultEvalBatches
	}
	if unset("checkpoint_seconds", s.CheckpointSeconds == 0) {
		s.CheckpointSeconds = DefaultCheckpointSeconds
	}
	if s.Export == "" && !s.src.written("export") {
		s.Export = ExportNever
	}
	if unset("model.vocab", m.Vocab == 0) {
		m.Vocab = 256 // byte-level tokens
	}
	if unset("model.rope_theta", m.RopeTheta == 0) {
		m.RopeTheta = 10000
	}
	if unset("model.norm_eps", m.NormEps == 0) {
		m.NormEps = 1e-5
	}
	if m.Precision == "" && !s.src.written("model.precision") {
		m.Precision = "fp32"
	}
	if unset("pipeline.stages", p.Stages == 0) {
		p.Stages = 1
	}
	if unset("pipeline.staff_timeout", p.StaffTimeout == 0) {
		p.StaffTimeout = 60
	}
	if unset("pipeline.pause_timeout", p.PauseTimeout == 0) {
		p.PauseTimeout = 600
	}
	if s.Compression.Activations == "" {
		s.Compression.Activations = "fp32"
	}
	if s.Compression.Gradients == "" {
		s.Compression.Gradients = "fp32"
	}
	if unset("pipeline.micro_batches", p.MicroBatches == 0) {
		p.MicroBatches = 1
	}
	if unset("pipeline.replicas", p.Replicas == 0) {
		p.Replicas = 1
	}
	o := &s.DiLoCo
	if unset("diloco.inner_steps", o.InnerSteps == 0) {
		o.InnerSteps = DefaultInnerSteps
	}
	if unset("diloco.outer_lr", o.OuterLR == 0) {
		o.OuterLR = DefaultOuterLR
	}
	if unset("diloco.outer_momentum", o.OuterMomentum == 0) {
		o.OuterMomentum = DefaultOuterMomentum
	}
	if unset("diloco.nesterov", !o.Nesterov) {
		o.Nesterov = true
	}
	if o.Sync == "" {
		o.Sync = DefaultSync
	}
	if unset("diloco.fragments", o.Fragments == 0) {
		o.Fragments = 1
	}
	// Without a usable lr there is nothing to take a tenth of; Validate reports the lr.
	if unset("train.min_lr", t.MinLR == 0) && t.LR > 0 && !math.IsInf(t.LR, 1) {
		t.MinLR = t.LR / 10
	}
	if unset("train.weight_decay", t.WeightDecay == 0) {
		t.WeightDecay = 0.1
	}
	if unset("train.grad_clip", t.GradClip == 0) {
		t.GradClip = 1.0
	}
	if unset("train.beta1", t.Beta1 == 0) {
		t.Beta1 = 0.9
	}
	if unset("train.beta2", t.Beta2 == 0) {
		t.Beta2 = 0.95
	}
	// A sync run's spec keeps its text as it was without these fields.
	if p.Async() && t.Delay == "" && !s.src.written("train.delay") {
		t.Delay = DefaultDelay
	}
	if unset("data.val_fraction", d.ValFraction == 0) {
		d.ValFraction = 0.1
	}
}

// FitWarmup shortens a warmup that does not fit in the run, train.warmup not less than
// train.steps, to a tenth of the steps, as shortening a run (a quick try of a long
// spec) should just work. It returns the warmup before and after, and whether it
// changed. Parse applies it to the file's values and says so in Notes; a command
// that overrides train.steps applies it again.
func (s *Spec) FitWarmup() (was, now int, changed bool) {
	t := &s.Train
	if t.Steps < 1 || t.Warmup < t.Steps {
		return t.Warmup, t.Warmup, false
	}
	was, t.Warmup = t.Warmup, t.Steps/10
	return was, t.Warmup, true
}

// Notes are what Parse changed in the values the file gave, one sentence each naming
// the file, line and field (a warmup longer than the run, shortened): for the
// caller to tell the user.
func (s *Spec) Notes() []string { return slices.Clone(s.notes) }

// CheckTokenizer loads the tokenizer data.tokenizer names, if any, and sizes the model
// for it: model.vocab, when the spec does not set it, becomes the tokenizer's vocabulary
// size; when it does, it must be at least that. A tokenizer that is missing or cannot be
// followed exactly is refused with the file and line of the field.
func (s *Spec) CheckTokenizer() (*tokenizer.Tokenizer, error) {
	if s.Data.ByteLevel() {
		return nil, nil
	}
	tk, err := tokenizer.Load(s.Data.Tokenizer)
	if err != nil {
		return nil, &fieldError{file: s.src.file, line: s.src.lines["data.tokenizer"], field: "data.tokenizer", kind: ErrInvalid, cause: err,
			msg: fmt.Sprintf("%v; want the path of a Hugging Face tokenizer.json of the byte-level BPE kind ('pipeswarm tokenizer train' makes one), or bytes", err)}
	}
	switch n := tk.VocabSize(); {
	case !s.src.written("model.vocab"):
		s.Model.Vocab = n
	case s.Model.Vocab < n:
		return nil, &fieldError{file: s.src.file, line: s.src.lines["model.vocab"], field: "model.vocab", kind: ErrInvalid,
			msg: fmt.Sprintf("%d is smaller than the %d tokens of data.tokenizer %s; leave it out to use the tokenizer's size", s.Model.Vocab, n, s.Data.Tokenizer)}
	}
	return tk, nil
}

// CheckData reports whether data.path (and data.val_path) name text that exists: a
// file, a directory, a glob that matches, or a prepared dataset whose manifest reads (an
// empty path, the built-in corpus, always does). A run whose text is missing is refused
// before anything else is done, with the file and line of the field. A prepared
// data.path needs a prepared data.val_path, a tokenizer it names must be the one the
// shards were made with, and model.vocab (when the spec leaves it out) becomes the
// dataset's vocabulary size.
func (s *Spec) CheckData() error {
	d := &s.Data
	if err := s.checkPath("data.path", d.Path); err != nil {
		return err
	}
	if d.ValPath != "" {
		if err := s.checkPath("data.val_path", d.ValPath); err != nil {
			return err
		}
	}
	prepared, valPrepared := d.Prepared(), d.ValPath != "" && data.IsPrepared(d.ValPath)
	switch {
	case prepared && d.ValPath == "":
		return &fieldError{file: s.src.file, line: s.src.lines["data.path"], field: "data.val_path", kind: ErrInvalid,
			msg: fmt.Sprintf("missing: data.path %q is a prepared dataset, which needs validation shards; prepare them with 'pipeswarm data prepare --out DIR' from held-out text and set data.val_path: DIR", d.Path)}
	case prepared != valPrepared && d.ValPath != "":
		return s.dataErr("data.val_path", nil, fmt.Sprintf("%q: data.path and data.val_path must both be prepared datasets or both be text", d.ValPath))
	case !prepared:
		return nil
	}
	m, _, err := data.ReadManifest(d.Path)
	if err != nil {
		return s.dataErr("data.path", err, fmt.Sprintf("%q: %v", d.Path, err))
	}
	vm, _, err := data.ReadManifest(d.ValPath)
	if err != nil {
		return s.dataErr("data.val_path", err, fmt.Sprintf("%q: %v", d.ValPath, err))
	}
	if vm.TokenizerSHA256 != m.TokenizerSHA256 || vm.Vocab != m.Vocab {
		return s.dataErr("data.val_path", nil, fmt.Sprintf("%q was prepared with tokenizer %s (%d tokens), data.path with %s (%d tokens); prepare both with the same --tokenizer",
			d.ValPath, vm.Tokenizer, vm.Vocab, m.Tokenizer, m.Vocab))
	}
	if !d.ByteLevel() {
		raw, err := os.ReadFile(d.Tokenizer)
		if err != nil {
			return s.dataErr("data.tokenizer", err, fmt.Sprintf("%q: %v", d.Tokenizer, err))
		}
		if sum := sha256.Sum256(raw); hex.EncodeToString(sum[:]) != m.TokenizerSHA256 {
			return s.dataErr("data.tokenizer", nil, fmt.Sprintf("%q is not the tokenizer data.path %q was prepared with (%s, sha256 %.12s); name that one, or leave data.tokenizer out", d.Tokenizer, d.Path, m.Tokenizer, m.TokenizerSHA256))
		}
	} else if m.TokenizerSHA256 != "" && d.Tokenizer == "bytes" {
		return s.dataErr("data.tokenizer", nil, fmt.Sprintf("bytes, but data.path %q holds the ids of tokenizer %s; name that tokenizer.json or leave data.tokenizer out", d.Path, m.Tokenizer))
	}
	switch {
	case !s.src.written("model.vocab"):
		s.Model.Vocab = m.Vocab
	case s.Model.Vocab < m.Vocab:
		return s.dataErr("model.vocab", nil, fmt.Sprintf("%d is smaller than the %d tokens data.path %q was prepared with; leave it out to use that size", s.Model.Vocab, m.Vocab, d.Path))
	}
	return nil
}

// Prepared reports whether data.path is a dataset 'pipeswarm data prepare' wrote.
func (d Data) Prepared() bool { return d.Path != "" && data.IsPrepared(d.Path) }

func (s *Spec) dataErr(field string, cause error, msg string) error {
	return &fieldError{file: s.src.file, line: s.src.lines[field], field: field, kind: ErrInvalid, cause: cause, msg: msg}
}

func (s *Spec) checkPath(field, path string) error {
	if path == "" {
		if field == "data.path" {
			return nil
		}
	}
	var err error
	if data.IsGlob(path) {
		_, err = data.Glob(path)
	} else {
		_, err = os.Stat(path)
	}
	if err == nil {
		return nil
	}
	why := err
	var pe *fs.PathError
	if errors.As(err, &pe) {
		why = pe.Err
	}
	return s.dataErr(field, err, fmt.Sprintf("%q: %v; want a text file, a directory of text files, a .jsonl file, a glob of those, or a directory 'pipeswarm data prepare' wrote (a relative path is read from the directory the command runs in), or \"\" for the built-in corpus", path, why))
}

// Clone returns a copy of s that shares nothing mutable with it.
func (s *Spec) Clone() *Spec {
	c := *s
	c.notes = slices.Clone(s.notes)
	return &c
}

// Marshal returns the spec as YAML, every field included, so that a run can record the
// exact configuration it used. Parse(Marshal(s)) gives back s.
func (s *Spec) Marshal() ([]byte, error) { return EncodeYAML(s) }

// EncodeYAML writes v as YAML indented by two spaces, every field included: the text
// form of the plain config structs (this spec, a node's config) that runs record.
func EncodeYAML(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(v); err != nil {
		return nil, fmt.Errorf("encode YAML: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("encode YAML: %w", err)
	}
	return buf.Bytes(), nil
}

// FieldProblem is an error about one field of a YAML document, printed as
// "file:line: field: msg" (file and line left out where unknown) and wrapping kind.
// Other strict YAML configs built on DecodeStrict report their problems with it.
func FieldProblem(file string, line int, field, msg string, kind error) error {
	return &fieldError{file: file, line: line, field: field, msg: msg, kind: kind}
}

// String returns the same text as Marshal.
func (s *Spec) String() string {
	b, err := s.Marshal()
	if err != nil {
		return "<" + err.Error() + ">"
	}
	return string(b)
}
