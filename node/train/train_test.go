package train

import (
	"context"
	"errors"
	"maps"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/shard"
)

const shakespeare = "../../../shared/data/tinyshakespeare.txt"

func testSpec(t *testing.T, src string) *spec.Spec {
	t.Helper()
	sp, err := spec.Parse([]byte(src), "test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return sp
}

const smallSpec = `name: unit
seed: 5
eval_interval: 0
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 1, micro_batches: 1}
train: {batch_size: 4, steps: 5, lr: 0.003, warmup: 1}
data: {val_fraction: 0.01}
`

func losses(t *testing.T, sp *spec.Spec) []float64 {
	t.Helper()
	var out []float64
	_, err := Run(context.Background(), Options{Spec: sp, OutDir: t.TempDir(), OnStep: func(s metrics.Step) { out = append(out, s.Loss) }})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Cutting the model into stages and a step into micro-batches changes the order of
// floating-point sums, not the result.
func TestStagesAndMicroBatchesDoNotChangeTheLoss(t *testing.T) {
	base := losses(t, testSpec(t, smallSpec))
	split := testSpec(t, strings.Replace(smallSpec, "stages: 1, micro_batches: 1", "stages: 2, micro_batches: 2", 1))
	got := losses(t, split)
	for i := range base {
		if math.Abs(got[i]-base[i]) > 1e-5*base[i] {
			t.Fatalf("step %d: loss %.7f with 2 stages × 2 micro-batches, %.7f unsplit", i+1, got[i], base[i])
		}
	}
}

func TestSameSeedSameRun(t *testing.T) {
	a, b := losses(t, testSpec(t, smallSpec)), losses(t, testSpec(t, smallSpec))
	for i := range a {
		if a[i] != b[i] {
			t.Fatalf("step %d: %v then %v with the same seed", i+1, a[i], b[i])
		}
	}
}

func TestCancelStopsAndStillWritesTheCheckpoint(t *testing.T) {
	sp := testSpec(t, smallSpec)
	sp.Train.Steps = 50
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir := t.TempDir()
	res, err := Run(ctx, Options{Spec: sp, OutDir: dir, OnStep: func(s metrics.Step) {
		if s.Step == 3 {
			cancel()
		}
	}})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if res.Steps != 3 {
		t.Fatalf("stopped after %d steps, want 3", res.Steps)
	}
	ck, err := shard.LoadCheckpoint(filepath.Join(dir, CheckpointFile))
	if err != nil {
		t.Fatalf("no checkpoint after Ctrl-C: %v", err)
	}
	if ck.Metadata[MetaStep] != "3" {
		t.Fatalf("checkpoint step %q, want 3", ck.Metadata[MetaStep])
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") {
			t.Errorf("temp file %s left behind", e.Name())
		}
	}
}

func TestValLossOfReloadedCheckpointMatchesTraining(t *testing.T) {
	sp := testSpec(t, smallSpec)
	dir := t.TempDir()
	res, err := Run(context.Background(), Options{Spec: sp, OutDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	ck, err := shard.LoadCheckpoint(res.Checkpoint)
	if err != nil {
		t.Fatal(err)
	}
	again, err := spec.Parse([]byte(ck.Metadata[MetaSpec]), "checkpoint")
	if err != nil {
		t.Fatal(err)
	}
	stages, err := shard.NewStages(ModelConfig(again), again.Pipeline.Stages)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range stages {
		if err := s.Load(ck); err != nil {
			t.Fatal(err)
		}
	}
	text, _, _ := Corpus(again.Data.Path)
	_, val := data.Split(text, again.Data.ValFraction)
	if got := NewEvaluator(stages, val, again.EvalBatches).Loss(); got != res.ValLoss {
		t.Fatalf("reloaded val loss %.9f, training reported %.9f", got, res.ValLoss)
	}
}

// Convergence on real text: a small model must get well below the byte-unigram
// entropy of English (≈ 2.9 nats) in a few hundred steps.
func TestLearnsTinyShakespeare(t *testing.T) {
	if _, err := os.Stat(shakespeare); err != nil {
		t.Skipf("skipping: %s not found (it lives in the shared data folder beside the repo): %v", shakespeare, err)
	}
	if testing.Short() {
		t.Skip("skipping convergence run in -short mode")
	}
	sp := testSpec(t, `name: converge
seed: 1
model: {d_model: 64, n_layers: 2, n_heads: 2, d_ff: 176, seq_len: 64}
train: {batch_size: 8, steps: 300, lr: 0.004, warmup: 20}
data: {val_fraction: 0.05}
`)
	sp.Data.Path = shakespeare
	res, err := Run(context.Background(), Options{Spec: sp, OutDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if res.ValLoss > 2.4 {
		t.Fatalf("validation loss %.3f after %d steps, want <= 2.4", res.ValLoss, res.Steps)
	}
	t.Logf("val loss %.4f after %d steps in %s", res.ValLoss, res.Steps, res.Elapsed)
}

// eval_batches caps every evaluation, the final one included, at its first batches of
// validation windows: what the run reports is the loss of the reloaded model over those
// windows exactly, and not the loss over the whole split.
func TestEvalBatchesCapsEveryEvaluation(t *testing.T) {
	sp := testSpec(t, strings.Replace(smallSpec, "eval_interval: 0", "eval_interval: 2\neval_batches: 2", 1))
	sp.Train.Steps = 4
	evals := map[int]int{} // step -> validation batches run
	dir := t.TempDir()
	res, err := Run(context.Background(), Options{Spec: sp, OutDir: dir, Trace: func(op Op) {
		if op.Kind == OpEval {
			evals[op.Step]++
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	if len(evals) != 2 || evals[2] != 2 || evals[4] != 2 {
		t.Fatalf("validation batches by step %v, want 2 at steps 2 and 4 (the final evaluation)", evals)
	}
	ck, err := shard.LoadCheckpoint(res.Checkpoint)
	if err != nil {
		t.Fatal(err)
	}
	stages, err := shard.NewStages(ModelConfig(sp), 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := stages[0].Load(ck); err != nil {
		t.Fatal(err)
	}
	text, _, _ := Corpus(sp.Data.Path)
	_, val := data.Split(text, sp.Data.ValFraction)
	capped := NewEvaluator(stages, val, 2)
	if capped.Windows() != 2*EvalBatch {
		t.Fatalf("capped evaluator covers %d windows, want %d", capped.Windows(), 2*EvalBatch)
	}
	if got := capped.Loss(); got != res.ValLoss {
		t.Errorf("final val_loss %.9f, the reloaded model's over the first 2 batches %.9f", res.ValLoss, got)
	}
	all := NewEvaluator(stages, val, 0)
	if all.Windows() <= 2*EvalBatch {
		t.Fatalf("the validation split holds only %d windows; the test needs more than the cap", all.Windows())
	}
	if whole := all.Loss(); whole == res.ValLoss {
		t.Errorf("val_loss %.9f equals the whole split's: the cap was not applied", whole)
	}
	rows, err := metrics.ReadFile(filepath.Join(dir, MetricsFile))
	if err != nil {
		t.Fatal(err)
	}
	if last := rows[len(rows)-1]; last.ValLoss == nil || *last.ValLoss != res.ValLoss {
		t.Errorf("metrics.jsonl's last row has val_loss %v, want %v", last.ValLoss, res.ValLoss)
	}
}

// train checkpoints every checkpoint_interval steps, apart from evaluation.
func TestTrainCheckpointsEveryCheckpointInterval(t *testing.T) {
	sp := testSpec(t, smallSpec+"checkpoint_interval: 3\ncheckpoint_seconds: 0\n")
	sp.Train.Steps = 8
	dir := t.TempDir()
	seen := map[int]string{}
	_, err := Run(context.Background(), Options{Spec: sp, OutDir: dir, OnStep: func(s metrics.Step) {
		if m, err := shard.ReadCheckpointMetadata(filepath.Join(dir, CheckpointFile)); err == nil {
			seen[s.Step] = m[MetaStep]
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	// OnStep sees a step's row before its checkpoint is written.
	want := map[int]string{4: "3", 5: "3", 6: "3", 7: "6", 8: "6"}
	if !maps.Equal(seen, want) {
		t.Errorf("checkpoint on disk at each step: %v, want %v", seen, want)
	}
}
