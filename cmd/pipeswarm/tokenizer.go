package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/pipeswarm/pipeswarm/node/data"
	"github.com/pipeswarm/pipeswarm/node/data/tokenizer"
)

func runTokenizer(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	sub := ""
	if len(args) > 0 {
		sub = args[0]
	}
	switch sub {
	case "train":
		return runTokenizerTrain(ctx, args[1:], stdout, stderr)
	case "encode":
		return runTokenizerEncode(args[1:], os.Stdin, stdout, stderr)
	case "decode":
		return runTokenizerDecode(args[1:], os.Stdin, stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprint(stderr, tokenizerUsage)
		return nil
	}
	fmt.Fprintf(stderr, "pipeswarm tokenizer: want train, encode or decode, not %q\n\n%s", sub, tokenizerUsage)
	return errUsage
}

const tokenizerUsage = `Usage: pipeswarm tokenizer train|encode|decode ...
  pipeswarm tokenizer train --vocab N --out tokenizer.json FILE...
  pipeswarm tokenizer encode --tokenizer FILE [--json] [--special] < text
  pipeswarm tokenizer decode --tokenizer FILE < ids

A tokenizer is a Hugging Face tokenizer.json of the byte-level BPE kind (GPT-2,
Llama 3, Qwen2, or one made by 'train'). Each command takes --help.
`

func runTokenizerTrain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("tokenizer train", "tokenizer train --vocab N --out tokenizer.json FILE...", `
Learn a byte-level BPE tokenizer from text, with GPT-2's pre-tokenizer, and write it
as a Hugging Face tokenizer.json (in the format of Hugging Face's tokenizers; Tokenizers.js
reads it). Each FILE is a text file, a directory of text files or a .jsonl file
whose records' "text" fields are read. The vocabulary holds the 256 bytes, N−257
merges and the special token <|endoftext|>, which 'encode --special' puts before a
text.`, stderr)
	vocab := fs.Int("vocab", 0, "tokens in the vocabulary, at least 257")
	out := fs.String("out", "", "where to write the tokenizer.json")
	files, err := parse(fs, args)
	if err != nil {
		return err
	}
	switch {
	case *vocab < tokenizer.MinTrainVocab:
		fmt.Fprintf(stderr, "pipeswarm tokenizer train: --vocab %d: want at least %d (the 256 bytes and <|endoftext|>), e.g. --vocab 8192\n", *vocab, tokenizer.MinTrainVocab)
		return errUsage
	case *out == "":
		fmt.Fprintln(stderr, "pipeswarm tokenizer train: --out: want the path of the tokenizer.json to write")
		return errUsage
	case len(files) == 0:
		fmt.Fprintln(stderr, "pipeswarm tokenizer train: want one or more files of text to learn from")
		return errUsage
	}
	var texts []string
	size := 0
	for _, f := range files {
		b, err := data.Load(f)
		if err != nil {
			return err
		}
		texts = append(texts, string(b))
		size += len(b)
	}
	tk, err := tokenizer.Train(ctx, texts, *vocab)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(*out, tk.JSON()); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s: %d tokens learnt from %d bytes in %d file(s)\n", *out, tk.VocabSize(), size, len(files))
	return nil
}

// writeFileAtomic writes b to path through a temporary file beside it, so that an
// interrupted write leaves no half file.
func writeFileAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

func runTokenizerEncode(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := newFlagSet("tokenizer encode", "tokenizer encode --tokenizer FILE [--json] [--special] < text", `
Print the token ids of the text on standard input, separated by spaces (a JSON array
with --json). Text that is not valid UTF-8 has each ill-formed sequence replaced by
U+FFFD first, as Hugging Face's tokenizers see it. Added tokens in the text (such as
<|endoftext|>) are recognised; the special tokens the tokenizer puts around a text (a
BOS) are added only with --special.`, stderr)
	path := fs.String("tokenizer", "", "the tokenizer.json")
	asJSON := fs.Bool("json", false, "print a JSON array")
	special := fs.Bool("special", false, "add the tokenizer's special tokens around the text (BOS/EOS)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if err := tokenizerArgs("encode", *path, pos, stderr); err != nil {
		return err
	}
	tk, err := tokenizer.Load(*path)
	if err != nil {
		return err
	}
	text, err := io.ReadAll(stdin)
	if err != nil {
		return fmt.Errorf("reading standard input: %w", err)
	}
	ids := tk.AppendEncode(nil, string(text), *special)
	if *asJSON {
		if ids == nil {
			ids = []int{}
		}
		b, _ := json.Marshal(ids)
		_, err = fmt.Fprintf(stdout, "%s\n", b)
		return err
	}
	var b strings.Builder
	for i, id := range ids {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(strconv.Itoa(id))
	}
	b.WriteByte('\n')
	_, err = io.WriteString(stdout, b.String())
	return err
}

func runTokenizerDecode(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := newFlagSet("tokenizer decode", "tokenizer decode --tokenizer FILE < ids", `
Print the text of the token ids on standard input: integers separated by spaces,
commas or newlines, or a JSON array (what 'encode' prints). The bytes are written as
the tokens spell them, so ids that cut a character in two print its bytes as they are.`, stderr)
	path := fs.String("tokenizer", "", "the tokenizer.json")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if err := tokenizerArgs("decode", *path, pos, stderr); err != nil {
		return err
	}
	tk, err := tokenizer.Load(*path)
	if err != nil {
		return err
	}
	in, err := io.ReadAll(stdin)
	if err != nil {
		return fmt.Errorf("reading standard input: %w", err)
	}
	fields := strings.FieldsFunc(string(in), func(r rune) bool {
		return r == ',' || r == '[' || r == ']' || r == ' ' || r == '\n' || r == '\t' || r == '\r'
	})
	ids := make([]int, len(fields))
	for i, f := range fields {
		if ids[i], err = strconv.Atoi(f); err != nil {
			return fmt.Errorf("standard input, id %d: %q is not an integer: want token ids separated by spaces or a JSON array", i+1, f)
		}
	}
	b, err := tk.DecodeBytes(ids)
	if err != nil {
		return err
	}
	_, err = stdout.Write(b)
	return err
}

func tokenizerArgs(cmd, path string, pos []string, stderr io.Writer) error {
	switch {
	case path == "":
		fmt.Fprintf(stderr, "pipeswarm tokenizer %s: --tokenizer: want the path of a tokenizer.json\n", cmd)
		return errUsage
	case len(pos) > 0:
		fmt.Fprintf(stderr, "pipeswarm tokenizer %s: unexpected arguments %q: the %s is read from standard input\n", cmd, pos, map[string]string{"encode": "text", "decode": "list of ids"}[cmd])
		return errUsage
	}
	return nil
}
