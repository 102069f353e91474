package launcher

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/ckpt"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/clock"
	"github.com/pipeswarm/pipeswarm/shard"
)

// Export assembles a launched run's model from its stages. A node hands a stage's
// checkpoint of a run over p2p.ProtoWeights only to that run's launcher (the peer ID
// that signed its plan, as the connection proves it), only where the run's spec says
// export: allowed and only if the node consents (its config's export: allow). The
// launcher checks each checkpoint against the run's spec and the stage's layout, and
// writes model.safetensors (Llama tensor names, as train writes it) and config.json.
//
// With replicas, a run ends with an outer step, after which every replica of a stage
// holds the stage's global weights: the DiLoCo model. Replica 0's checkpoint is taken,
// or at that last step another replica's where replica 0's is not to be had.

// exportErr is an export that failed for want of a stage's weights; refused if a
// node said no.
type exportErr struct {
	msg     string
	refused bool
}

func (e *exportErr) Error() string { return e.msg }
func (e *exportErr) Unwrap() error {
	if e.refused {
		return wire.ErrExportRefused
	}
	return nil
}

// ExportResult is an assembled model.
type ExportResult struct {
	Model  string `json:"model"`  // RUN_DIR/model.safetensors
	Config string `json:"config"` // RUN_DIR/config.json
	Step   int    `json:"step"`   // the step its weights are of
	// From names, per stage, the node and replica whose checkpoint was taken.
	From []string `json:"from"`
}

// ExportOptions configure Export.
type ExportOptions struct {
	Key    crypto.PrivKey // the run's launcher key
	Peers  []string       // multiaddrs of the nodes that hold the run's stages
	RunDir string         // the launched run's directory: spec.yaml, run.json; the model goes here
	Log    *slog.Logger
}

// Export assembles, from the nodes' checkpoints, the model of the run launched into
// o.RunDir, as of the newest step every stage holds.
func Export(ctx context.Context, o ExportOptions) (*ExportResult, error) {
	log := o.Log
	if log == nil {
		log = slog.Default()
	}
	src, err := os.ReadFile(filepath.Join(o.RunDir, train.SpecFile))
	if err != nil {
		return nil, fmt.Errorf("export: %s is not a launched run's directory: %w", o.RunDir, err)
	}
	sp, err := spec.Parse(src, filepath.Join(o.RunDir, train.SpecFile))
	if err != nil {
		return nil, err
	}
	if sp.Export != spec.ExportAllowed {
		return nil, fmt.Errorf("%w: %s says export: %s: the run is a protocol model, whose weights stay on the nodes that trained them (only a run whose spec says export: allowed can be exported)",
			wire.ErrExportRefused, filepath.Join(o.RunDir, train.SpecFile), sp.Export)
	}
	rec, err := readRunRecord(o.RunDir, sp)
	if err != nil {
		return nil, err
	}
	if len(o.Peers) == 0 {
		return nil, errors.New("export: no peers given (--peer MULTIADDR of the nodes that hold the run's stages)")
	}
	h, err := p2p.NewHost(ctx, p2p.HostOptions{Key: o.Key, Log: log.With("sys", "p2p")})
	if err != nil {
		return nil, err
	}
	defer h.Close()
	var ids []peer.ID
	var problems []string
	for _, a := range o.Peers {
		id, err := h.Connect(ctx, a)
		if err != nil {
			problems = append(problems, err.Error())
			continue
		}
		ids = append(ids, id)
	}
	if len(ids) == 0 {
		return nil, fmt.Errorf("export: no node reachable: %s", strings.Join(problems, "; "))
	}
	calls := wire.NewCallClock(time.Duration(sp.Pipeline.StaffTimeout)*time.Second, nil)
	return collect(ctx, h, calls, sp, rec.id, ids, o.RunDir, log)
}

// collect asks the nodes ids which checkpoints of run they hold, picks the newest
// step every stage has, fetches each stage's checkpoint of it and writes the model
// into dir.
func collect(ctx context.Context, h *p2p.Host, calls *wire.CallClock, sp *spec.Spec, run uint64, ids []peer.ID, dir string, log *slog.Logger) (*ExportResult, error) {
	S, R := sp.Pipeline.Stages, sp.Pipeline.Replicas
	type holder struct {
		id      peer.ID
		replica int
	}
	at := map[int]map[int][]holder{} // step → stage → holders, replica 0 first
	var silent []string              // nodes that did not say what they hold, and why
	for _, id := range ids {
		r, err := wire.Call(ctx, h, calls, nil, id, wire.Msg{Type: wire.MsgOffer, Run: run, Spec: sp.String()})
		if err == nil && !r.OK {
			err = errors.New(r.Error)
		}
		if err != nil {
			silent = append(silent, fmt.Sprintf("%s: %v", id, err))
			continue
		}
		for _, hd := range r.Held {
			if hd.Stage < 0 || hd.Stage >= S || hd.Replica < 0 || hd.Replica >= R {
				continue
			}
			for _, step := range hd.Steps {
				// Replicas agree only right after the run's last outer step: other
				// replicas' weights stand in for replica 0's only at the final step.
				if hd.Replica != 0 && step != sp.Train.Steps {
					continue
				}
				if at[step] == nil {
					at[step] = map[int][]holder{}
				}
				at[step][hd.Stage] = append(at[step][hd.Stage], holder{id, hd.Replica})
			}
		}
	}
	var steps []int
	for step, byStage := range at {
		if len(byStage) == S {
			steps = append(steps, step)
		}
	}
	if len(steps) == 0 {
		var have []string
		for s := range S {
			n := 0
			for _, byStage := range at {
				n += len(byStage[s])
			}
			if n == 0 {
				have = append(have, fmt.Sprintf("stage %d", s))
			}
		}
		why := ""
		if len(silent) > 0 {
			why = "; not answered: " + strings.Join(silent, "; ")
		}
		if len(have) > 0 {
			return nil, fmt.Errorf("export: no checkpoint of run %016x for %s on the nodes given (pass the nodes that held them with --peer)%s", run, strings.Join(have, ", "), why)
		}
		return nil, fmt.Errorf("export: the nodes given hold checkpoints of run %016x, but of no step common to every stage", run)
	}
	step := slices.Max(steps)
	be, err := train.Backend(sp)
	if err != nil {
		return nil, err
	}
	stages, err := shard.NewStages(train.ModelConfig(sp), S, shard.WithBackend(be))
	if err != nil {
		return nil, err
	}
	res := &ExportResult{Step: step}
	for s := range S {
		hs := at[step][s]
		slices.SortStableFunc(hs, func(a, b holder) int { return a.replica - b.replica })
		var refusals []string
		got := false
		for _, hd := range hs {
			err := fetchWeights(ctx, h, hd.id, sp, wire.WeightsReq{Run: run, Stage: s, Replica: hd.replica, Step: step}, stages[s])
			if err == nil {
				from := fmt.Sprintf("stage %d from %s", s, hd.id)
				if R > 1 {
					from = fmt.Sprintf("stage %d from replica %d on %s", s, hd.replica, hd.id)
				}
				res.From = append(res.From, from)
				got = true
				break
			}
			refusals = append(refusals, fmt.Sprintf("%s on %s: %v", wire.CellName(sp, cellAt(s, hd.replica)), hd.id, err))
		}
		if !got {
			err := &exportErr{msg: "export: " + strings.Join(refusals, "; ")}
			for _, r := range refusals {
				err.refused = err.refused || strings.Contains(r, wire.ErrExportRefused.Error())
			}
			return nil, err
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	res.Model, res.Config = filepath.Join(dir, train.CheckpointFile), filepath.Join(dir, train.HFConfigFile)
	meta := map[string]string{train.MetaSpec: sp.String(), train.MetaStep: strconv.Itoa(step)}
	var tokSum string // the run's, from run.json
	if rec, err := readRunRecord(dir, sp); err == nil && rec.TokenizerSHA256 != "" {
		tokSum = rec.TokenizerSHA256
		meta[ckpt.MetaTokenizer] = tokSum
	}
	if err := shard.SaveCheckpoint(res.Model, meta, stages...); err != nil {
		return nil, err
	}
	hf, err := shard.HFConfig(train.ModelConfig(sp))
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(res.Config, hf, 0o644); err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	if !sp.Data.ByteLevel() {
		// The launcher's tokenizer.json beside config.json, as train writes it, so the
		// directory reads as a Hugging Face model.
		raw, err := os.ReadFile(sp.Data.Tokenizer)
		if sum := sha256.Sum256(raw); err == nil && tokSum != "" && hex.EncodeToString(sum[:]) != tokSum {
			err = fmt.Errorf("its sha256 is now %x, the run's was %s (run.json): it changed since the run started", sum, tokSum)
		}
		if err != nil {
			log.Warn("model assembled without its tokenizer.json", "data.tokenizer", sp.Data.Tokenizer, "err", err)
		} else if err := os.WriteFile(filepath.Join(dir, train.TokenizerFile), raw, 0o644); err != nil {
			return nil, fmt.Errorf("export: %w", err)
		}
	}
	log.Info("model assembled", "model", res.Model, "step", step, "from", res.From)
	return res, nil
}

// fetchWeights asks id for its checkpoint of a cell and loads it into st after checking
// it: at most the size the stage's layout gives, every tensor the stage owns with its
// shape, finite values, and the run's spec and step in its metadata.
func fetchWeights(ctx context.Context, h *p2p.Host, id peer.ID, sp *spec.Spec, req wire.WeightsReq, st *shard.Stage) error {
	limit := 4*int64(len(st.Params)) + 1<<20 // the tensors, and a header with the spec
	ctx, cancel := context.WithTimeout(ctx, clock.Deadline(time.Duration(limit>>18)*time.Second, h.Peerstore().LatencyEWMA(id), clock.Busy))
	defer cancel()
	s, err := h.NewStream(p2p.AllowRelayed(ctx, "export"), id, p2p.ProtoWeights)
	if err != nil {
		return err
	}
	defer s.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = s.SetDeadline(dl)
	}
	if err := p2p.WriteMsg(s, req); err != nil {
		s.Reset()
		return err
	}
	var r wire.WeightsReply
	if err := p2p.ReadMsg(s, &r, wire.MaxWeightsMsg); err != nil {
		s.Reset()
		return fmt.Errorf("no reply: %w", err)
	}
	if !r.OK {
		return errors.New(r.Error)
	}
	bad := func(format string, args ...any) error {
		s.Reset()
		err := fmt.Errorf("%w: stage weights: "+format, append([]any{p2p.ErrBadMsg}, args...)...)
		h.Penalties().Add(id, err.Error())
		return err
	}
	if r.Bytes <= 0 || r.Bytes > limit {
		return bad("%d bytes, want at most %d for stage %d", r.Bytes, limit, req.Stage)
	}
	ck, err := shard.ReadCheckpoint(io.LimitReader(s, r.Bytes))
	if err != nil {
		return bad("%v", err)
	}
	switch {
	case ck.Metadata[train.MetaSpec] != sp.String():
		return bad("a checkpoint of another spec")
	case ck.Metadata[train.MetaStep] != strconv.Itoa(req.Step):
		return bad("a checkpoint of step %s, asked for %d", ck.Metadata[train.MetaStep], req.Step)
	case ck.Metadata[ckpt.MetaStage] != strconv.Itoa(req.Stage):
		return bad("a checkpoint of stage %s, asked for %d", ck.Metadata[ckpt.MetaStage], req.Stage)
	}
	for name, t := range ck.Tensors {
		for _, v := range t.Data {
			if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
				return bad("tensor %s holds %g", name, v)
			}
		}
	}
	if err := st.Load(ck); err != nil {
		return bad("%v", err)
	}
	return nil
}

// warnNoExport says, before a run starts, which of its cells went to nodes that do not
// consent to export: the model can be assembled at the end only if another replica of
// each such stage holds it.
func warnNoExport(sp *spec.Spec, cells []assign.Assignment, offers []assign.Offer, log *slog.Logger) {
	deny := map[string]bool{}
	for _, o := range offers {
		deny[o.Peer] = o.NoExport
	}
	for _, a := range cells {
		if deny[a.Peer] {
			log.Warn("the node holding "+wire.CellName(sp, a)+" does not consent to export (its config says export: deny; --export allow on the node consents): "+
				"the model is assembled at the end only if another replica of the stage gives its weights", "peer", a.Peer)
		}
	}
}

// cellAt is the cell of stage s in replica pipeline r, for wire.CellName.
func cellAt(s, r int) assign.Assignment { return assign.Assignment{Stage: s, Replica: r} }
