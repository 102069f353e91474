package node

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/shard"
)

// A stage keeps its checkpoints in its run directory: the newest under the stage's
// name, and older ones beside it with ".step-N" in the name, as many as a resumed run
// may need: every one since the newest step the launcher has recorded every metrics
// row of (it says so, see prune). Stages checkpoint the same steps (core.Checkpoints)
// and stop on the same step, so a step every stage holds is always among them.

// Metadata keys of a stage checkpoint besides train's.
const (
	// metaResumable is "1" when the checkpoint is a whole step: the parameters, the
	// optimiser state, the data position and the residuals all as of its step's end.
	metaResumable = "resumable"
	metaStage     = "stage"
	metaReplica   = "replica"
	// metaTokenizer is the plan's tokenizer hash (DataPlan.TokenizerSHA256); absent for
	// bytes. An exported model carries it too.
	metaTokenizer = "pipeswarm.tokenizer_sha256"
)

// ResumePlan tells the nodes of a resumed run where to continue from: the stage
// checkpoints each kept of run Run at step Step.
type ResumePlan struct {
	Run  uint64 `json:"run"`
	Step int    `json:"step"`
}

// Held is a stage checkpoint a node holds for a run, as it answers a resuming
// launcher's offer request.
type Held struct {
	Stage   int   `json:"stage"`
	Replica int   `json:"replica"`
	Steps   []int `json:"steps"` // the whole steps it can resume from, newest first
}

// stageBase is the file name, without extension, of a stage's checkpoint.
func stageBase(idx, rep, replicas int) string {
	if replicas > 1 {
		return fmt.Sprintf("stage-%d-replica-%d", idx, rep)
	}
	return fmt.Sprintf("stage-%d", idx)
}

// ckPair is a checkpoint's two files: the weights and the optimiser state beside them.
type ckPair struct{ weights, state string }

func pairAt(dir, base string) ckPair {
	return ckPair{filepath.Join(dir, base+".safetensors"), filepath.Join(dir, base+".state.safetensors")}
}

// stagePairs are the checkpoints of a stage in dir: the newest, then the older ones
// kept, newest first.
func stagePairs(dir, base string) []ckPair {
	out := []ckPair{pairAt(dir, base)}
	type kept struct {
		step int
		p    ckPair
	}
	var ks []kept
	names, _ := filepath.Glob(filepath.Join(dir, base+".step-*.safetensors"))
	for _, n := range names {
		rest := strings.TrimSuffix(strings.TrimPrefix(filepath.Base(n), base+".step-"), ".safetensors")
		if step, err := strconv.Atoi(rest); err == nil {
			ks = append(ks, kept{step, pairAt(dir, fmt.Sprintf("%s.step-%d", base, step))})
		}
	}
	slices.SortFunc(ks, func(a, b kept) int { return b.step - a.step })
	for _, k := range ks {
		out = append(out, k.p)
	}
	return out
}

// resumableStep is the step a checkpoint pair can resume from, if its two files agree
// on it and say they are a whole step of a run of spec (any spec if spec is "").
func (p ckPair) resumableStep(spec string) (int, error) {
	// Read whole and checked against their checksums: a corrupt file is never offered
	// nor resumed from.
	wm, err := shard.VerifyCheckpoint(p.weights)
	if err != nil {
		return 0, err
	}
	sm, err := shard.VerifyCheckpoint(p.state)
	if err != nil {
		return 0, err
	}
	switch {
	case wm[train.MetaStep] != sm[train.MetaStep]:
		return 0, fmt.Errorf("%s is of step %s, %s of step %s (a crash between the two writes)", p.weights, wm[train.MetaStep], p.state, sm[train.MetaStep])
	case wm[metaResumable] != "1" || sm[metaResumable] != "1":
		return 0, fmt.Errorf("%s was written in the middle of a step", p.weights)
	case spec != "" && wm[train.MetaSpec] != spec:
		return 0, fmt.Errorf("%s was written by a run of another spec", p.weights)
	}
	return strconv.Atoi(wm[train.MetaStep])
}

// rotate makes room for a new checkpoint of step (whole, or written mid-step): the
// newest, if it is a whole step other than the one a whole one replaces, is kept
// under its step's name. A checkpoint written mid-step never replaces a whole one.
func rotate(dir, base string, step int, whole bool) error {
	newest := pairAt(dir, base)
	have, err := newest.resumableStep("")
	if err != nil || (whole && have == step) {
		return nil
	}
	to := pairAt(dir, fmt.Sprintf("%s.step-%d", base, have))
	for _, mv := range [][2]string{{newest.weights, to.weights}, {newest.state, to.state}} {
		if err := os.Rename(mv[0], mv[1]); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("keeping the previous checkpoint: %w", err)
		}
	}
	return nil
}

// prune removes the stage's kept checkpoints older than step, once it holds step:
// the launcher has recorded every metrics row up to step, which every stage
// checkpointed, so a resumed run never goes back further.
func prune(dir, base string, step int) (removed int) {
	ps := stagePairs(dir, base)
	holds := false
	for _, p := range ps {
		if s, err := p.resumableStep(""); err == nil && s == step {
			holds = true
		}
	}
	if !holds {
		return 0
	}
	for _, p := range ps[1:] {
		if s, err := p.resumableStep(""); err == nil && s < step {
			if os.Remove(p.weights) == nil {
				removed++
			}
			_ = os.Remove(p.state)
		}
	}
	return removed
}

// heldIn lists the resumable stage checkpoints of a run of spec in runDir; each
// corrupt file found is logged on log, by name, and left out.
func heldIn(runDir, spec string, stages, replicas int, log *slog.Logger) []Held {
	var out []Held
	for s := range stages {
		for r := range replicas {
			h := Held{Stage: s, Replica: r}
			for _, p := range stagePairs(runDir, stageBase(s, r, replicas)) {
				step, err := p.resumableStep(spec)
				if errors.Is(err, shard.ErrCorrupt) {
					log.Error("corrupt checkpoint: not offered for resuming", "err", err)
				}
				if err == nil && !slices.Contains(h.Steps, step) {
					h.Steps = append(h.Steps, step)
				}
			}
			if len(h.Steps) > 0 {
				slices.Sort(h.Steps)
				slices.Reverse(h.Steps)
				out = append(out, h)
			}
		}
	}
	return out
}

// resumeFrom loads into the worker's stage the checkpoint of its cell at step from
// runDir: weights, AdamW moments and step, outer state, residuals and the data
// sampler's position (applied when the data is loaded).
func (w *worker) resumeFrom(runDir string, step int) error {
	base := stageBase(w.idx, w.rep, w.sp.Pipeline.Replicas)
	var pair *ckPair
	var why []string
	for _, p := range stagePairs(runDir, base) {
		s, err := p.resumableStep(w.sp.String())
		if err == nil && s == step {
			pair = &p
			break
		}
		if err != nil {
			why = append(why, err.Error())
		} else {
			why = append(why, fmt.Sprintf("%s is of step %d", p.weights, s))
		}
	}
	if pair == nil {
		return fmt.Errorf("no checkpoint of %s at step %d here: %s", base, step, strings.Join(why, "; "))
	}
	ck, err := shard.LoadSealed(pair.weights)
	if err != nil {
		return err
	}
	if err := w.stage.Load(ck); err != nil {
		return err
	}
	st, err := shard.LoadSealed(pair.state)
	if err != nil {
		return err
	}
	get := func(name string, dst []float32) error {
		t, ok := st.Tensors[name]
		if !ok {
			return fmt.Errorf("%s has no %s", pair.state, name)
		}
		if len(t.Data) != len(dst) {
			return fmt.Errorf("%s: %s has %d values, want %d", pair.state, name, len(t.Data), len(dst))
		}
		copy(dst, t.Data)
		return nil
	}
	n := len(w.stage.Params)
	m, v := make([]float32, n), make([]float32, n)
	if err := errors.Join(get("adam_m", m), get("adam_v", v)); err != nil {
		return err
	}
	adamStep, err := strconv.Atoi(st.Metadata["adam_step"])
	if err != nil {
		return fmt.Errorf("%s: adam_step: %w", pair.state, err)
	}
	if err := w.opt.SetState(adamStep, m, v); err != nil {
		return err
	}
	if w.outer != nil {
		if err := errors.Join(get("global", w.outer.Global), get("outer_momentum", w.outer.Momentum())); err != nil {
			return err
		}
		if r := w.outer.Residual(); r != nil {
			if err := get("ef_residual", r); err != nil {
				return err
			}
		}
		if w.outer.Rounds, err = strconv.Atoi(st.Metadata["outer_steps"]); err != nil {
			return fmt.Errorf("%s: outer_steps: %w", pair.state, err)
		}
		w.serve(uint64(step)*uint64(w.sp.DiLoCo.Fragments) + uint64(w.sp.DiLoCo.Fragments-1))
	}
	for _, b := range []struct {
		name string
		b    *train.Boundary
	}{{"in_ef_residual", w.inB}, {"out_ef_residual", w.outB}} {
		if t, ok := st.Tensors[b.name]; ok && b.b != nil {
			b.b.SetResidual(t.Data)
		}
	}
	if w.stage.First {
		if w.resumeSampler, err = hex.DecodeString(st.Metadata["sampler"]); err != nil || len(w.resumeSampler) == 0 {
			return fmt.Errorf("%s: no data sampler position: %v", pair.state, err)
		}
	}
	// The new run's directory starts with the checkpoint it resumed from, so that if
	// this run stops too, even before its first step, it can be resumed in turn.
	if filepath.Clean(runDir) != filepath.Clean(w.dir) {
		if err := os.MkdirAll(w.dir, 0o755); err != nil {
			return err
		}
		to := pairAt(w.dir, base)
		if err := errors.Join(shard.CopyCheckpoint(to.weights, pair.weights), shard.CopyCheckpoint(to.state, pair.state)); err != nil {
			return fmt.Errorf("keeping the resumed checkpoint: %w", err)
		}
	}
	// Nothing trained yet: stopping now keeps the copy rather than writing a
	// checkpoint without the data position, which is only known once the data loads.
	w.doneStep, w.ckStep, w.stepped = step, step, false
	w.log.Info("resuming from checkpoint", "step", step, "checkpoint", pair.weights)
	return nil
}

// RunFile records, in a launched run's directory, which run it is (and what it
// resumed), so that `launch --resume` can find the nodes' checkpoints of it.
const RunFile = "run.json"

type runRecord struct {
	Run    string      `json:"run"` // hex, as nodes name its directory
	Resume *ResumePlan `json:"resumed_from,omitempty"`
	// TokenizerSHA256 is the sha256 of the tokenizer the run's ids come from (see
	// tokenizerSHA256); empty for bytes.
	TokenizerSHA256 string `json:"tokenizer_sha256,omitempty"`

	id uint64
}

func writeRunRecord(dir string, r runRecord) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, "."+RunFile+".tmp")
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("launch: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, RunFile)); err != nil {
		return fmt.Errorf("launch: %w", err)
	}
	return nil
}

// readRunRecord reads what a resumed launch continues: the run in dir, which must have
// been a run of sp.
func readRunRecord(dir string, sp *spec.Spec) (*runRecord, error) {
	b, err := os.ReadFile(filepath.Join(dir, RunFile))
	if err != nil {
		return nil, fmt.Errorf("launch: nothing to resume in %s (no %s: was the run launched into it?): %w", dir, RunFile, err)
	}
	var r runRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("launch: resume: %s: %w", filepath.Join(dir, RunFile), err)
	}
	if r.id, err = strconv.ParseUint(r.Run, 16, 64); err != nil || r.id == 0 {
		return nil, fmt.Errorf("launch: resume: %s: run %q is not a run ID", filepath.Join(dir, RunFile), r.Run)
	}
	was, err := os.ReadFile(filepath.Join(dir, train.SpecFile))
	if err != nil {
		return nil, fmt.Errorf("launch: nothing to resume in %s: %w", dir, err)
	}
	if string(was) != sp.String() {
		return nil, fmt.Errorf("launch: resume: %s was a run of another spec (or other overrides); resume with the spec in %s",
			dir, filepath.Join(dir, train.SpecFile))
	}
	return &r, nil
}

// tokenizerSHA256 is the hex sha256 of the tokenizer sp's token ids come from: the
// data.tokenizer file, or else the one a prepared data.path's manifest names; "" for
// bytes. The signed plan carries it, so that it binds the exact tokenizer, and a
// resumed run checks that it has not changed.
func tokenizerSHA256(sp *spec.Spec) (string, error) {
	if !sp.Data.ByteLevel() {
		raw, err := os.ReadFile(sp.Data.Tokenizer)
		if err != nil {
			return "", fmt.Errorf("data.tokenizer: %w", err)
		}
		sum := sha256.Sum256(raw)
		return hex.EncodeToString(sum[:]), nil
	}
	if sp.Data.Prepared() {
		m, _, err := data.ReadManifest(sp.Data.Path)
		if err != nil {
			return "", fmt.Errorf("data.path: %w", err)
		}
		return m.TokenizerSHA256, nil
	}
	return "", nil
}

// checkSameTokenizer refuses to resume run r with a tokenizer other than the one it
// started with (now is tokenizerSHA256 of the spec): its ids would mean other text. A
// record without a hash (bytes, or written before runs recorded one) is not checked.
func checkSameTokenizer(r *runRecord, sp *spec.Spec, now string) error {
	if r.TokenizerSHA256 == "" || r.TokenizerSHA256 == now {
		return nil
	}
	what := fmt.Sprintf("data.tokenizer %q", sp.Data.Tokenizer)
	if sp.Data.ByteLevel() {
		what = fmt.Sprintf("the tokenizer of data.path %q (its manifest's tokenizer_sha256)", sp.Data.Path)
	}
	return fmt.Errorf("launch: resume: %s has changed since run %s started: its sha256 is now %s, the run's was %s (run.json); the run's token ids need the tokenizer it started with: put that file back, or launch a new run",
		what, r.Run, orNone(now), r.TokenizerSHA256)
}

func orNone(h string) string {
	if h == "" {
		return "none (bytes)"
	}
	return h
}

// resumePoint picks the step a resumed run continues from — the newest step, no later
// than through (the last step whose metrics rows are all recorded), of which some
// offering node holds a checkpoint for every cell — and orders the offers so that
// assign.Plan, first fit in cell order, gives each cell to a node that holds it.
// Failing that, its error (wrapping errNoCommonStep) says which cell lacks which step.
func resumePoint(sp *spec.Spec, run uint64, through int, offers []assign.Offer, held map[string][]Held) (*ResumePlan, []assign.Offer, error) {
	S, R := sp.Pipeline.Stages, sp.Pipeline.Replicas
	holders := map[[2]int]map[int][]string{} // cell -> step -> peers
	steps := map[int]bool{}
	late := map[[2]int][]int{} // cell -> steps held but after through
	for _, o := range offers {
		for _, h := range held[o.Peer] {
			c := [2]int{h.Stage, h.Replica}
			if holders[c] == nil {
				holders[c] = map[int][]string{}
			}
			for _, s := range h.Steps {
				if s > through || s >= sp.Train.Steps {
					if !slices.Contains(late[c], s) {
						late[c] = append(late[c], s)
					}
					continue
				}
				holders[c][s] = append(holders[c][s], o.Peer)
				steps[s] = true
			}
		}
	}
	candidates := slices.Sorted(maps.Keys(steps))
	slices.Reverse(candidates)
	for _, step := range candidates {
		order, ok := orderHolders(S, R, step, holders)
		if !ok {
			continue
		}
		byPeer := map[string]assign.Offer{}
		for _, o := range offers {
			byPeer[o.Peer] = o
		}
		var out []assign.Offer
		for _, p := range order {
			out = append(out, byPeer[p])
		}
		for _, o := range offers { // the rest after, unused
			if !slices.Contains(order, o.Peer) {
				out = append(out, o)
			}
		}
		return &ResumePlan{Run: run, Step: step}, out, nil
	}
	var cells []string
	for r := range R {
		for s := range S {
			c := [2]int{s, r}
			name := cellName(sp, assign.Assignment{Stage: s, Replica: r})
			have := slices.Sorted(maps.Keys(holders[c]))
			slices.Reverse(have)
			l := slices.Sorted(slices.Values(late[c]))
			switch {
			case len(have) == 0 && len(l) == 0:
				cells = append(cells, name+" holds none")
			case len(have) == 0 && through < sp.Train.Steps:
				cells = append(cells, fmt.Sprintf("%s holds only step %s, after step %d", name, joinInts(l), through))
			case len(have) == 0:
				cells = append(cells, fmt.Sprintf("%s holds only step %s, the run's end", name, joinInts(l)))
			default:
				cells = append(cells, fmt.Sprintf("%s holds step %s", name, joinInts(have)))
			}
		}
	}
	why := fmt.Sprintf("no step of run %016x has a checkpoint of every stage on the nodes offered: %s", run, strings.Join(cells, "; "))
	if len(late) > 0 && through < sp.Train.Steps {
		why += fmt.Sprintf(" (metrics.jsonl records every step only up to step %d; a run resumes from no later step)", through)
	}
	return nil, nil, fmt.Errorf("%w: %s", errNoCommonStep, why)
}

// errNoCommonStep: the nodes offered hold no step of a run's checkpoints for every
// stage.
var errNoCommonStep = errors.New("no common checkpoint")

func joinInts(xs []int) string {
	var b strings.Builder
	for i, x := range xs {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(strconv.Itoa(x))
	}
	return b.String()
}

// orderHolders picks a distinct holder of step for every cell, in assign.Plan's cell
// order (replica-major), trying holders in offer order.
func orderHolders(S, R, step int, holders map[[2]int]map[int][]string) ([]string, bool) {
	var order []string
	for r := range R {
		for s := range S {
			found := false
			for _, p := range holders[[2]int{s, r}][step] {
				if !slices.Contains(order, p) {
					order = append(order, p)
					found = true
					break
				}
			}
			if !found {
				return nil, false
			}
		}
	}
	return order, true
}

// resumeHolders checks that a resumed plan gives every cell to a node holding its
// checkpoint (assign.Plan may have passed over a holder too small for its stage).
func resumeHolders(sp *spec.Spec, resume *ResumePlan, stages []assign.Assignment, offers []assign.Offer) error {
	if resume == nil {
		return nil
	}
	for i, a := range stages {
		if i >= len(offers) || offers[i].Peer != a.Peer {
			return fmt.Errorf("resume: %s's checkpoint is on a node that cannot hold it now (its memory budget or free slots changed)", cellName(sp, a))
		}
	}
	return nil
}

// keptRows is what a resumed run keeps of its metrics.jsonl: the rows up to the step
// it continues from, as they were.
type keptRows struct {
	rows     []json.RawMessage
	steps    []metrics.Step
	tokens   int64
	elapsedS float64
}

func readKeptRows(path string, step int) (*keptRows, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("launch: resume: %w", err)
	}
	k := &keptRows{}
	for _, line := range bytes.Split(b, []byte("\n")) {
		var probe struct {
			Step     int      `json:"step"`
			Loss     *float64 `json:"loss"`
			Tokens   int64    `json:"tokens"`
			ElapsedS float64  `json:"elapsed_s"`
		}
		// A row torn by a crash, or of a step after the checkpoint, is dropped.
		if line = bytes.TrimSpace(line); len(line) == 0 || json.Unmarshal(line, &probe) != nil || probe.Step > step {
			continue
		}
		k.rows = append(k.rows, json.RawMessage(line))
		k.tokens = max(k.tokens, probe.Tokens)
		k.elapsedS = max(k.elapsedS, probe.ElapsedS)
		if probe.Loss != nil {
			var st metrics.Step
			if err := json.Unmarshal(line, &st); err == nil {
				k.steps = append(k.steps, st)
			}
		}
	}
	return k, nil
}

// recordedThrough is the last step s such that metrics.jsonl at path holds a row of
// replica 0 for every step 1..s and, with replicas, a row of every other replica at s
// or later. A run stopped between a step's checkpoint and its row (a launcher killed
// while an evaluated step's row waited for its validation loss; a replica's row may be
// the one in flight when the launcher died) must not resume after it: that row would
// be missing for good. (A
// replica pipeline broken for good holds no checkpoint of a later step anyway.)
func recordedThrough(path string) int {
	k, err := readKeptRows(path, math.MaxInt)
	if err != nil {
		return 0
	}
	have := map[int]bool{}
	latest := map[int]int{} // replica > 0 -> its last row
	for _, s := range k.steps {
		if s.Replica == nil || *s.Replica == 0 {
			have[s.Step] = true
		} else {
			latest[*s.Replica] = max(latest[*s.Replica], s.Step)
		}
	}
	n := 0
	for have[n+1] {
		n++
	}
	for _, l := range latest {
		n = min(n, l)
	}
	return n
}

// serve publishes the state a replica that falls behind or joins fetches: the global
// weights and outer momentum as of round, and this replica's AdamW moments.
func (w *worker) serve(round uint64) {
	m, v := w.opt.Moments()
	w.served.set(round, w.outer.Global, w.outer.Momentum(), m, v)
}

// rejoin brings this stage into a running run as the plan's Join says: it fetches
// the stage's global weights and outer momentum from every live replica at once and
// AdamW moments from one (each vector verified by its sha256; see reduce.FetchState),
// which must be as of the outer step
// after the plan's step, and puts the data sampler where this replica's would be.
// The all-reduce group counts it in from the next round.
func (w *worker) rejoin() error {
	j := w.plan.Join
	want := uint64(j.Step)*uint64(w.sp.DiLoCo.Fragments) + uint64(w.sp.DiLoCo.Fragments-1)
	t0 := time.Now()
	w.connectReplicas() // the group fetches over connections that exist
	round, vecs, err := w.group.FetchStateAt(w.ctx, want)
	if err != nil {
		return fmt.Errorf("rejoin: fetching the stage's state: %w", err)
	}
	n := len(w.stage.Params)
	switch {
	case round != want:
		return fmt.Errorf("rejoin: the live replicas are at round %d, the plan's step %d is round %d (they moved on: rejoin at a later step)", round, j.Step, want)
	case len(vecs) != 4 || len(vecs[0]) != n || len(vecs[1]) != n || len(vecs[2]) != n || len(vecs[3]) != n:
		return fmt.Errorf("rejoin: fetched state has the wrong shape (%d vectors)", len(vecs))
	}
	copy(w.outer.Global, vecs[0])
	copy(w.outer.Momentum(), vecs[1])
	copy(w.stage.Params, vecs[0])
	// Every replica has taken as many inner steps: the moments' step count is j.Step.
	if err := w.opt.SetState(j.Step, vecs[2], vecs[3]); err != nil {
		return fmt.Errorf("rejoin: %w", err)
	}
	for s := 1; s <= j.Step; s++ {
		if w.sp.DiLoCo.SyncAt(s, w.sp.Train.Steps) {
			w.outer.Rounds++
		}
	}
	w.serve(round)
	if w.sampler != nil {
		// This replica's data stream, where it would be after j.Step steps.
		mb := w.sp.Train.BatchSize / w.sp.Pipeline.MicroBatches
		io := w.slotIO[0]
		for range j.Step * w.sp.Pipeline.MicroBatches {
			w.sampler.Next(io.tokens[:mb*w.stage.Config.SeqLen], io.targets[:mb*w.stage.Config.SeqLen])
		}
	}
	w.doneStep, w.ckStep, w.stepped = j.Step, j.Step, true
	if err := w.stepTaken(j.Step); err != nil {
		return err
	}
	rep := w.group.LastFetch()
	w.log.Info("rejoined: state fetched and verified", "step", j.Step, "round", round, "weights_hash", w.outer.Hash(),
		"replicas", len(rep.Pieces), "pieces_resent", rep.Resent, "took", time.Since(t0).Round(time.Millisecond))
	return nil
}

// launcherFile, in a run's directory on a node, says who launched the run and where
// it listened, so that a node that restarts can let the launcher know it is back.
const launcherFile = "launcher.json"

type launcherRecord struct {
	Launcher string   `json:"launcher"`
	Addrs    []string `json:"addrs"`
	// ResumedFrom is the run (hex) whose checkpoints this run started from: pruning
	// keeps it while this run is kept.
	ResumedFrom string `json:"resumed_from,omitempty"`
}

func writeLauncherRecord(runDir string, plan *Plan) error {
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		return err
	}
	rec := launcherRecord{Launcher: plan.Launcher, Addrs: plan.LauncherAddrs}
	if plan.Resume != nil {
		rec.ResumedFrom = fmt.Sprintf("%016x", plan.Resume.Run)
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	tmp := filepath.Join(runDir, "."+launcherFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(runDir, launcherFile))
}

// relaunchWindow is how recent a run must be for a restarted node to dial its
// launcher: long enough for a run that is still going, short enough not to knock on
// the doors of launchers long gone.
const relaunchWindow = 24 * time.Hour

// redialLaunchers connects to the launchers of the runs this node held lately (their
// records written in the last relaunchWindow), so that a node restarted after a crash
// or a stop is seen again by a launcher that wants its stage back, whatever port
// either comes back on. The latest run's launcher is dialled first; a launcher that
// ran several of them is dialled once with every address any of them recorded (an
// earlier launch by the same key listened elsewhere). Launchers not reached are tried
// again a few times over the first minute: one may be between two parts of a run.
func (d *Daemon) redialLaunchers(ctx context.Context) {
	targets := launcherTargets(d.dir.RunDir("*"), time.Now())
	for _, wait := range []time.Duration{0, 2 * time.Second, 5 * time.Second, 10 * time.Second, 20 * time.Second, 30 * time.Second} {
		if len(targets) == 0 {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		var left []launcherTarget
		for _, t := range targets {
			if p2p.Linked(d.host.Network(), t.id) {
				continue // it dialled us, or another part of the node did
			}
			d.addAddrs(t.id, t.addrs)
			cctx, cancel := context.WithTimeout(p2p.AllowRelayed(ctx, "launcher"), 10*time.Second)
			err := d.host.Host.Connect(cctx, peer.AddrInfo{ID: t.id})
			cancel()
			if err == nil {
				d.log.Info("reconnected to the launcher of a run held here before", "launcher", t.id, "run_dir", t.runDir)
				continue
			}
			d.log.Debug("launcher of an earlier run unreachable", "launcher", t.id, "err", err)
			left = append(left, t)
		}
		targets = left
	}
	for _, t := range targets {
		d.log.Debug("the launcher of a run held here before is not reachable; it finds this node again if it lists it as a --peer",
			"launcher", t.id, "run_dir", t.runDir)
	}
}

// launcherTarget is a launcher a restarted node dials: every address its runs'
// records gave, the latest run's first.
type launcherTarget struct {
	id     peer.ID
	addrs  []string
	runDir string // the latest run it launched here
	at     time.Time
}

// launcherTargets reads the launcher records matching glob (run directories) written
// within relaunchWindow of now: one target per launcher, latest run first.
func launcherTargets(runGlob string, now time.Time) []launcherTarget {
	type rec struct {
		r   launcherRecord
		dir string
		at  time.Time
	}
	paths, _ := filepath.Glob(filepath.Join(runGlob, launcherFile))
	var recs []rec
	for _, path := range paths {
		st, err := os.Stat(path)
		if err != nil || now.Sub(st.ModTime()) > relaunchWindow {
			continue
		}
		b, err := os.ReadFile(path)
		var r launcherRecord
		if err != nil || json.Unmarshal(b, &r) != nil {
			continue
		}
		recs = append(recs, rec{r, filepath.Dir(path), st.ModTime()})
	}
	slices.SortStableFunc(recs, func(a, b rec) int { return b.at.Compare(a.at) })
	var out []launcherTarget
	index := map[peer.ID]int{}
	for _, r := range recs {
		id, err := peer.Decode(r.r.Launcher)
		if err != nil {
			continue
		}
		i, ok := index[id]
		if !ok {
			i, index[id] = len(out), len(out)
			out = append(out, launcherTarget{id: id, runDir: r.dir, at: r.at})
		}
		for _, a := range r.r.Addrs {
			if !slices.Contains(out[i].addrs, a) {
				out[i].addrs = append(out[i].addrs, a)
			}
		}
	}
	return out
}
