// Command pipeswarm trains one neural network across many machines joined by slow
// links. This file is wiring only: flags, logging, signals.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

type command struct {
	name, summary string
	run           func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

var commands = []command{
	{"train", "train a run spec with every stage in this process", runTrain},
	{"eval", "print the validation loss of a checkpoint", runEval},
	{"generate", "sample text from a trained model's checkpoint", runGenerate},
	{"node", "run a node: hold and train pipeline stages for trusted launchers", runNode},
	{"launch", "staff, start and watch a pipelined run across nodes", runLaunch},
	{"export", "assemble a launched run's model from its nodes' checkpoints", runExport},
	{"status", "show what a running node is doing: peers, runs, loss, traffic, warnings", runStatus},
	{"keygen", "make a launcher key and print its peer ID", runKeygen},
	{"tokenizer", "learn a byte-level BPE tokenizer from text ('train'), or encode and decode with one", runTokenizer},
	{"data", "tokenise text once into shards of token ids ('prepare') that runs train on", runData},
	{"bench", "benchmarks: 'bench compression' (boundary codecs), 'bench wan' (a swarm behind emulated internet links)", runBench},
	{"version", "print the build, the GEMM providers found and the protocols spoken", runVersion},
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands {
		if c.name != args[0] {
			continue
		}
		err := c.run(ctx, args[1:], stdout, stderr)
		switch {
		case err == nil:
			return 0
		case errors.Is(err, flag.ErrHelp):
			return 0
		case errors.Is(err, errUsage):
			return 2
		case errors.Is(err, context.Canceled):
			fmt.Fprintf(stderr, "pipeswarm %s: interrupted\n", c.name)
			return 130
		default:
			fmt.Fprintf(stderr, "pipeswarm %s: %v\n", c.name, err)
			return 1
		}
	}
	fmt.Fprintf(stderr, "pipeswarm: unknown command %q\n\n", args[0])
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintf(w, "pipeswarm trains one model across many machines, one pipeline stage per peer.\n\nUsage:\n  pipeswarm <command> [arguments]\n\nCommands:\n")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-9s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "\nRun 'pipeswarm <command> --help' for a command's flags.\n")
}

// errUsage marks an error already reported with the command's usage.
var errUsage = errors.New("usage")

// parse parses flags that may come before or after positional arguments
// ("train SPEC --steps 10" as well as "train --steps 10 SPEC").
func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, errUsage
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func newFlagSet(name, synopsis, about string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: pipeswarm %s\n\n%s\n\nFlags:\n", synopsis, strings.TrimSpace(about))
		fs.PrintDefaults()
	}
	return fs
}

func newLogger(w io.Writer, level slog.Level) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

// logFlags are --log-format and --log-level, which every command that logs takes.
type logFlags struct {
	format *string
	level  *string
}

// addLogFlags adds the logging flags to fs; def is the command's default level.
func addLogFlags(fs *flag.FlagSet, def slog.Level) logFlags {
	return logFlags{
		format: fs.String("log-format", "text", "log format on stderr: text (key=value) or json (one object a line)"),
		level:  fs.String("log-level", strings.ToLower(def.String()), "least severe log records shown: debug, info, warn or error"),
	}
}

// logger builds the logger the flags ask for, writing to w; a bad value is a usage
// error, reported on stderr.
func (f logFlags) logger(w, stderr io.Writer, name string) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(*f.level)); err != nil {
		fmt.Fprintf(stderr, "pipeswarm %s: --log-level %q: want debug, info, warn or error\n", name, *f.level)
		return nil, errUsage
	}
	opts := &slog.HandlerOptions{Level: level}
	switch *f.format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	fmt.Fprintf(stderr, "pipeswarm %s: --log-format %q: want text or json\n", name, *f.format)
	return nil, errUsage
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
