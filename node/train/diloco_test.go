package train

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/shard"
)

const replicaSpec = `name: reps
seed: 5
eval_interval: 4
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 32}
pipeline: {stages: 2, micro_batches: 2, replicas: 2}
train: {batch_size: 4, steps: 8, lr: 0.003, warmup: 1}
diloco: {inner_steps: 4, outer_lr: 1.0, outer_momentum: 0, sync: int8/32}
data: {val_fraction: 0.01}
`

// A replicated run writes one loss row per replica and step, and after every outer
// step one row per (replica, stage) whose weight hashes agree across the replicas.
func TestReplicatedRunWritesReplicaAndOuterRows(t *testing.T) {
	sp := testSpec(t, replicaSpec)
	dir := t.TempDir()
	res, err := Run(context.Background(), Options{Spec: sp, OutDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(dir, MetricsFile))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	steps, outers, err := metrics.ReadRun(f)
	if err != nil {
		t.Fatal(err)
	}
	if len(steps) != 2*8 {
		t.Fatalf("%d loss rows, want 16 (2 replicas × 8 steps)", len(steps))
	}
	for i, s := range steps {
		if s.Replica == nil || *s.Replica != i%2 || s.Step != i/2+1 {
			t.Fatalf("row %d: step %d replica %v, want step %d replica %d", i, s.Step, s.Replica, i/2+1, i%2)
		}
		if (s.ValLoss != nil) != (s.Step%4 == 0 && *s.Replica == 0) {
			t.Errorf("step %d replica %d: val_loss %v; want it on replica 0 after each outer step only", s.Step, *s.Replica, s.ValLoss)
		}
	}
	if len(outers) != 2*2*2 {
		t.Fatalf("%d outer rows, want 8 (2 outer steps × 2 stages × 2 replicas)", len(outers))
	}
	for _, o := range outers {
		if o.Step%4 != 0 || o.OuterStep != o.Step/4 || o.SyncBytes <= 0 || o.Contributors != 2 {
			t.Errorf("outer row %+v: want steps 4 and 8, outer steps 1 and 2, bytes sent, 2 contributors", o)
		}
		for _, p := range outers {
			if p.Step == o.Step && p.Stage == o.Stage && p.WeightsHash != o.WeightsHash {
				t.Errorf("stage %d after step %d: replicas report hashes %s and %s", o.Stage, o.Step, o.WeightsHash, p.WeightsHash)
			}
		}
	}
	if res.SyncBytes[0][0] == 0 || res.SyncBytes[1][1] == 0 {
		t.Errorf("sync bytes %v, want every cell counted", res.SyncBytes)
	}
	// Every stage of every replica keeps its checkpoint as a launched run's stages
	// do: the weights, and beside them what the weights file does not hold.
	for _, name := range []string{"stage-0-replica-0", "stage-0-replica-1", "stage-1-replica-0", "stage-1-replica-1"} {
		ck, err := shard.LoadCheckpoint(filepath.Join(dir, name+".state.safetensors"))
		if err != nil {
			t.Fatal(err)
		}
		for _, tn := range []string{"adam_m", "adam_v", "global", "outer_momentum", "ef_residual"} {
			if _, ok := ck.Tensors[tn]; !ok {
				t.Errorf("%s.state.safetensors has no tensor %q", name, tn)
			}
		}
		if ck.Metadata["adam_step"] != "8" {
			t.Errorf("%s: adam step %q, want 8", name, ck.Metadata["adam_step"])
		}
	}
}

// With fp32 pseudo-gradients, outer lr 1 and no momentum, an outer step is plain
// averaging: every replica continues from the mean of their weights.
func TestPlainAveragingOuterStepGivesTheMeanOfTheReplicas(t *testing.T) {
	sp := testSpec(t, strings.Replace(replicaSpec, "sync: int8/32", "sync: fp32", 1))
	text, _, _ := Corpus("")
	tr, _ := data.Split(data.Widen(text), sp.Data.ValFraction)
	reps := make([]*replica, 2)
	ds := &Dataset{Replicas: [][]int32{data.Shard(tr, 0, 2), data.Shard(tr, 1, 2)}}
	for r := range reps {
		rp, err := newReplica(sp, ds, r)
		if err != nil {
			t.Fatal(err)
		}
		reps[r] = rp
	}
	mb := sp.Train.BatchSize / sp.Pipeline.MicroBatches
	in, tg := make([]int32, mb*32), make([]int32, mb*32)
	for range 3 {
		for _, rp := range reps {
			rp.m.step(rp.sampler, in, tg, 0.003, 1, nil)
		}
	}
	var want [][]float32
	for s := range reps[0].m.stages {
		a, b := reps[0].m.stages[s].Params, reps[1].m.stages[s].Params
		if slices.Equal(a, b) {
			t.Fatalf("stage %d: replicas trained on different shards but hold equal weights", s)
		}
		mean := make([]float32, len(a))
		for i := range mean {
			mean[i] = (a[i] + b[i]) / 2
		}
		want = append(want, mean)
	}
	rows := newSyncer(sp, reps).step(sp.Train.Steps, sp.Train.Steps, time.Now)
	if len(rows) != 4 {
		t.Fatalf("%d outer rows, want 4", len(rows))
	}
	for s := range want {
		for r, rp := range reps {
			got := rp.m.stages[s].Params
			for i := range got {
				if math.Abs(float64(got[i]-want[s][i])) > 1e-6*(1+math.Abs(float64(want[s][i]))) {
					t.Fatalf("stage %d replica %d param %d = %v after averaging, want the mean %v", s, r, i, got[i], want[s][i])
				}
			}
			if !slices.Equal(got, reps[0].m.stages[s].Params) || !slices.Equal(rp.outers[s].Global, got) {
				t.Fatalf("stage %d replica %d: local and global weights differ after the outer step", s, r)
			}
		}
	}
}

// A run stopped after step k and resumed takes exactly the steps the uninterrupted
// run takes: the same loss at every step after k, the same validation losses and
// outer-step hashes, and metrics.jsonl as if it had never stopped.
func TestResumeTakesTheSameStepsAsTheUninterruptedRun(t *testing.T) {
	for name, src := range map[string]string{
		"one replica": smallSpec,
		"replicas":    replicaSpec,
		"fragments, overlapped, lossy boundaries": strings.Replace(replicaSpec, "sync: int8/32}",
			"sync: int4/32, fragments: 2, warmup_steps: 1}\ncompression: {gradients: int8/32}", 1),
	} {
		sp := testSpec(t, src)
		sp.Train.Steps = 9
		full := t.TempDir()
		if _, err := Run(context.Background(), Options{Spec: sp, OutDir: full}); err != nil {
			t.Fatal(err)
		}
		// After step 4 an overlapped outer step is in flight (with fragments); after 5 not.
		for _, stop := range []int{4, 5} {
			t.Run(fmt.Sprintf("%s, stopped after step %d", name, stop), func(t *testing.T) {
				part := t.TempDir()
				ctx, cancel := context.WithCancel(context.Background())
				_, err := Run(ctx, Options{Spec: sp, OutDir: part, OnStep: func(s metrics.Step) {
					if s.Step == stop {
						cancel()
					}
				}})
				cancel()
				if err == nil {
					t.Fatal("the interrupted run finished")
				}
				if _, err := Run(context.Background(), Options{Spec: sp, OutDir: part, Resume: true}); err != nil {
					t.Fatal(err)
				}
				want, _ := os.ReadFile(filepath.Join(full, MetricsFile))
				got, _ := os.ReadFile(filepath.Join(part, MetricsFile))
				strip := func(b []byte) string { // timings differ; everything else must not
					var out []string
					for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
						var row map[string]any
						if err := json.Unmarshal([]byte(line), &row); err != nil {
							t.Fatal(err)
						}
						delete(row, "tokens_per_s")
						delete(row, "elapsed_s")
						delete(row, "sync_s")
						j, _ := json.Marshal(row)
						out = append(out, string(j))
					}
					return strings.Join(out, "\n")
				}
				if a, b := strip(got), strip(want); a != b {
					t.Errorf("resumed metrics differ from the uninterrupted run's:\n%s\nwant:\n%s", a, b)
				}
				a, _ := os.ReadFile(filepath.Join(part, CheckpointFile))
				b, _ := os.ReadFile(filepath.Join(full, CheckpointFile))
				if !bytes.Equal(a, b) {
					t.Error("resumed model.safetensors differs from the uninterrupted run's")
				}
			})
		}
	}
}

func TestResumeRefusesAnotherSpecAndAnEmptyDirectory(t *testing.T) {
	sp := testSpec(t, smallSpec)
	dir := t.TempDir()
	if _, err := Run(context.Background(), Options{Spec: sp, OutDir: dir, Resume: true}); err == nil || !strings.Contains(err.Error(), "nothing to resume") {
		t.Errorf("resume of an empty directory: %v, want a refusal saying there is nothing to resume", err)
	}
	if _, err := Run(context.Background(), Options{Spec: sp, OutDir: dir}); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(filepath.Join(dir, MetricsFile))
	other := testSpec(t, strings.Replace(smallSpec, "lr: 0.003", "lr: 0.002", 1))
	if _, err := Run(context.Background(), Options{Spec: other, OutDir: dir, Resume: true}); err == nil || !strings.Contains(err.Error(), "another spec") {
		t.Errorf("resume with another spec: %v, want a refusal", err)
	}
	if after, _ := os.ReadFile(filepath.Join(dir, MetricsFile)); len(before) == 0 || !bytes.Equal(after, before) {
		t.Error("a refused resume changed metrics.jsonl")
	}
}

// A run that crashed while writing a checkpoint (some stages had written step 6's,
// others not yet) resumes from the newest step every stage holds, and takes the
// uninterrupted run's steps from there.
func TestACheckpointTornByACrashResumesFromTheStepEveryStageHolds(t *testing.T) {
	sp := testSpec(t, strings.Replace(replicaSpec, "sync: int8/32}", "sync: int8/32}\ncompression: {gradients: int8/32}", 1))
	full, part, held := t.TempDir(), t.TempDir(), t.TempDir()
	if _, err := Run(context.Background(), Options{Spec: sp, OutDir: full}); err != nil {
		t.Fatal(err)
	}
	stopAfter := func(step int, resume bool) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		_, err := Run(ctx, Options{Spec: sp, OutDir: part, Resume: resume, OnStep: func(s metrics.Step) {
			if s.Step == step {
				cancel()
			}
		}})
		if err == nil {
			t.Fatalf("the run stopped after step %d finished", step)
		}
	}
	stopAfter(4, false)
	names, _ := filepath.Glob(filepath.Join(part, "stage-*.safetensors"))
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(held, filepath.Base(n)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	stopAfter(6, true)
	// The crash: stage 1 of replica 1 had not written step 6's yet; the others had,
	// keeping step 4's beside it until every stage had.
	for _, n := range names {
		b, _ := os.ReadFile(filepath.Join(held, filepath.Base(n)))
		to := n
		if !strings.HasPrefix(filepath.Base(n), "stage-1-replica-1.") {
			to = strings.Replace(n, "replica-0.", "replica-0.step-4.", 1)
			to = strings.Replace(to, "replica-1.", "replica-1.step-4.", 1)
		}
		if err := os.WriteFile(to, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	res, err := Run(context.Background(), Options{Spec: sp, OutDir: part, Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.Steps != sp.Train.Steps {
		t.Fatalf("the resumed run ended after step %d, want %d", res.Steps, sp.Train.Steps)
	}
	losses := func(dir string) []float64 {
		b, err := os.ReadFile(filepath.Join(dir, MetricsFile))
		if err != nil {
			t.Fatal(err)
		}
		var out []float64
		for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			var s metrics.Step
			if err := json.Unmarshal([]byte(line), &s); err != nil {
				t.Fatal(err)
			}
			out = append(out, float64(s.Step), s.Loss)
		}
		return out
	}
	if a, b := losses(part), losses(full); !slices.Equal(a, b) {
		t.Errorf("steps and losses resumed %v, uninterrupted %v", a, b)
	}
	a, _ := os.ReadFile(filepath.Join(part, CheckpointFile))
	b, _ := os.ReadFile(filepath.Join(full, CheckpointFile))
	if !bytes.Equal(a, b) {
		t.Error("resumed model.safetensors differs from the uninterrupted run's")
	}
}
