package launcher

import (
	"fmt"
	"log/slog"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/corpus"
)

// serveData loads the run's text, cuts it as the trainer does (validation tail, one
// training shard per replica pipeline) and serves the parts over corpus.Proto.
func serveData(sp *spec.Spec, h *p2p.Host, log *slog.Logger) (*wire.DataPlan, error) {
	srv := corpus.NewServer(log.With("sys", "corpus"))
	srv.Penalise = func(p peer.ID, err error) { // err wraps p2p.ErrViolation
		score, banned := h.Penalties().Add(p, err.Error())
		log.Warn("protocol violation", "peer", p, "err", err, "score", fmt.Sprintf("%.1f", score), "banned", banned)
	}
	if sp.Data.Prepared() || !sp.Data.ByteLevel() {
		serve := servePrepared
		if !sp.Data.Prepared() {
			serve = serveTokenized
		}
		dp, err := serve(sp, srv, log)
		if err != nil {
			return nil, err
		}
		h.Handle(corpus.Proto, srv.HandleStream)
		return dp, nil
	}
	text, name, err := train.CorpusField(sp.Data.Path, sp.Data.TextField)
	if err != nil {
		return nil, err
	}
	tr, val := data.Split(text, sp.Data.ValFraction)
	if sp.Data.ValPath != "" {
		tr = text
		if val, err = data.LoadField(sp.Data.ValPath, sp.Data.TextField); err != nil {
			return nil, fmt.Errorf("data.val_path: %w", err)
		}
	}
	if data.ValWindows(val, sp.Model.SeqLen) == 0 {
		return nil, fmt.Errorf("launch: validation split of %d bytes holds no window of seq_len+1 = %d bytes; use more text or a larger data.val_fraction (or data.val_path)",
			len(val), sp.Model.SeqLen+1)
	}
	dp := &wire.DataPlan{Val: srv.Add(val)}
	for r := range sp.Pipeline.Replicas {
		dp.Train = append(dp.Train, srv.Add(data.Shard(tr, r, sp.Pipeline.Replicas)))
	}
	h.Handle(corpus.Proto, srv.HandleStream)
	log.Info("serving data", "corpus", name, "bytes", len(text), "train_shards", len(dp.Train), "val_bytes", len(val))
	return dp, nil
}

// serveTokenized tokenises the run's text with data.tokenizer, cuts it as train does
// (train.LoadDataset), and serves each replica's part and the validation part as one
// shard file each: the nodes read ids and need no tokenizer.
func serveTokenized(sp *spec.Spec, srv *corpus.Server, log *slog.Logger) (*wire.DataPlan, error) {
	tk, err := train.LoadTokenizer(sp)
	if err != nil {
		return nil, err
	}
	ds, err := train.LoadDataset(sp, tk)
	if err != nil {
		return nil, err
	}
	if data.ValWindows(ds.Val, sp.Model.SeqLen) == 0 {
		return nil, fmt.Errorf("launch: validation split of %d tokens holds no window of seq_len+1 = %d tokens; use more text or a larger data.val_fraction (or data.val_path)",
			len(ds.Val), sp.Model.SeqLen+1)
	}
	add := func(ids []int32, what string) (corpus.Blob, error) {
		b := data.EncodeShard(ids, sp.Model.Vocab)
		if len(b) > corpus.MaxBlobBytes {
			return corpus.Blob{}, fmt.Errorf("launch: the %s is %d bytes of token ids, more than the %d a blob may hold; prepare the text with 'pipeswarm data prepare' and name that directory as data.path",
				what, len(b), corpus.MaxBlobBytes)
		}
		return srv.Add(b), nil
	}
	dp := &wire.DataPlan{Shards: make([][]corpus.Blob, len(ds.Replicas)), ValTokens: int64(len(ds.Val))}
	for r, ids := range ds.Replicas {
		b, err := add(ids, fmt.Sprintf("training part of replica %d", r))
		if err != nil {
			return nil, err
		}
		dp.Shards[r] = []corpus.Blob{b}
	}
	b, err := add(ds.Val, "validation part")
	if err != nil {
		return nil, err
	}
	dp.ValShards = []corpus.Blob{b}
	log.Info("serving tokenised data", "corpus", ds.Name, "tokenizer", sp.Data.Tokenizer, "train_tokens", ds.Tokens, "val_tokens", len(ds.Val))
	return dp, nil
}

// servePrepared serves a prepared dataset's shard files as they are on disk, each
// content-addressed by the sha256 its manifest gives: replica r gets shards r, r+R,
// r+2R, … (data.ReplicaShards), replica 0's first stage also every validation shard.
// The files are mapped, not read, so the launcher's memory holds no copy of the
// dataset: the kernel pages them in as they are served.
func servePrepared(sp *spec.Spec, srv *corpus.Server, log *slog.Logger) (*wire.DataPlan, error) {
	R := sp.Pipeline.Replicas
	m, dir, err := data.ReadManifest(sp.Data.Path)
	if err != nil {
		return nil, fmt.Errorf("data.path: %w", err)
	}
	if len(m.Shards) < R {
		return nil, fmt.Errorf("data.path %s: %d shards for %d replica pipelines; each needs one at least: prepare it again with a smaller --shard-tokens", sp.Data.Path, len(m.Shards), R)
	}
	vm, vdir, err := data.ReadManifest(sp.Data.ValPath)
	if err != nil {
		return nil, fmt.Errorf("data.val_path: %w", err)
	}
	if vm.Tokens < int64(sp.Model.SeqLen+1) {
		return nil, fmt.Errorf("launch: data.val_path %s holds %d tokens, no window of seq_len+1 = %d tokens; prepare more validation text",
			sp.Data.ValPath, vm.Tokens, sp.Model.SeqLen+1)
	}
	add := func(m *data.Manifest, dir string, i int) (corpus.Blob, error) {
		b, err := m.MapShardFile(dir, i)
		if err != nil {
			return corpus.Blob{}, err
		}
		if len(b) > corpus.MaxBlobBytes {
			return corpus.Blob{}, fmt.Errorf("%s: %d bytes, more than the %d a blob may hold; prepare it again with a smaller --shard-tokens", m.Shards[i].File, len(b), corpus.MaxBlobBytes)
		}
		return srv.Add(b), nil
	}
	dp := &wire.DataPlan{Shards: make([][]corpus.Blob, R), ValTokens: vm.Tokens}
	for r := range R {
		for _, i := range data.ReplicaShards(len(m.Shards), r, R) {
			b, err := add(m, dir, i)
			if err != nil {
				return nil, fmt.Errorf("data.path: %w", err)
			}
			dp.Shards[r] = append(dp.Shards[r], b)
		}
	}
	for i := range vm.Shards {
		b, err := add(vm, vdir, i)
		if err != nil {
			return nil, fmt.Errorf("data.val_path: %w", err)
		}
		dp.ValShards = append(dp.ValShards, b)
	}
	log.Info("serving prepared shards", "dataset", sp.Data.Path, "shards", len(m.Shards), "tokens", m.Tokens, "dtype", m.Dtype,
		"replicas", R, "rule", "shard i to replica i mod replicas", "val_shards", len(vm.Shards), "val_tokens", vm.Tokens)
	return dp, nil
}
