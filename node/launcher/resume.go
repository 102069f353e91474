package launcher

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/node/wire"
)

// RunFile records, in a launched run's directory, which run it is (and what it
// resumed), so that `launch --resume` can find the nodes' checkpoints of it.
const RunFile = "run.json"

type runRecord struct {
	Run    string           `json:"run"` // hex, as nodes name its directory
	Resume *wire.ResumePlan `json:"resumed_from,omitempty"`
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
func resumePoint(sp *spec.Spec, run uint64, through int, offers []assign.Offer, held map[string][]wire.Held) (*wire.ResumePlan, []assign.Offer, error) {
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
		return &wire.ResumePlan{Run: run, Step: step}, out, nil
	}
	var cells []string
	for r := range R {
		for s := range S {
			c := [2]int{s, r}
			name := wire.CellName(sp, assign.Assignment{Stage: s, Replica: r})
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
func resumeHolders(sp *spec.Spec, resume *wire.ResumePlan, stages []assign.Assignment, offers []assign.Offer) error {
	if resume == nil {
		return nil
	}
	for i, a := range stages {
		if i >= len(offers) || offers[i].Peer != a.Peer {
			return fmt.Errorf("resume: %s's checkpoint is on a node that cannot hold it now (its memory budget or free slots changed)", wire.CellName(sp, a))
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
