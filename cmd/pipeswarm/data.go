package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/data/tokenizer"
)

func runData(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	sub := ""
	if len(args) > 0 {
		sub = args[0]
	}
	switch sub {
	case "prepare":
		return runDataPrepare(ctx, args[1:], stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprint(stderr, dataUsage)
		return nil
	}
	fmt.Fprintf(stderr, "pipeswarm data: want prepare, not %q\n\n%s", sub, dataUsage)
	return errUsage
}

const dataUsage = `Usage: pipeswarm data prepare --tokenizer FILE|bytes --out DIR [--shard-tokens N] INPUT...

'prepare' tokenises text once into shards of token ids and a manifest.json; a spec's
data.path (and data.val_path) may then name DIR, so no run tokenises again.
`

func runDataPrepare(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("data prepare", "data prepare --tokenizer FILE|bytes --out DIR [--shard-tokens N] [--text-field F] INPUT...", `
Tokenise the text of each INPUT (a text file, a directory of text files, a .jsonl
file whose records' --text-field is read, or a glob of those, in sorted order) and
write DIR/shard-00000.bin, ... of --shard-tokens ids each (the last may hold fewer),
and DIR/manifest.json (tokenizer sha256, dtype, each shard's file, sha256 and token
count, totals). Ids are uint16 when the vocabulary has at most 65,536 tokens, else
uint32. A shard file is a 24-byte header ("PSTOKENS", the id width in bytes as uint32,
a zero uint32, the id count as uint64, all little-endian) and then its ids. Documents
(records, files) are joined with the ids of "\n"; a text file is tokenised in pieces of
about 1 MiB cut after a line end. Text is streamed: memory stays bounded whatever the
size of the inputs. A run with replica pipelines gives shard i to replica i mod the
number of replicas, so prepare at least as many shards as replicas.`, stderr)
	tok := fs.String("tokenizer", "", "a Hugging Face tokenizer.json of the byte-level BPE kind, or bytes")
	out := fs.String("out", "", "the directory to write the shards and manifest.json into")
	per := fs.String("shard-tokens", strconv.Itoa(data.DefaultShardTokens), "token ids per shard")
	field := fs.String("text-field", "text", "the field of .jsonl records that holds the text")
	workers := fs.Int("workers", 0, "tokenising goroutines (0 = one per CPU)")
	inputs, err := parse(fs, args)
	if err != nil {
		return err
	}
	shardTokens, perr := strconv.ParseInt(*per, 10, 64)
	switch {
	case *tok == "":
		fmt.Fprintln(stderr, "pipeswarm data prepare: --tokenizer: want the path of a tokenizer.json, or bytes")
		return errUsage
	case *out == "":
		fmt.Fprintln(stderr, "pipeswarm data prepare: --out: want the directory to write the shards into")
		return errUsage
	case perr != nil || shardTokens < 1:
		fmt.Fprintf(stderr, "pipeswarm data prepare: --shard-tokens %q: want a positive number of token ids, e.g. %d\n", *per, data.DefaultShardTokens)
		return errUsage
	case *workers < 0:
		fmt.Fprintf(stderr, "pipeswarm data prepare: --workers %d: want 0 (one per CPU) or more\n", *workers)
		return errUsage
	case len(inputs) == 0:
		fmt.Fprintln(stderr, "pipeswarm data prepare: want one or more INPUTs: text files, directories, .jsonl files or globs")
		return errUsage
	}
	if data.IsPrepared(*out) {
		fmt.Fprintf(stderr, "pipeswarm data prepare: --out %s already holds a prepared dataset; remove it or choose another directory\n", *out)
		return errUsage
	}
	o := data.PrepareOptions{Out: *out, ShardTokens: shardTokens, Field: *field, Workers: *workers}
	if *tok == "bytes" {
		o.Vocab, o.Tokenizer = 256, "bytes"
		o.Encode = func(s string) []int32 { return data.Widen([]byte(s)) }
	} else {
		raw, err := os.ReadFile(*tok)
		if err != nil {
			return fmt.Errorf("--tokenizer: %w", err)
		}
		tk, err := tokenizer.Parse(raw)
		if err != nil {
			return fmt.Errorf("--tokenizer %s: %w", *tok, err)
		}
		sum := sha256.Sum256(raw)
		o.Vocab, o.Tokenizer, o.TokenizerSHA256 = tk.VocabSize(), filepath.Base(*tok), hex.EncodeToString(sum[:])
		o.Encode = func(s string) []int32 {
			ids := tk.Encode(s)
			out := make([]int32, len(ids))
			for i, id := range ids {
				out[i] = int32(id)
			}
			return out
		}
	}
	t0 := time.Now()
	last := t0
	o.Progress = func(read, tokens int64) {
		if now := time.Now(); now.Sub(last) >= 2*time.Second {
			last = now
			fmt.Fprintf(stderr, "  %s read, %d tokens, %.1f MB/s\n", mib(read), tokens, float64(read)/1e6/now.Sub(t0).Seconds())
		}
	}
	m, err := data.Prepare(ctx, inputs, o)
	if err != nil {
		return err
	}
	dt := time.Since(t0)
	fmt.Fprintf(stdout, "wrote %s: %d shards, %d tokens (%s) from %s of text in %d documents, in %s (%.1f MB/s)\n",
		filepath.Join(*out, data.ManifestName), len(m.Shards), m.Tokens, m.Dtype, mib(m.Bytes), m.Documents,
		dt.Round(time.Millisecond), float64(m.Bytes)/1e6/dt.Seconds())
	return nil
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }
