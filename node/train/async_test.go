package train

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/metrics"
)

// asyncSpec is smallSpec cut in two stages of two micro-batches on the async
// schedule: stage 0's forwards run on weights half an update old on average.
func asyncSpec(delay string) string {
	return strings.Replace(strings.Replace(smallSpec, "pipeline: {stages: 1, micro_batches: 1}",
		"pipeline: {stages: 2, micro_batches: 2, schedule: async}", 1),
		"warmup: 1}", "warmup: 1, delay: "+delay+"}", 1)
}

// With one stage there is no delay: forwards and backwards run on the current
// weights and a stage's own clipping is the global one, so the async schedule takes
// the sync run's steps exactly, whatever the delay handling (nesterov excepted: it
// is another optimiser).
func TestAsyncScheduleOfOneStageIsTheSyncRun(t *testing.T) {
	for _, micro := range []string{"1", "2"} {
		src := strings.Replace(smallSpec, "micro_batches: 1}", "micro_batches: "+micro+"}", 1)
		want := losses(t, testSpec(t, src))
		for _, delay := range []string{"none", "stash"} {
			async := strings.Replace(strings.Replace(src, "micro_batches: "+micro+"}", "micro_batches: "+micro+", schedule: async}", 1),
				"warmup: 1}", "warmup: 1, delay: "+delay+"}", 1)
			got := losses(t, testSpec(t, async))
			for i := range want {
				if got[i] != want[i] {
					t.Fatalf("%s micro-batches, delay %s: step %d loss %v, sync %v", micro, delay, i+1, got[i], want[i])
				}
			}
		}
	}
}

// Each delay handling changes the run: stage 0's backward runs on other weights
// (none: the current ones, stash: its forward's) or another optimiser (nesterov).
func TestAsyncDelayHandlingsDiffer(t *testing.T) {
	seen := map[string]string{}
	for _, delay := range []string{"none", "stash", "nesterov"} {
		l := losses(t, testSpec(t, asyncSpec(delay)))
		key := fmt.Sprint(l)
		if other, ok := seen[key]; ok {
			t.Errorf("delay %s took the same steps as delay %s: %v", delay, other, l)
		}
		seen[key] = delay
		if l[0] != losses(t, testSpec(t, asyncSpec(delay)))[0] {
			t.Errorf("delay %s: the same spec gave another first loss", delay)
		}
	}
}

// An async run stopped and resumed takes the uninterrupted run's steps bit for bit:
// the checkpoint holds the past weight versions the next forwards and backwards use.
func TestAsyncResumeTakesTheSameSteps(t *testing.T) {
	cases := map[string]string{}
	for _, delay := range []string{"none", "stash", "nesterov"} {
		cases[delay] = asyncSpec(delay)
	}
	// Replicas with overlapped outer steps of two fragments, a subspace and lossy
	// boundaries: the past versions include the weights outer steps gave.
	cases["nesterov, replicas, fragments, subspace, lossy boundaries"] = strings.Replace(strings.Replace(replicaSpec,
		"replicas: 2}", "replicas: 2, schedule: async}", 1), "sync: int8/32}",
		"sync: int8/32, fragments: 2}\ncompression: {subspace: 8, gradients: int8/32}", 1)
	for name, src := range cases {
		t.Run(name, func(t *testing.T) {
			sp := testSpec(t, src)
			sp.Train.Steps = 8
			full := t.TempDir()
			if _, err := Run(context.Background(), Options{Spec: sp, OutDir: full}); err != nil {
				t.Fatal(err)
			}
			part := t.TempDir()
			ctx, cancel := context.WithCancel(context.Background())
			_, err := Run(ctx, Options{Spec: sp, OutDir: part, OnStep: func(s metrics.Step) {
				if s.Step == 3 {
					cancel()
				}
			}})
			cancel()
			if err == nil {
				t.Fatal("the interrupted run finished")
			}
			var got []float64
			if _, err := Run(context.Background(), Options{Spec: sp, OutDir: part, Resume: true,
				OnStep: func(s metrics.Step) { got = append(got, s.Loss) }}); err != nil {
				t.Fatal(err)
			}
			want := losses(t, sp)[3*sp.Pipeline.Replicas:] // a row per replica and step
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("resumed losses %v, uninterrupted %v", got, want)
			}
			a, _ := os.ReadFile(filepath.Join(part, CheckpointFile))
			b, _ := os.ReadFile(filepath.Join(full, CheckpointFile))
			if !bytes.Equal(a, b) {
				t.Error("resumed model.safetensors differs from the uninterrupted run's")
			}
		})
	}
}
