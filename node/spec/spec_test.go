package spec

import (
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

// base is a valid spec with every field written, one per line, so that tests can change one
// value and know its line.
const base = `name: t
seed: 7
eval_interval: 100
model:
  vocab: 256
  d_model: 128
  n_layers: 4
  n_heads: 4
  d_ff: 352
  seq_len: 128
  rope_theta: 10000
  norm_eps: 1e-5
pipeline:
  stages: 2
  micro_batches: 2
  in_flight: 0
  staff_timeout: 30
  replicas: 1
train:
  batch_size: 16
  steps: 1000
  lr: 0.002
  min_lr: 0.0002
  warmup: 100
  weight_decay: 0.1
  grad_clip: 1.0
  beta1: 0.9
  beta2: 0.95
data:
  path: ""
  val_fraction: 0.1
diloco:
  inner_steps: 30
  outer_lr: 0.7
  outer_momentum: 0.9
  nesterov: true
  sync: int8/32
  fragments: 1
  warmup_steps: 0
`

// edit returns base with the value of the field at path replaced, and the field's line.
func edit(t *testing.T, path, value string) ([]byte, int) {
	t.Helper()
	section, name, nested := strings.Cut(path, ".")
	if !nested {
		section, name = "", section
	}
	lines := strings.Split(base, "\n")
	current := ""
	for i, l := range lines {
		indent := ""
		if strings.HasPrefix(l, "  ") {
			indent = "  "
		} else {
			current, _, _ = strings.Cut(l, ":")
		}
		key, _, _ := strings.Cut(strings.TrimSpace(l), ":")
		if key == name && (indent == "" && section == "" || indent != "" && current == section) {
			lines[i] = indent + name + ": " + value
			return []byte(strings.Join(lines, "\n")), i + 1
		}
	}
	t.Fatalf("no field %s in base spec", path)
	return nil, 0
}

// without returns base with the field at path removed.
func without(t *testing.T, path string) []byte {
	t.Helper()
	src, line := edit(t, path, "x")
	lines := strings.Split(string(src), "\n")
	return []byte(strings.Join(append(lines[:line-1:line-1], lines[line:]...), "\n"))
}

func mustParse(t *testing.T, src []byte) *Spec {
	t.Helper()
	s, err := Parse(src, "t.yaml")
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return s
}

// fields returns the spec's exported fields only, for comparing specs from different sources.
func fields(s *Spec) Spec {
	c := *s
	c.src = source{}
	return c
}

func TestExamplesParseAndValidate(t *testing.T) {
	paths, err := filepath.Glob("../../examples/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]*Spec{}
	for _, p := range paths {
		if strings.HasPrefix(filepath.Base(p), "node") {
			continue // a node config (node/config tests it), not a run spec
		}
		s, err := Load(p)
		if err != nil {
			t.Errorf("Load(%s): %v", p, err)
			continue
		}
		if err := s.Validate(); err != nil {
			t.Errorf("%s: Validate: %v", p, err)
		}
		got[filepath.Base(p)] = s
	}
	tiny := Spec{
		Name: "tiny", Seed: 1, EvalInterval: 200, EvalBatches: DefaultEvalBatches, Export: ExportAllowed,
		CheckpointSeconds: DefaultCheckpointSeconds,
		Model: Model{Vocab: 256, DModel: 128, NLayers: 4, NHeads: 4, DFF: 352, SeqLen: 128,
			RopeTheta: 10000, NormEps: 1e-5, Precision: "fp32"},
		Pipeline: Pipeline{Stages: 1, MicroBatches: 1, StaffTimeout: 60, PauseTimeout: 600, Replicas: 1},
		Train: Train{BatchSize: 16, Steps: 2000, LR: 0.002, MinLR: 0.0002, Warmup: 100,
			WeightDecay: 0.1, GradClip: 1.0, Beta1: 0.9, Beta2: 0.95},
		Data:        Data{Path: "", ValFraction: 0.1},
		Compression: Compression{Activations: "fp32", Gradients: "fp32"},
		DiLoCo:      defaultDiLoCo,
	}
	small := tiny
	small.Name, small.EvalInterval = "small", 250
	small.Model.NLayers, small.Model.DModel, small.Model.DFF = 8, 256, 688
	small.Train.Steps, small.Train.LR, small.Train.MinLR, small.Train.Warmup = 3000, 0.0015, 0.00015, 150
	for name, want := range map[string]Spec{"tiny.yaml": tiny, "small.yaml": small} {
		s, ok := got[name]
		if !ok {
			t.Errorf("examples/%s is missing or does not load", name)
			continue
		}
		if !reflect.DeepEqual(fields(s), want) {
			t.Errorf("examples/%s:\n%v\nwant:\n%v", name, s, &want)
		}
	}
}

func TestMarshalRoundTripsParsedSpec(t *testing.T) {
	s := mustParse(t, []byte(base))
	text, err := s.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	back := mustParse(t, text)
	if !reflect.DeepEqual(fields(back), fields(s)) {
		t.Errorf("round trip changed the spec:\n%s\nbecame:\n%s", s, back)
	}
	if s.String() != string(text) {
		t.Errorf("String differs from Marshal")
	}
}

func TestMarshalRoundTripsZerosAndExtremes(t *testing.T) {
	s := &Spec{
		Name: "edge.case_1", Seed: math.MaxUint64, EvalInterval: 0,
		Model:    Model{DModel: 96, NLayers: 3, NHeads: 3, DFF: 1, SeqLen: 1, RopeTheta: 1e20, NormEps: 1e-300},
		Pipeline: Pipeline{Stages: 3, MicroBatches: 5},
		Train:    Train{BatchSize: 5, Steps: 1, LR: 0.1 + 0.2, Warmup: 0, Beta1: 0.999999},
		Data:     Data{Path: "dir with spaces/\"quoted\"\n.jsonl"},
	}
	s.EnsureDefaults()
	// Zeros set after EnsureDefaults are values, not requests for defaults, and must survive.
	s.Train.GradClip, s.Train.WeightDecay, s.Train.MinLR, s.Train.Beta2 = 0, 0, 0, 0
	if err := s.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	back := mustParse(t, []byte(s.String()))
	if !reflect.DeepEqual(fields(back), fields(s)) {
		t.Errorf("round trip changed the spec:\n%s\nbecame:\n%s", s, back)
	}
}

func TestWrittenZeroIsKeptAndMissingFieldGetsDefault(t *testing.T) {
	src, _ := edit(t, "train.grad_clip", "0")
	src = []byte(strings.Replace(string(src), "  weight_decay: 0.1\n", "", 1))
	src = []byte(strings.Replace(string(src), "  min_lr: 0.0002\n", "  min_lr: 0\n", 1))
	src = []byte(strings.Replace(string(src), "  lr: 0.002\n", "  lr: 0.003\n", 1))
	s := mustParse(t, src)
	if s.Train.GradClip != 0 {
		t.Errorf("grad_clip: 0 became %v", s.Train.GradClip)
	}
	if s.Train.MinLR != 0 {
		t.Errorf("min_lr: 0 became %v", s.Train.MinLR)
	}
	if s.Train.WeightDecay != 0.1 {
		t.Errorf("missing weight_decay = %v, want default 0.1", s.Train.WeightDecay)
	}

	pause := func(v string) []byte {
		return []byte(strings.Replace(base, "  staff_timeout: 30\n", "  staff_timeout: 30\n  pause_timeout: "+v+"\n", 1))
	}
	if s = mustParse(t, pause("0")); s.Pipeline.PauseTimeout != 0 {
		t.Errorf("pause_timeout: 0 became %d; 0 is how a run fails at once", s.Pipeline.PauseTimeout)
	}
	if s = mustParse(t, []byte(base)); s.Pipeline.PauseTimeout != 600 {
		t.Errorf("missing pause_timeout = %d, want default 600", s.Pipeline.PauseTimeout)
	}
	if _, err := Parse(pause("-5"), "t.yaml"); err == nil || !strings.Contains(err.Error(), "t.yaml:18: pipeline.pause_timeout: -5 is negative") {
		t.Errorf("pause_timeout: -5: %v; want it named with its line", err)
	}

	s = mustParse(t, without(t, "train.min_lr"))
	if s.Train.MinLR != s.Train.LR/10 {
		t.Errorf("missing min_lr = %v, want lr/10 = %v", s.Train.MinLR, s.Train.LR/10)
	}
}

var defaultDiLoCo = DiLoCo{InnerSteps: DefaultInnerSteps, OuterLR: DefaultOuterLR, OuterMomentum: DefaultOuterMomentum,
	Nesterov: true, Sync: DefaultSync, Fragments: 1}

func TestEnsureDefaultsFillsZeroFieldsOfGoSpec(t *testing.T) {
	s := &Spec{Train: Train{LR: 0.01}}
	s.EnsureDefaults()
	want := Spec{
		EvalBatches: DefaultEvalBatches, Export: ExportNever, CheckpointSeconds: DefaultCheckpointSeconds,
		Model:       Model{Vocab: 256, RopeTheta: 10000, NormEps: 1e-5, Precision: "fp32"},
		Pipeline:    Pipeline{Stages: 1, MicroBatches: 1, StaffTimeout: 60, PauseTimeout: 600, Replicas: 1},
		Train:       Train{LR: 0.01, MinLR: 0.001, WeightDecay: 0.1, GradClip: 1, Beta1: 0.9, Beta2: 0.95},
		Data:        Data{ValFraction: 0.1},
		Compression: Compression{Activations: "fp32", Gradients: "fp32"},
		DiLoCo:      defaultDiLoCo,
	}
	if !reflect.DeepEqual(*s, want) {
		t.Errorf("after EnsureDefaults:\n%s\nwant:\n%s", s, &want)
	}
}

func TestValidateNamesFieldLineAndValue(t *testing.T) {
	for _, tc := range []struct {
		path, value string
		blame       string // field named in the error; path if empty
		want        string
	}{
		{path: "name", value: `""`, want: `"" is empty`},
		{path: "name", value: `"my run"`, want: `"my run" must be`},
		{path: "eval_interval", value: "-1", want: "-1 is negative"},
		{path: "model.vocab", value: "1", want: "1 is outside [2, 1048576]"},
		{path: "model.vocab", value: "1048577", want: "1048577 is outside [2, 1048576]"},
		{path: "model.vocab", value: "0", want: "0 is outside"},
		{path: "model.d_model", value: "0", want: "0 is not positive"},
		{path: "model.n_layers", value: "-2", want: "-2 is not positive"},
		{path: "model.n_heads", value: "0", want: "0 is not positive"},
		{path: "model.n_heads", value: "3", want: "3 does not divide d_model 128"},
		{path: "model.n_heads", value: "128", want: "head dim d_model/n_heads = 128/128 = 1 is odd"},
		{path: "model.d_ff", value: "0", want: "0 is not positive"},
		{path: "model.seq_len", value: "-1", want: "-1 is not positive"},
		{path: "model.rope_theta", value: "-1", want: "-1 is not positive"},
		{path: "model.rope_theta", value: ".inf", want: "+Inf is not a finite number"},
		{path: "model.norm_eps", value: "0", want: "0 is not positive"},
		{path: "pipeline.stages", value: "0", want: "0 is less than 1"},
		{path: "pipeline.stages", value: "5", want: "5 exceeds n_layers 4"},
		{path: "pipeline.micro_batches", value: "0", want: "0 is not positive"},
		{path: "pipeline.staff_timeout", value: "-1", want: "-1 is not positive"},
		{path: "pipeline.in_flight", value: "-1", want: "-1 is negative"},
		{path: "pipeline.in_flight", value: "3", want: "3 exceeds micro_batches 2"},
		{path: "pipeline.micro_batches", value: "3", blame: "train.batch_size", want: "16 is not divisible by micro_batches 3"},
		{path: "train.batch_size", value: "0", want: "0 is not positive"},
		{path: "train.batch_size", value: "15", want: "15 is not divisible by micro_batches 2"},
		{path: "train.steps", value: "0", want: "0 is not positive"},
		{path: "train.lr", value: "0", want: "0 is not positive"},
		{path: "train.lr", value: "-0.1", want: "-0.1 is not positive"},
		{path: "train.lr", value: ".nan", want: "NaN is not a finite number"},
		{path: "train.min_lr", value: "-0.1", want: "-0.1 is negative"},
		{path: "train.min_lr", value: "0.01", want: "0.01 exceeds lr 0.002"},
		{path: "train.warmup", value: "-1", want: "-1 is negative"},
		{path: "train.weight_decay", value: "-0.1", want: "-0.1 is negative"},
		{path: "train.grad_clip", value: "-1", want: "-1 is negative"},
		{path: "train.beta1", value: "1", want: "1 is outside [0, 1)"},
		{path: "train.beta1", value: "-0.5", want: "-0.5 is outside [0, 1)"},
		{path: "train.beta2", value: "1.5", want: "1.5 is outside [0, 1)"},
		{path: "data.val_fraction", value: "0", want: "0 is outside (0, 1)"},
		{path: "data.val_fraction", value: "1", want: "1 is outside (0, 1)"},
		{path: "pipeline.replicas", value: "0", want: "0 is outside [1, 64]"},
		{path: "pipeline.replicas", value: "65", want: "65 is outside [1, 64]"},
		{path: "pipeline.replicas", value: "2", blame: "eval_interval", want: "100 is not a multiple of diloco.inner_steps 30"},
		{path: "diloco.inner_steps", value: "0", want: "0 is not positive"},
		{path: "diloco.outer_lr", value: "0", want: "0 is not positive"},
		{path: "diloco.outer_lr", value: ".inf", want: "+Inf is not a finite number"},
		{path: "diloco.outer_momentum", value: "1", want: "1 is outside [0, 1)"},
		{path: "diloco.sync", value: "int9", want: `codec "int9": unknown encoding "int9"`},
		{path: "diloco.fragments", value: "0", want: "0 is not positive"},
		{path: "diloco.fragments", value: "31", want: "31 exceeds inner_steps 30"},
		{path: "diloco.warmup_steps", value: "-1", want: "-1 is negative"},
	} {
		t.Run(tc.path+"="+tc.value, func(t *testing.T) {
			src, line := edit(t, tc.path, tc.value)
			blame := tc.path
			if tc.blame != "" {
				_, line = edit(t, tc.blame, "x")
				blame = tc.blame
			}
			_, err := Parse(src, "t.yaml")
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("Parse error = %v, want ErrInvalid", err)
			}
			want := fmt.Sprintf("t.yaml:%d: %s: %s", line, blame, tc.want)
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error:\n%v\nwant it to contain:\n%s", err, want)
			}
		})
	}
}

// A warmup the run's steps do not leave room for is shortened, as --steps shortens it,
// and the spec says so naming the file and line; a spec built in Go is refused.
func TestParseShortensAWarmupLongerThanTheRunAndSaysSo(t *testing.T) {
	src, line := edit(t, "train.warmup", "1000")
	s, err := Parse(src, "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if s.Train.Warmup != 100 {
		t.Errorf("warmup %d, want 100 (a tenth of the 1000 steps)", s.Train.Warmup)
	}
	want := fmt.Sprintf("t.yaml:%d: train.warmup: 1000 is not less than train.steps 1000; shortened to 100", line)
	if n := s.Notes(); len(n) != 1 || !strings.HasPrefix(n[0], want) {
		t.Errorf("notes %q, want one starting %q", n, want)
	}
	if s, err := Parse([]byte(base), "t.yaml"); err != nil || len(s.Notes()) != 0 {
		t.Errorf("a spec that fits: notes %q, err %v; want none", s.Notes(), err)
	}
	g := mustParse(t, []byte(base))
	g.Train.Warmup = g.Train.Steps
	if err := g.Validate(); err == nil || !strings.Contains(err.Error(), "is not less than steps") {
		t.Errorf("Validate of a Go spec with warmup = steps: %v, want a refusal", err)
	}
}

func TestCheckDataNamesTheLineOfAMissingPath(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nothere.txt")
	src, line := edit(t, "data.path", strconv.Quote(missing))
	s, err := Parse(src, "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	err = s.CheckData()
	want := fmt.Sprintf("t.yaml:%d: data.path: %q: no such file or directory; want a text file", line, missing)
	if !errors.Is(err, ErrInvalid) || !errors.Is(err, fs.ErrNotExist) || !strings.HasPrefix(err.Error(), want) {
		t.Errorf("CheckData = %v, want ErrInvalid and fs.ErrNotExist, starting %q", err, want)
	}
	if err := os.WriteFile(missing, []byte("text"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := s.CheckData(); err != nil {
		t.Errorf("CheckData of a file that exists: %v", err)
	}
	if err := mustParse(t, []byte(base)).CheckData(); err != nil {
		t.Errorf("CheckData of the built-in corpus: %v", err)
	}
}

func TestValidateNamesMissingFieldWithoutLine(t *testing.T) {
	_, err := Parse(without(t, "model.n_heads"), "t.yaml")
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("error = %v, want ErrInvalid", err)
	}
	if want := "t.yaml: model.n_heads: missing; want a positive integer"; err.Error() != want {
		t.Errorf("error = %q, want %q", err, want)
	}
}

func TestValidateOfGoSpecNamesFieldOnly(t *testing.T) {
	s := mustParse(t, []byte(base)).Clone()
	s.src = source{}
	s.Model.NHeads = 3
	err := s.Validate()
	if want := "model.n_heads: 3 does not divide d_model 128"; err == nil || err.Error() != want {
		t.Errorf("error = %v, want %q", err, want)
	}
}

func TestValidateReportsEveryProblemOnItsOwnLine(t *testing.T) {
	src, _ := edit(t, "train.lr", "-1")
	src = []byte(strings.Replace(string(src), "  d_ff: 352", "  d_ff: 0", 1))
	_, err := Parse(src, "t.yaml")
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("error = %v, want ErrInvalid", err)
	}
	got := strings.Split(err.Error(), "\n")
	want := []string{"t.yaml:9: model.d_ff: 0 is not positive", "t.yaml:22: train.lr: -1 is not positive"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("errors:\n%q\nwant:\n%q", got, want)
	}
}

func TestUnknownFieldNamesLineSectionAndKnownFields(t *testing.T) {
	src, line := edit(t, "model.d_model", "128\n  d_modle: 128")
	_, err := Parse(src, "t.yaml")
	if !errors.Is(err, ErrDecode) {
		t.Fatalf("error = %v, want ErrDecode", err)
	}
	want := fmt.Sprintf(`t.yaml:%d: unknown field "d_modle" in model (known: vocab, d_model, n_layers, n_heads, d_ff, seq_len, rope_theta, norm_eps, precision, recompute)`, line+1)
	if err.Error() != want {
		t.Errorf("error:\n%v\nwant:\n%s", err, want)
	}

	_, err = Parse([]byte("nmae: x\n"+base), "t.yaml")
	if want := `t.yaml:1: unknown field "nmae" (known: name, seed, eval_interval, eval_batches, checkpoint_interval, checkpoint_seconds, export, model, pipeline, train, data, compression, diloco)`; err == nil || err.Error() != want {
		t.Errorf("error:\n%v\nwant:\n%s", err, want)
	}
}

func TestMalformedYAMLGivesParserLine(t *testing.T) {
	src, line := edit(t, "train.steps", "1000: 3")
	_, err := Parse(src, "t.yaml")
	if !errors.Is(err, ErrDecode) {
		t.Fatalf("error = %v, want ErrDecode", err)
	}
	if prefix := fmt.Sprintf("t.yaml:%d: ", line); !strings.HasPrefix(err.Error(), prefix) {
		t.Errorf("error = %v, want prefix %q", err, prefix)
	}
}

func TestWrongTypeNamesFoundAndExpected(t *testing.T) {
	for _, tc := range []struct{ path, value, want string }{
		{"train.lr", "fast", `train.lr: "fast" is not a number`},
		{"train.lr", `"0.1"`, `train.lr: "0.1" is not a number`},
		{"model.n_heads", "1.5", "model.n_heads: 1.5 is not an integer"},
		{"seed", "-1", "seed: -1 is not a non-negative integer"},
		{"train.beta1", "[0.9]", "train.beta1: expected a number, found a list"},
	} {
		t.Run(tc.path+"="+tc.value, func(t *testing.T) {
			src, line := edit(t, tc.path, tc.value)
			_, err := Parse(src, "t.yaml")
			if !errors.Is(err, ErrDecode) {
				t.Fatalf("error = %v, want ErrDecode", err)
			}
			if want := fmt.Sprintf("t.yaml:%d: %s", line, tc.want); !strings.Contains(err.Error(), want) {
				t.Errorf("error:\n%v\nwant it to contain:\n%s", err, want)
			}
			// The field that failed to decode is zero, but that must not be reported again.
			if n := strings.Count(err.Error(), tc.path+":"); n != 1 {
				t.Errorf("%s reported %d times:\n%v", tc.path, n, err)
			}
		})
	}
}

func TestSectionThatIsNotAMappingIsReportedOnce(t *testing.T) {
	src := strings.Replace(base, "pipeline:\n  stages: 2\n  micro_batches: 2\n  in_flight: 0\n  staff_timeout: 30\n  replicas: 1\n", "pipeline: 2\n", 1)
	_, err := Parse([]byte(src), "t.yaml")
	// pipeline's fields are missing, but that follows from the one mistake.
	want := "t.yaml:13: pipeline: expected a mapping of fields, found the value 2"
	if !errors.Is(err, ErrDecode) || err.Error() != want {
		t.Errorf("error = %v, want %q", err, want)
	}
}

func TestWholeFloatIsAnInteger(t *testing.T) {
	src, _ := edit(t, "train.steps", "1e3")
	if s := mustParse(t, src); s.Train.Steps != 1000 {
		t.Errorf("steps: 1e3 = %d, want 1000", s.Train.Steps)
	}
}

func TestRepeatedFieldIsAnError(t *testing.T) {
	src, line := edit(t, "train.lr", "0.1\n  lr: 0.2")
	_, err := Parse(src, "t.yaml")
	want := fmt.Sprintf("t.yaml:%d: train.lr: repeated; first given at line %d", line+1, line)
	if !errors.Is(err, ErrDecode) || err.Error() != want {
		t.Errorf("error = %v, want %q", err, want)
	}
}

func TestEmptySpecIsAnError(t *testing.T) {
	for _, src := range []string{"", "\n", "# only a comment\n", "---\n", "~\n"} {
		_, err := Parse([]byte(src), "t.yaml")
		if !errors.Is(err, ErrDecode) || err.Error() != "t.yaml: empty spec" {
			t.Errorf("Parse(%q) error = %v, want empty spec", src, err)
		}
	}
}

func TestTopLevelMustBeAMappingInOneDocument(t *testing.T) {
	for src, want := range map[string]string{
		"- 1\n":                    "t.yaml:1: expected a mapping of fields at the top level, found a list",
		base + "---\n" + "name: y": "t.yaml:40: more than one YAML document; a spec is one",
	} {
		_, err := Parse([]byte(src), "t.yaml")
		if !errors.Is(err, ErrDecode) || err.Error() != want {
			t.Errorf("error = %v, want %q", err, want)
		}
	}
}

func TestNullValueMeansMissing(t *testing.T) {
	src, _ := edit(t, "train.weight_decay", "")
	if s := mustParse(t, src); s.Train.WeightDecay != 0.1 {
		t.Errorf("weight_decay: (null) = %v, want default 0.1", s.Train.WeightDecay)
	}
}

func TestCloneIsIndependent(t *testing.T) {
	s := mustParse(t, []byte(base))
	c := s.Clone()
	c.Model.DModel = 64
	c.Name = "other"
	if s.Model.DModel != 128 || s.Name != "t" {
		t.Errorf("changing the clone changed the original: %v", s)
	}
	// The clone keeps the source, so its errors still point at lines.
	c.Model.NHeads = 3
	if err := c.Validate(); err == nil || !strings.HasPrefix(err.Error(), "t.yaml:8: model.n_heads: ") {
		t.Errorf("clone error = %v, want it located at t.yaml:8", err)
	}
}

func TestDerivedSizes(t *testing.T) {
	s := mustParse(t, []byte(base))
	if got := s.Model.HeadDim(); got != 32 {
		t.Errorf("HeadDim = %d, want 32", got)
	}
	if got := s.TokensPerStep(); got != 16*128 {
		t.Errorf("TokensPerStep = %d, want %d", got, 16*128)
	}
	if got := (Model{DModel: 8}).HeadDim(); got != 0 {
		t.Errorf("HeadDim with no heads = %d, want 0", got)
	}
}

func TestLoadOfMissingFileWrapsNotExist(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.yaml"))
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "nope.yaml") {
		t.Errorf("error = %v, want not-exist naming the file", err)
	}
}

func TestDecodeStrictReadsOtherStructsWithLinesAndErrors(t *testing.T) {
	type doc struct {
		Dir   string   `yaml:"dir"`
		On    bool     `yaml:"on"`
		Addrs []string `yaml:"addrs"`
		Max   int      `yaml:"max"`
	}
	var d doc
	lines, err := DecodeStrict([]byte("dir: x\non: true\naddrs:\n  - a\n  - b\nmax:\n"), "d.yaml", "doc", &d)
	if err != nil {
		t.Fatal(err)
	}
	want := doc{Dir: "x", On: true, Addrs: []string{"a", "b"}}
	if !reflect.DeepEqual(d, want) {
		t.Errorf("decoded %+v, want %+v", d, want)
	}
	for path, line := range map[string]int{"dir": 1, "on": 2, "addrs": 3, "addrs[0]": 4, "addrs[1]": 5} {
		if lines[path] != line {
			t.Errorf("line of %s = %d, want %d", path, lines[path], line)
		}
	}
	if _, ok := lines["max"]; ok {
		t.Errorf("max: (null) recorded as written")
	}

	for src, msg := range map[string]string{
		"on: yes\n":             `d.yaml:1: on: "yes" is not true or false`,
		"addrs: a\n":            `d.yaml:1: addrs: expected a list, found the value "a"`,
		"addrs:\n  - a\n  -\n":  "d.yaml:3: addrs: item 1 is empty",
		"addrs: [[a]]\n":        "d.yaml:1: addrs: item 0: expected a string, found a list",
		"dirs: x\n":             `d.yaml:1: unknown field "dirs" (known: dir, on, addrs, max)`,
		"":                      "d.yaml: empty doc",
		"dir: x\n---\ndir: y\n": "d.yaml:2: more than one YAML document; a doc is one",
	} {
		var d doc
		_, err := DecodeStrict([]byte(src), "d.yaml", "doc", &d)
		if !errors.Is(err, ErrDecode) || err.Error() != msg {
			t.Errorf("DecodeStrict(%q) error = %v, want %q", src, err, msg)
		}
	}
}

func TestPrecisionIsFP32OrBF16AndDefaultsToFP32(t *testing.T) {
	const base = "name: p\nmodel: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 16}\ntrain: {batch_size: 4, steps: 10, lr: 0.001}\n"
	s, err := Parse([]byte(base), "p.yaml")
	if err != nil || s.Model.Precision != "fp32" {
		t.Fatalf("no precision written: %q, %v; want fp32", s.Model.Precision, err)
	}
	for src, want := range map[string]string{
		"model:\n  precision: bf16\n": "",
		"model:\n  precision: fp32\n": "",
		"model:\n  precision: fp16\n": `p.yaml:3: model.precision: "fp16" is not one of fp32, bf16`,
		"model:\n  precision: \"\"\n": `p.yaml:3: model.precision: "" is not one of fp32, bf16`,
	} {
		full := "name: p\n" + src + "  d_model: 32\n  n_layers: 2\n  n_heads: 2\n  d_ff: 64\n  seq_len: 16\ntrain: {batch_size: 4, steps: 10, lr: 0.001}\n"
		s, err := Parse([]byte(full), "p.yaml")
		switch {
		case want == "" && err != nil:
			t.Errorf("%q: %v", src, err)
		case want != "" && (err == nil || !strings.Contains(err.Error(), want)):
			t.Errorf("%q: error %v, want one containing %q", src, err, want)
		case want == "":
			back, err := Parse([]byte(s.String()), "round.yaml")
			if err != nil || back.Model.Precision != s.Model.Precision {
				t.Errorf("%q: round trip gave %q, %v", src, back.Model.Precision, err)
			}
		}
	}
}

func TestCompressionFieldsAreValidated(t *testing.T) {
	const base = "name: c\nmodel: {d_model: 32, n_layers: 4, n_heads: 2, d_ff: 64, seq_len: 16}\npipeline: {stages: 2}\ntrain: {batch_size: 4, steps: 10, lr: 0.001}\n"
	for src, want := range map[string]string{
		"compression: {subspace: 64}":      "c.yaml:5: compression.subspace: 64 is outside [0, d_model 32]",
		"compression: {dense_tail: 3}":     "c.yaml:5: compression.dense_tail: 3 is outside [0, 2]",
		"compression: {activations: int2}": "c.yaml:5: compression.activations:",
		"compression: {gradients: int8/0}": "c.yaml:5: compression.gradients:",
		"compression: {activations: bf16+zstd, gradients: int8/32, subspace: 4, dense_tail: 2}": "",
	} {
		_, err := Parse([]byte(base+src+"\n"), "c.yaml")
		switch {
		case want == "" && err != nil:
			t.Errorf("%s: %v", src, err)
		case want != "" && (err == nil || !strings.Contains(err.Error(), want)):
			t.Errorf("%s: error %v, want one containing %q", src, err, want)
		}
	}
}

func TestDiLoCoDefaultsWhenSectionIsMissing(t *testing.T) {
	src := []byte(base[:strings.Index(base, "diloco:")])
	s := mustParse(t, src)
	if !reflect.DeepEqual(s.DiLoCo, defaultDiLoCo) {
		t.Errorf("diloco = %+v, want defaults %+v", s.DiLoCo, defaultDiLoCo)
	}
	if s.Pipeline.Replicas != 1 {
		t.Errorf("replicas = %d, want 1", s.Pipeline.Replicas)
	}
	s = mustParse(t, []byte(strings.Replace(base, "nesterov: true", "nesterov: false", 1)))
	if s.DiLoCo.Nesterov {
		t.Error("nesterov: false became true")
	}
}

func TestOuterStepsFollowInnerStepsWarmupAndFragments(t *testing.T) {
	due := func(o DiLoCo, f, steps int) []int {
		var out []int
		for step := 1; step <= steps; step++ {
			if o.Due(f, step, steps) {
				out = append(out, step)
			}
		}
		return out
	}
	o := DiLoCo{InnerSteps: 10, Fragments: 1}
	if got, want := due(o, 0, 35), []int{10, 20, 30, 35}; !reflect.DeepEqual(got, want) {
		t.Errorf("H=10: outer steps at %v, want %v (and always after the last step)", got, want)
	}
	o.WarmupSteps = 3
	if got, want := due(o, 0, 25), []int{1, 2, 3, 10, 20, 25}; !reflect.DeepEqual(got, want) {
		t.Errorf("H=10, warmup 3: outer steps at %v, want %v", got, want)
	}
	o = DiLoCo{InnerSteps: 10, Fragments: 2}
	if got, want := due(o, 0, 30), []int{5, 15, 25, 30}; !reflect.DeepEqual(got, want) {
		t.Errorf("fragment 0 of 2: %v, want %v", got, want)
	}
	if got, want := due(o, 1, 30), []int{10, 20, 30}; !reflect.DeepEqual(got, want) {
		t.Errorf("fragment 1 of 2: %v, want %v", got, want)
	}
	o = DiLoCo{InnerSteps: 6, Fragments: 3}
	for f, want := range [][]int{{2, 8, 12}, {4, 10, 12}, {6, 12}} {
		if got := due(o, f, 12); !reflect.DeepEqual(got, want) {
			t.Errorf("fragment %d of 3, H=6: %v, want %v", f, got, want)
		}
	}
}

func TestOverlappedOuterStepsAreAppliedAfterTheNextStep(t *testing.T) {
	o := DiLoCo{InnerSteps: 4, Fragments: 2}
	var got []int
	for step := 1; step <= 10; step++ {
		if o.SyncAt(step, 10) {
			got = append(got, step)
		}
	}
	// Begun after 2, 4, 6, 8 (applied after 3, 5, 7, 9); the last step, 10, blocks.
	if want := []int{2, 3, 4, 5, 6, 7, 8, 9, 10}; !reflect.DeepEqual(got, want) {
		t.Errorf("outer-step work after steps %v, want %v", got, want)
	}
	if (DiLoCo{InnerSteps: 4, Fragments: 1}).Overlapped() || !o.Overlapped() {
		t.Error("only more than one fragment overlaps")
	}
}

func TestEvalBatchesAndExportDefaultsAndValidation(t *testing.T) {
	s := mustParse(t, []byte(base))
	if s.EvalBatches != DefaultEvalBatches || s.Export != ExportNever {
		t.Errorf("unset: eval_batches %d, export %q; want %d and %q", s.EvalBatches, s.Export, DefaultEvalBatches, ExportNever)
	}
	top := func(extra string) []byte {
		return []byte(strings.Replace(base, "eval_interval: 100\n", "eval_interval: 100\n"+extra, 1))
	}
	if s = mustParse(t, top("eval_batches: 0\nexport: allowed\n")); s.EvalBatches != 0 || s.Export != ExportAllowed {
		t.Errorf("eval_batches: 0, export: allowed read as %d, %q; a written 0 evaluates the whole split", s.EvalBatches, s.Export)
	}
	back := mustParse(t, []byte(s.String()))
	if back.EvalBatches != 0 || back.Export != ExportAllowed {
		t.Errorf("Marshal round trip gave eval_batches %d, export %q", back.EvalBatches, back.Export)
	}
	for _, tc := range []struct{ extra, want string }{
		{"eval_batches: -1\n", "t.yaml:4: eval_batches: -1 is negative; 0 evaluates the whole validation split"},
		{"export: maybe\n", `t.yaml:4: export: "maybe" is not allowed or never`},
	} {
		if _, err := Parse(top(tc.extra), "t.yaml"); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want %q", tc.extra, err, tc.want)
		}
	}
}

// The checkpoint rules are checked where they are written, and with replicas a count
// must fall on outer steps.
func TestCheckpointFieldsAreValidatedAtTheirLines(t *testing.T) {
	line := strings.Count(base, "\n") + 1
	for _, tc := range []struct{ add, want string }{
		{"checkpoint_interval: -5", fmt.Sprintf("t.yaml:%d: checkpoint_interval: -5 is negative; 0 checkpoints by time only (checkpoint_seconds)", line)},
		{"checkpoint_seconds: -1", fmt.Sprintf("t.yaml:%d: checkpoint_seconds: -1 is negative; 0 checkpoints by step count only (checkpoint_interval)", line)},
	} {
		_, err := Parse([]byte(base+tc.add+"\n"), "t.yaml")
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want %q", tc.add, err, tc.want)
		}
	}
	src, _ := edit(t, "pipeline.replicas", "2")
	src = []byte(strings.Replace(string(src), "eval_interval: 100", "eval_interval: 90", 1) + "checkpoint_interval: 50\n")
	want := fmt.Sprintf("t.yaml:%d: checkpoint_interval: 50 is not a multiple of diloco.inner_steps 30", line)
	if _, err := Parse(src, "t.yaml"); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("replicas with checkpoint_interval 50: error %v, want %q", err, want)
	}
	s, err := Parse([]byte(base), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if s.CheckpointInterval != 0 || s.CheckpointSeconds != DefaultCheckpointSeconds {
		t.Errorf("defaults: checkpoint_interval %d, checkpoint_seconds %d; want 0 and %d", s.CheckpointInterval, s.CheckpointSeconds, DefaultCheckpointSeconds)
	}
	if s, err = Parse([]byte(base+"checkpoint_seconds: 0\n"), "t.yaml"); err != nil || s.CheckpointSeconds != 0 {
		t.Errorf("checkpoint_seconds: 0 became %v (%v); 0 turns the time rule off", s, err)
	}
}

func TestRecomputeIsABoolThatRoundTrips(t *testing.T) {
	const body = "  d_model: 32\n  n_layers: 2\n  n_heads: 2\n  d_ff: 64\n  seq_len: 16\ntrain: {batch_size: 4, steps: 10, lr: 0.001}\n"
	s, err := Parse([]byte("name: p\nmodel:\n  recompute: true\n"+body), "p.yaml")
	if err != nil || !s.Model.Recompute {
		t.Fatalf("recompute: true gave %v, %v", s.Model.Recompute, err)
	}
	back, err := Parse([]byte(s.String()), "round.yaml")
	if err != nil || !back.Model.Recompute {
		t.Errorf("round trip gave %v, %v", back.Model.Recompute, err)
	}
	_, err = Parse([]byte("name: p\nmodel:\n  recompute: sometimes\n"+body), "p.yaml")
	if err == nil || !strings.Contains(err.Error(), "p.yaml:3: model.recompute") {
		t.Errorf("recompute: sometimes: error %v, want one naming p.yaml:3: model.recompute", err)
	}
}

func TestDataTokenizerIsCheckedWhereItIsUsed(t *testing.T) {
	s := mustParse(t, []byte(base))
	if !s.Data.ByteLevel() || strings.Contains(s.String(), "tokenizer") {
		t.Errorf("a spec without data.tokenizer is not byte-level as before: %q", s.String())
	}
	if tk, err := s.CheckTokenizer(); tk != nil || err != nil {
		t.Errorf("CheckTokenizer of a byte-level spec: %v, %v", tk, err)
	}
	missing := filepath.Join(t.TempDir(), "missing.json")
	src := strings.Replace(base, "  val_fraction: 0.1\n", "  val_fraction: 0.1\n  tokenizer: "+strconv.Quote(missing)+"\n", 1)
	line := strings.Count(src[:strings.Index(src, "  tokenizer:")], "\n") + 1
	s, err := Parse([]byte(src), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("t.yaml:%d: data.tokenizer:", line)
	if _, err := s.CheckTokenizer(); err == nil || !strings.Contains(err.Error(), want) || !errors.Is(err, ErrInvalid) {
		t.Errorf("a missing tokenizer: %v, want an ErrInvalid containing %q", err, want)
	}
}

func TestScheduleAndDelayAreValidatedAtTheirLines(t *testing.T) {
	const base = "name: a\nmodel: {d_model: 32, n_layers: 4, n_heads: 2, d_ff: 64, seq_len: 16}\ntrain: {batch_size: 4, steps: 10, lr: 0.001}\n"
	for src, want := range map[string]string{
		"pipeline:\n  schedule: async\n":                          "",
		"pipeline:\n  schedule: sync\n":                           "",
		"pipeline:\n  schedule: async\ntrain2:\n  delay: stash\n": "unknown", // a misspelt section is still an error
		"pipeline:\n  schedule: eventually\n":                     `a.yaml:5: pipeline.schedule: "eventually" is not sync or async`,
		"pipeline:\n  schedule: \"\"\n":                           `a.yaml:5: pipeline.schedule: "" is empty; want sync or async`,
	} {
		_, err := Parse([]byte(base+src), "a.yaml")
		switch {
		case want == "" && err != nil:
			t.Errorf("%q: %v", src, err)
		case want != "" && (err == nil || !strings.Contains(err.Error(), want)):
			t.Errorf("%q: error %v, want one containing %q", src, err, want)
		}
	}
	const full = "name: a\nmodel: {d_model: 32, n_layers: 4, n_heads: 2, d_ff: 64, seq_len: 16}\npipeline:\n  schedule: %s\ntrain:\n  batch_size: 4\n  steps: 10\n  lr: 0.001\n  delay: %s\n"
	for _, c := range []struct{ schedule, delay, want string }{
		{"async", "none", ""},
		{"async", "stash", ""},
		{"async", "nesterov", ""},
		{"async", "lookahead", `a.yaml:9: train.delay: "lookahead" is not one of none, stash, nesterov`},
		{"sync", "stash", `a.yaml:9: train.delay: "stash" is set but pipeline.schedule is not async`},
	} {
		s, err := Parse([]byte(fmt.Sprintf(full, c.schedule, c.delay)), "a.yaml")
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%s/%s: %v", c.schedule, c.delay, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("%s/%s: error %v, want one containing %q", c.schedule, c.delay, err, c.want)
		case c.want == "":
			back, err := Parse([]byte(s.String()), "round.yaml")
			if err != nil || back.Train.Delay != c.delay || !back.Pipeline.Async() {
				t.Errorf("%s/%s: round trip gave %+v, %v", c.schedule, c.delay, back, err)
			}
		}
	}
}

func TestAsyncDefaultsItsDelayAndSyncTextIsUnchanged(t *testing.T) {
	s := mustParse(t, []byte(base))
	if s.Pipeline.Async() || s.Train.Delay != "" {
		t.Fatalf("base: schedule %q, delay %q; want sync, no delay", s.Pipeline.Schedule, s.Train.Delay)
	}
	if txt := s.String(); strings.Contains(txt, "schedule") || strings.Contains(txt, "delay") {
		t.Errorf("a sync spec's text names schedule or delay:\n%s", txt)
	}
	src, _ := edit(t, "pipeline.in_flight", "0\n  schedule: async")
	a := mustParse(t, src)
	if !a.Pipeline.Async() || a.Train.Delay != DefaultDelay {
		t.Errorf("async without delay: schedule %q, delay %q; want async, %s", a.Pipeline.Schedule, a.Train.Delay, DefaultDelay)
	}
	// An async stage's forwards run on into later updates: in_flight may exceed a
	// step's micro-batches.
	src, _ = edit(t, "pipeline.in_flight", "3\n  schedule: async")
	if b := mustParse(t, src); b.Pipeline.InFlight != 3 {
		t.Errorf("async in_flight 3 with 2 micro-batches: %d", b.Pipeline.InFlight)
	}
}

// An async pipeline's forwards in flight may span updates: in_flight above
// micro_batches covers a longer round trip; a sync step has no more to send.
func TestAsyncInFlightMayExceedMicroBatches(t *testing.T) {
	src, _ := edit(t, "pipeline.in_flight", "5\n  schedule: async")
	if a := mustParse(t, src); a.Pipeline.InFlight != 5 {
		t.Errorf("async in_flight %d, want 5", a.Pipeline.InFlight)
	}
	src, _ = edit(t, "pipeline.in_flight", "5")
	if _, err := Parse(src, "t.yaml"); err == nil || !strings.Contains(err.Error(), "5 exceeds micro_batches 2") {
		t.Errorf("sync in_flight 5 of 2 micro-batches: %v; want it refused", err)
	}
}
