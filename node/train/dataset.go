package train

import (
	"fmt"
	"path/filepath"

	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/data/tokenizer"
	"github.com/pipeswarm/pipeswarm/node/spec"
)

// Dataset is what a run trains and evaluates on: each replica pipeline's training tokens
// and the validation tokens.
type Dataset struct {
	Name     string            // the corpus, for logs
	Replicas [][]int32         // [replica]; text
	Views    []*data.ShardView // [replica]; a prepared dataset's shard files, read as sampled
	Val      []int32
	Tokens   int // training tokens, all replicas'
}

// Sampler returns replica r's sampler of training sequences.
func (d *Dataset) Sampler(r, seqLen int, seed uint64) (*data.Sampler[int32], error) {
	if d.Views != nil {
		return data.NewViewSampler(d.Views[r], seqLen, seed, r)
	}
	return data.NewSampler(d.Replicas[r], seqLen, seed, r)
}

// LoadDataset reads sp's data and cuts it for sp's replica pipelines:
//   - a prepared data.path: replica r trains on its shards (data.ReplicaShards: shard i goes
//     to replica i mod replicas) one after another, read from the files as windows are drawn (each
//     checked against its manifest hash); validation is all of data.val_path's shards;
//   - text with data.val_path: all of data.path is training text, cut into one contiguous
//     part per replica (data.Shard); validation is data.val_path's text;
//   - text alone: the tail data.val_fraction of it is validation, the rest is cut per replica.
//
// Text is tokenised with tk (bytes when nil).
func LoadDataset(sp *spec.Spec, tk *tokenizer.Tokenizer) (*Dataset, error) {
	R := sp.Pipeline.Replicas
	d := &Dataset{}
	if sp.Data.Prepared() {
		m, dir, err := data.ReadManifest(sp.Data.Path)
		if err != nil {
			return nil, fmt.Errorf("data.path: %w", err)
		}
		if len(m.Shards) < R {
			return nil, fmt.Errorf("data.path %s: %d shards for %d replica pipelines; each needs one at least: prepare it again with a smaller --shard-tokens", sp.Data.Path, len(m.Shards), R)
		}
		for r := range R {
			var paths, sums []string
			for _, i := range data.ReplicaShards(len(m.Shards), r, R) {
				paths = append(paths, filepath.Join(dir, m.Shards[i].File))
				sums = append(sums, m.Shards[i].SHA256)
			}
			v, err := data.OpenShardView(paths, sums, sp.Model.Vocab)
			if err != nil {
				return nil, fmt.Errorf("data.path: replica %d's shards: %w", r, err)
			}
			d.Views = append(d.Views, v)
			d.Tokens += v.Len()
		}
		if d.Val, err = LoadValShards(sp); err != nil {
			return nil, err
		}
		d.Name = sp.Data.Path
		return d, nil
	}
	text, name, err := CorpusField(sp.Data.Path, sp.Data.TextField)
	if err != nil {
		return nil, err
	}
	tokens, err := Tokenize(tk, text, sp.Model.Vocab)
	if err != nil {
		return nil, err
	}
	tr := tokens
	if sp.Data.ValPath != "" {
		vt, err := data.LoadField(sp.Data.ValPath, sp.Data.TextField)
		if err != nil {
			return nil, fmt.Errorf("data.val_path: %w", err)
		}
		if d.Val, err = Tokenize(tk, vt, sp.Model.Vocab); err != nil {
			return nil, fmt.Errorf("data.val_path: %w", err)
		}
	} else {
		tr, d.Val = data.Split(tokens, sp.Data.ValFraction)
	}
	for r := range R {
		d.Replicas = append(d.Replicas, data.Shard(tr, r, R))
	}
	d.Name, d.Tokens = name, len(tr)
	return d, nil
}

// LoadValShards reads all the shards of a prepared data.val_path.
func LoadValShards(sp *spec.Spec) ([]int32, error) {
	m, dir, err := data.ReadManifest(sp.Data.ValPath)
	if err != nil {
		return nil, fmt.Errorf("data.val_path: %w", err)
	}
	all := make([]int, len(m.Shards))
	for i := range all {
		all[i] = i
	}
	ids, err := m.LoadShards(dir, all)
	if err != nil {
		return nil, fmt.Errorf("data.val_path: %w", err)
	}
	return ids, nil
}

// CorpusField is Corpus reading field of JSON-lines records.
func CorpusField(path, field string) (text []byte, name string, err error) {
	if path == "" {
		text, name = data.Builtin()
		return text, name, nil
	}
	text, err = data.LoadField(path, field)
	return text, path, err
}
