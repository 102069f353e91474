package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/shard"
)

func runGenerate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("generate", "generate --checkpoint FILE|DIR --prompt TEXT [--max-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]", `
Sample text from a trained model in this process: the prompt, then up to N tokens,
each drawn from the model's distribution after the text so far (the last seq_len
tokens of it). --temperature 0 is greedy (the most likely token every time); above
0, --top-k and --top-p narrow the choice to the most likely tokens, and --seed makes
the draw repeatable: the same model, prompt and flags print the same text.
--checkpoint is the model's safetensors file or the run directory holding it
(model.safetensors), written by train or assembled by launch or export. Tokens are
bytes (model.vocab 256), or those of the run's tokenizer.json (beside the checkpoint,
else the one its spec names); the text is written as the model produced it.`, stderr)
	ckPath := fs.String("checkpoint", "", "model.safetensors written by train, launch or export, or the run directory holding it (required)")
	prompt := fs.String("prompt", "", "text the generated text continues (required)")
	maxTokens := fs.Int("max-tokens", 200, "how many tokens to generate")
	temperature := fs.Float64("temperature", 0, "sampling temperature; 0 is greedy")
	topK := fs.Int("top-k", 0, "sample among the K most likely tokens only (0: all)")
	topP := fs.Float64("top-p", 1, "sample among the most likely tokens whose probabilities sum to P (1: all)")
	seed := fs.Uint64("seed", 1, "seed of the draws")
	gemm := addGEMMFlag(fs)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if err := useGEMM(*gemm, newLogger(stderr, slog.LevelWarn)); err != nil {
		return err
	}
	switch {
	case len(pos) > 0:
		fmt.Fprintf(stderr, "pipeswarm generate: unexpected arguments %q\n", pos)
		return errUsage
	case *ckPath == "":
		fmt.Fprintln(stderr, "pipeswarm generate: --checkpoint FILE|DIR is required")
		return errUsage
	case *prompt == "":
		fmt.Fprintln(stderr, "pipeswarm generate: --prompt TEXT is required (the text to continue)")
		return errUsage
	case *maxTokens < 0:
		fmt.Fprintf(stderr, "pipeswarm generate: --max-tokens %d: want 0 or more\n", *maxTokens)
		return errUsage
	}
	o := train.Sampling{Temperature: *temperature, TopK: *topK, TopP: *topP, Seed: *seed}
	if err := o.Validate(); err != nil {
		return err
	}
	stages, sp, err := loadModel(*ckPath)
	if err != nil {
		return err
	}
	model := *ckPath
	if st, err := os.Stat(model); err == nil && st.IsDir() {
		model = filepath.Join(model, train.CheckpointFile)
	}
	tk, err := evalTokenizer(sp, model)
	if err != nil {
		return err
	}
	if tk == nil && sp.Model.Vocab != 256 {
		return fmt.Errorf("%s: model.vocab %d without data.tokenizer: generate reads and writes bytes, the tokens of a model of vocab 256", *ckPath, sp.Model.Vocab)
	}
	ids, err := train.Tokenize(tk, []byte(*prompt), sp.Model.Vocab)
	if err != nil {
		return err
	}
	toks, err := train.NewGenerator(stages).Generate(ctx, ids, *maxTokens, o)
	var out []byte
	if tk == nil {
		out = make([]byte, len(toks))
		for i, t := range toks {
			out[i] = byte(t)
		}
	} else {
		gen := make([]int, len(toks))
		for i, t := range toks {
			gen[i] = int(t)
		}
		var derr error
		if out, derr = tk.DecodeBytes(gen); derr != nil && err == nil {
			err = derr
		}
	}
	if _, werr := fmt.Fprintf(stdout, "%s%s\n", *prompt, out); werr != nil && err == nil {
		err = werr
	}
	return err
}

// loadModel reads the whole model of a checkpoint written by train, launch or export
// (a safetensors file, or the run directory holding model.safetensors) and the spec it
// was trained with.
func loadModel(path string) ([]*shard.Stage, *spec.Spec, error) {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		model := filepath.Join(path, train.CheckpointFile)
		if _, err := os.Stat(model); err != nil {
			return nil, nil, fmt.Errorf("--checkpoint %s: a run directory without %s (a launched run's model is assembled by 'pipeswarm export %s --key … --peer …' where its spec says export: allowed)",
				path, train.CheckpointFile, path)
		}
		path = model
	}
	ck, err := shard.LoadCheckpoint(path)
	if err != nil {
		return nil, nil, err
	}
	src, ok := ck.Metadata[train.MetaSpec]
	if !ok {
		return nil, nil, fmt.Errorf("%s has no %q metadata: not written by pipeswarm train, launch or export", path, train.MetaSpec)
	}
	sp, err := spec.Parse([]byte(src), path+":"+train.MetaSpec)
	if err != nil {
		return nil, nil, err
	}
	be, err := train.Backend(sp)
	if err != nil {
		return nil, nil, err
	}
	stages, err := shard.NewStages(train.ModelConfig(sp), sp.Pipeline.Stages, shard.WithBackend(be))
	if err != nil {
		return nil, nil, err
	}
	for _, s := range stages {
		if err := s.Load(ck); err != nil {
			if m := ck.Metadata[shard.MetaLayers]; m != "" && m != fmt.Sprintf("0-%d", sp.Model.NLayers) {
				return nil, nil, fmt.Errorf("%s holds layers %s of %d, one stage's checkpoint: use the run's whole model (model.safetensors, assembled by launch or 'pipeswarm export'): %w",
					path, m, sp.Model.NLayers, err)
			}
			return nil, nil, err
		}
	}
	return stages, sp, nil
}
