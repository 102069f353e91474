package assign

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"slices"
	"testing"

	"github.com/pipeswarm/pipeswarm/shard"
	"github.com/pipeswarm/pipeswarm/shard/compute"
)

// shapes are model shapes small enough to allocate for real, with the ways to cut them.
var shapes = []struct {
	c      shard.Config
	stages int
}{
	{shard.Config{Vocab: 256, DModel: 64, NLayers: 4, NHeads: 4, DFF: 176, SeqLen: 32, RopeTheta: 1e4, NormEps: 1e-5}, 3},
	{shard.Config{Vocab: 100, DModel: 48, NLayers: 3, NHeads: 2, DFF: 200, SeqLen: 16, RopeTheta: 1e4, NormEps: 1e-5}, 1},
	{shard.Config{Vocab: 512, DModel: 128, NLayers: 8, NHeads: 8, DFF: 352, SeqLen: 64, RopeTheta: 1e4, NormEps: 1e-5}, 8},
	{shard.Config{Vocab: 32, DModel: 16, NLayers: 2, NHeads: 1, DFF: 8, SeqLen: 8, RopeTheta: 1e4, NormEps: 1e-5}, 2},
}

// stagesOf calls f with every stage of every shape.
func stagesOf(t *testing.T, f func(name string, c shard.Config, r shard.Range, first, last bool)) {
	for _, sh := range shapes {
		ranges, err := shard.SplitLayers(sh.c.NLayers, sh.stages)
		if err != nil {
			t.Fatal(err)
		}
		for s, r := range ranges {
			name := fmt.Sprintf("d%d_L%d_stage%d/%d", sh.c.DModel, sh.c.NLayers, s, sh.stages)
			f(name, sh.c, r, s == 0, s == sh.stages-1)
		}
	}
}

func TestParamCountMatchesShardLayout(t *testing.T) {
	stagesOf(t, func(name string, c shard.Config, r shard.Range, first, last bool) {
		st, err := shard.NewStage(c, r, first, last)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := paramCount(c, r, first, last), int64(len(st.Params)); got != want {
			t.Errorf("%s: paramCount = %d, NewStage has %d", name, got, want)
		}
	})
	// A stage of no blocks holding only the embedding and the head.
	c := shapes[0].c
	st, err := shard.NewStage(c, shard.Range{Lo: 2, Hi: 2}, true, true)
	if err != nil {
		t.Fatal(err)
	}
	if got := paramCount(c, shard.Range{Lo: 2, Hi: 2}, true, true); got != int64(len(st.Params)) {
		t.Errorf("empty range: paramCount = %d, NewStage has %d", got, len(st.Params))
	}
}

// allocated is the number of bytes f allocates on the heap.
func allocated(f func()) int64 {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return int64(after.TotalAlloc - before.TotalAlloc)
}

// closeTo reports whether measured, a heap measurement, accounts for counted bytes: at least
// as much (nothing was missed) and not more than allocator rounding of up to 1/8 per buffer
// plus a little bookkeeping (nothing counted twice).
func closeTo(measured, counted int64) bool {
	return measured >= counted && measured <= counted+counted/8+4096
}

func TestTapeBytesMatchWhatNewTapeAllocates(t *testing.T) {
	stagesOf(t, func(name string, c shard.Config, r shard.Range, first, last bool) {
		st, err := shard.NewStage(c, r, first, last)
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range []int{1, 3} {
			var tp *shard.Tape
			got := allocated(func() { tp = st.NewTape(b, c.SeqLen) })
			runtime.KeepAlive(tp)
			in, blocks := tapeBytes(c, r, first, last, b, c.SeqLen)
			if want := in + blocks; !closeTo(got, want) {
				t.Errorf("%s b=%d: NewTape allocated %d bytes, tapeBytes counts %d", name, b, got, want)
			}
		}
	})
}

func TestRecomputeTapesMatchWhatNewTapeAllocates(t *testing.T) {
	if raceOn {
		t.Skip("a step's allocations do not repeat under the race detector (sync.Pool drops buffers at random)")
	}
	// A collection between the measured calls empties the kernels' buffer pools, and
	// the next call allocates them again: none runs while this test measures.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	stagesOf(t, func(name string, c shard.Config, r shard.Range, first, last bool) {
		st, err := shard.NewStage(c, r, first, last, shard.WithRecompute(true))
		if err != nil {
			t.Fatal(err)
		}
		const b = 2
		in, blocks := tapeBytes(c, r, first, last, b, c.SeqLen)
		// The first tape brings the two block tapes forward shares, the next only their
		// inputs.
		var tapes [3]*shard.Tape
		for i := range tapes {
			got := allocated(func() { tapes[i] = st.NewTape(b, c.SeqLen) })
			want := in
			if i == 0 {
				want += blocks / int64(r.Len()) * int64(min(2, r.Len()))
			}
			if !closeTo(got, want) {
				t.Errorf("%s tape %d: NewTape allocated %d bytes, counted %d", name, i, got, want)
			}
		}
		// The first Backward brings the other blocks' (with the workspace), the
		// next nothing of them.
		n := b * c.SeqLen
		tokens, x, dout := make([]int32, n), make([]float32, n*c.DModel), make([]float32, n*c.DModel)
		step := func() {
			st.Forward(tapes[0], tokens, x)
			if last {
				st.Loss(tapes[0], tokens, 1)
			}
			st.Backward(tapes[0], dout)
		}
		cold := allocated(step)
		warm := min(allocated(step), allocated(step))
		rest := blocks / int64(r.Len()) * int64(r.Len()-min(2, r.Len()))
		ws := 4 * (stageScratch(c, b, c.SeqLen) - int64(c.SeqLen*c.HeadDim()))
		// At least: a compute kernel's first call may set up buffers of its own.
		if got := cold - warm; got < rest+ws-8192 {
			t.Errorf("%s: first Backward allocated %d bytes more than the next, counted %d of blocks and %d of workspace", name, got, rest, ws)
		}
		runtime.KeepAlive(tapes)
	})
}

func TestStageBuffersMatchWhatTheStageAllocates(t *testing.T) {
	if raceOn {
		t.Skip("a step's allocations do not repeat under the race detector (sync.Pool drops buffers at random)")
	}
	// A collection during a warm step empties the kernels' buffer pools, and that step
	// allocates them again, making the cold step's excess look short of the workspace:
	// none runs while this test measures.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	stagesOf(t, func(name string, c shard.Config, r shard.Range, first, last bool) {
		// NewStage: parameters, gradients and the RoPE tables.
		var st *shard.Stage
		got := allocated(func() { st, _ = shard.NewStage(c, r, first, last) })
		rope := int64(c.SeqLen * c.HeadDim())
		if want := 4 * (2*paramCount(c, r, first, last) + rope); !closeTo(got, want) {
			t.Errorf("%s: NewStage allocated %d bytes, counted %d", name, got, want)
		}
		// The first Backward allocates the workspace; later ones allocate nothing of it.
		const b = 2
		tp := st.NewTape(b, c.SeqLen)
		n := b * c.SeqLen
		tokens, x, dout := make([]int32, n), make([]float32, n*c.DModel), make([]float32, n*c.DModel)
		step := func() {
			st.Forward(tp, tokens, x)
			if last {
				st.Loss(tp, tokens, 1)
			}
			st.Backward(tp, dout)
		}
		cold := allocated(step)
		warm := min(allocated(step), allocated(step), allocated(step))
		ws := 4 * (stageScratch(c, b, c.SeqLen) - rope)
		// Compute kernels may allocate a little on any step, so allow that either way;
		// a backend's first call of each kernel may also set up a little of its own
		// (seen: 20 KB over a 93 KB workspace), and the GEMM kernels' pooled packing
		// buffers (counted in Overhead) may be made on the first step.
		packing := int64(compute.Workers()) * compute.GemmPackBytes()
		if got := cold - warm; got < ws-8192 || got > ws+ws/4+16384+packing {
			t.Errorf("%s: first Backward allocated %d bytes more than the next, workspace counted %d", name, got, ws)
		}
	})
}

func TestNeedAddsUpByHand(t *testing.T) {
	// V=4, d=2, H=1 (head dim 2), F=2, T=2, one block, first and last, micro-batch 1, 1 slot.
	c := shard.Config{Vocab: 4, DModel: 2, NLayers: 1, NHeads: 1, DFF: 2, SeqLen: 2, RopeTheta: 1e4, NormEps: 1e-5}
	// Parameters: block 2d + 4d² + 3Fd = 32, embedding Vd = 8, final norm d + head Vd = 10.
	const params = 50
	// Tape, n = 2 tokens: x0 nd = 4; block 5nd + 2n + 3nd + H·T² + 2nF + nF = 52;
	// hf, rstdF, logits = nd + n + nV = 14; the host copy of the logits nV = 8; in
	// float32s, plus 2 int32 token ids.
	const tape = 4*(4+52+14+8) + 4*2
	// Workspace 3nd + n·max(3d, 2F) + nF = 28; RoPE cos, sin 2·T·(hd/2) = 4.
	const scratch = 28 + 4
	// A validation batch of 16 sequences, n = 32: x0 nd = 64, hf, rstdF, logits 224, host
	// logits 128, 32 token ids; the block 5nd + 2n + 3nd + 16·H·T² + 2nF + nF = 832.
	const eval = 4*(64+224+128) + 4*32 + 4*832
	want := int64(4*(4*params+scratch) + tape + eval + 64<<20)
	// One stage, first and last, keeping k micro-batches in flight.
	one := func(k int) Schedule { return Schedule{Stages: 1, MicroBatches: k, InFlight: k} }
	if got := Need(c, shard.Range{Lo: 0, Hi: 1}, one(1), 0, 1, false); got != want {
		t.Errorf("Need = %d, want %d", got, want)
	}
	if got := Need(c, shard.Range{Lo: 0, Hi: 1}, one(3), 0, 1, false); got != want+2*tape {
		t.Errorf("Need with 3 slots = %d, want %d (two more tapes)", got, want+2*tape)
	}
	// Recomputing, the two more micro-batches hold only what is not the block's: x0, the
	// head's activations, the host copy of the logits and the token ids.
	const input = 4*(4+14+8) + 4*2
	if got := Need(c, shard.Range{Lo: 0, Hi: 1}, one(3), 0, 1, true); got != want+2*input {
		t.Errorf("Need with 3 slots recomputing = %d, want %d (two more inputs)", got, want+2*input)
	}
	if got := Need(c, shard.Range{Lo: 0, Hi: 1}, one(1), 0, 1, true); got != want {
		t.Errorf("Need with 1 slot recomputing = %d, want %d (as without)", got, want)
	}
	// A micro-batch of EvalBatch sequences: validation runs on a training tape.
	if got := Need(c, shard.Range{Lo: 0, Hi: 1}, one(1), 0, EvalBatch, false); got != int64(4*(4*params)+64<<20)+StageMemory(c, shard.Range{Lo: 0, Hi: 1}, one(1), 0, EvalBatch, false).Workspace+eval {
		t.Errorf("Need of a micro-batch of %d = %d: counts an evaluation tape", EvalBatch, got)
	}
	m := StageMemory(c, shard.Range{Lo: 0, Hi: 1}, one(3), 0, 1, false)
	if m.Weights != 4*params || m.Grads != 4*params || m.Optimizer != 8*params || m.Stashed != 0 || m.Activations != 3*tape || m.Evaluation != eval ||
		m.Workspace != 4*scratch || m.Overhead != Overhead || m.Total() != want+2*tape {
		t.Errorf("StageMemory = %+v, want weights, grads %d, optimizer %d, activations %d, workspace %d", m, 4*params, 8*params, 3*tape, 4*scratch)
	}
}

func TestNeedOfAGPT2SizedStageIsDominatedByAttentionTapes(t *testing.T) {
	// A 124M-parameter model cut in 4: a middle stage holds 3 blocks of 7.1M parameters,
	// 16 bytes each for weights, gradients and moments: 340 MB. A tape of 8×1024 tokens holds
	// per block n·(8d + 3F) + B·H·T² = 8192·12288 + 8·12·1024² = 201M floats, 805 MB, of which
	// half is attention probabilities; 3 blocks and 2 slots make 4.9 GB with the input
	// residuals and the host copies of the output. The backward workspace
	// n·(3d + 2F + F) adds 280 MB, the overhead 67 MB. A validation batch of 16 sequences
	// runs on a tape of its own, twice a training tape: 4.9 GB more. Recomputing, the two
	// slots keep their inputs (50 MB each, with the host copies) and one set of the 3
	// blocks' activations (2.4 GB), and validation two blocks' and its input (3.3 GB).
	c := shard.Config{Vocab: 50304, DModel: 768, NLayers: 12, NHeads: 12, DFF: 2048, SeqLen: 1024, RopeTheta: 1e4, NormEps: 1e-5}
	cut := Schedule{Stages: 4, MicroBatches: 2} // stage 1 of 4 keeps 2 in flight
	got := Need(c, shard.Range{Lo: 3, Hi: 6}, cut, 1, 8, false)
	if got < 10.5e9 || got > 10.6e9 {
		t.Errorf("Need = %d (%s), want 10.5-10.6 GB", got, FormatBytes(got))
	}
	re := Need(c, shard.Range{Lo: 3, Hi: 6}, cut, 1, 8, true)
	if re < 6.5e9 || re > 6.55e9 {
		t.Errorf("Need recomputing = %d (%s), want 6.5-6.55 GB", re, FormatBytes(re))
	}
}

func TestNeedPanicsOnImpossibleMicroBatches(t *testing.T) {
	c := shapes[0].c
	two := Schedule{Stages: 2, MicroBatches: 2}
	for _, tc := range []struct {
		p     Schedule
		s, mb int
	}{
		{two, 0, 0},
		{Schedule{Stages: 2, MicroBatches: 2, InFlight: -1}, 0, 1},
		{Schedule{Stages: 2, MicroBatches: 0}, 0, 1},
		{two, 2, 1},
		{two, -1, 1},
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("Need(stage %d of %+v, microBatch %d) did not panic", tc.s, tc.p, tc.mb)
				}
			}()
			Need(c, shard.Range{Lo: 0, Hi: 1}, tc.p, tc.s, tc.mb, false)
		}()
	}
}

func TestFormatBytesReadsLikeAPerson(t *testing.T) {
	for n, want := range map[int64]string{
		0:                "0 B",
		512:              "512 B",
		1024:             "1 KiB",
		1536:             "1.5 KiB",
		256 << 20:        "256 MiB",
		410<<20 + 300e3:  "410 MiB",
		3 << 29:          "1.5 GiB",
		12 << 30:         "12 GiB",
		5 << 40:          "5 TiB",
		-(64 << 20):      "-64 MiB",
		(1 << 63) - 1:    "8 EiB",
		10*(1<<20) + 1e5: "10.1 MiB",
	} {
		if got := FormatBytes(n); got != want {
			t.Errorf("FormatBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestSlotsFollowTheSchedulesBoundOfEachStage(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    Schedule
		want []int
	}{
		// One-forward-one-backward: stages − s, at most the micro-batches of a step.
		{"sync 1F1B", Schedule{Stages: 4, MicroBatches: 4}, []int{4, 3, 2, 1}},
		{"sync, 2 micro-batches", Schedule{Stages: 4, MicroBatches: 2}, []int{2, 2, 2, 1}},
		{"sync, in_flight 2", Schedule{Stages: 4, MicroBatches: 4, InFlight: 2}, []int{2, 2, 2, 2}},
		// Async: in_flight at stage 0, 1 + ⌈(in_flight−1)·(stages−1−s)/(stages−1)⌉ after
		// it, whether or not that spans updates.
		{"async, 16 in flight", Schedule{Stages: 4, MicroBatches: 4, InFlight: 16, Async: true}, []int{16, 11, 6, 1}},
		{"async, 4 in flight", Schedule{Stages: 4, MicroBatches: 4, InFlight: 4, Async: true}, []int{4, 3, 2, 1}},
		{"async, in_flight 0 over 2 micro-batches", Schedule{Stages: 4, MicroBatches: 2, Async: true}, []int{4, 3, 2, 1}},
	} {
		var got []int
		for s := range tc.p.Stages {
			got = append(got, tc.p.Slots(s))
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s: slots %v, want %v", tc.name, got, tc.want)
		}
	}
}
