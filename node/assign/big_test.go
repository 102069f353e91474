package assign

import (
	"bufio"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pipeswarm/pipeswarm/examples"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/stage"
	"github.com/pipeswarm/pipeswarm/optim"
	"github.com/pipeswarm/pipeswarm/shard"
)

// vmHWM is this process's peak resident set, from /proc/self/status.
func vmHWM(t *testing.T) int64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		t.Skipf("no /proc/self/status: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc/self/status")
	return 0
}

// One training step of the 1b preset's stage 0 (the embedding and 3 blocks of d_model
// 2048), recomputing, on one micro-batch of one sequence of 1024 bytes: forward,
// backward and AdamW, timed, and the process's peak resident set against what staffing
// counts for it (all but the validation tape, as no validation runs). Minutes of
// compute and 3 GB: run with PIPESWARM_BIG=1.
func TestOneBStageStepMemoryIsWhatStaffingCounts(t *testing.T) {
	if os.Getenv("PIPESWARM_BIG") == "" {
		t.Skip("a 1 B-parameter stage step: set PIPESWARM_BIG=1 to run it")
	}
	src, name, err := examples.Spec("1b")
	if err != nil {
		t.Fatal(err)
	}
	sp, err := spec.Parse(src, name)
	if err != nil {
		t.Fatal(err)
	}
	c := stage.ModelConfig(sp)
	ranges, err := shard.SplitLayers(c.NLayers, sp.Pipeline.Stages)
	if err != nil {
		t.Fatal(err)
	}
	debug.SetGCPercent(10) // garbage is not what is measured
	st, err := shard.NewStage(c, ranges[0], true, false, shard.WithRecompute(true))
	if err != nil {
		t.Fatal(err)
	}
	st.Init(sp.Seed)
	opt, err := optim.NewAdamW(len(st.Params), stage.AdamWConfig(sp, st))
	if err != nil {
		t.Fatal(err)
	}
	const b = 1
	n := b * c.SeqLen
	tokens, dout := make([]int32, n), make([]float32, n*c.DModel)
	for i := range tokens {
		tokens[i] = int32(i * 7 % c.Vocab)
	}
	for i := range dout {
		dout[i] = float32(i%13) * 1e-6
	}
	tp := st.NewTape(b, c.SeqLen)
	t0 := time.Now()
	st.Forward(tp, tokens, nil)
	fwd := time.Since(t0)
	st.Backward(tp, dout)
	bwd := time.Since(t0) - fwd
	opt.Step(st.Params, st.Grads, 3e-4)
	total := time.Since(t0)
	m := StageMemory(c, ranges[0], Schedule{Stages: len(ranges), MicroBatches: 1}, 0, b, true)
	want := m.Total() - m.Evaluation
	got := vmHWM(t)
	t.Logf("1b stage 0 (layers [%d,%d), %d parameters), one micro-batch of %d×%d tokens: forward %v, backward with recomputation %v, step %v in all",
		ranges[0].Lo, ranges[0].Hi, len(st.Params), b, c.SeqLen, fwd.Round(time.Millisecond), bwd.Round(time.Millisecond), total.Round(time.Millisecond))
	t.Logf("peak RSS %s (%d B); staffing counts %s (%d B) without validation: %+.1f%%", FormatBytes(got), got, FormatBytes(want), want, 100*float64(got-want)/float64(want))
	if d := float64(got-want) / float64(want); d > 0.15 || d < -0.15 {
		t.Errorf("peak RSS %s is %+.1f%% off staffing's %s", FormatBytes(got), 100*d, FormatBytes(want))
	}
}
