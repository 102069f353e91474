package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/pipeswarm/pipeswarm/node/status"
)

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("status", "status [--node ADDR | --data-dir DIR] [--json]", `
Show what a running node is doing, as its status page does: its peer ID, build and
reachability, the peers it is connected to (and whether only through a relay), the
runs it serves (stage, replica, step, loss and the last points of the loss curve,
tokens/s, compute time, bytes in and out), frames and bytes per protocol, and its
recent warnings.

The node must run with --status ADDR (or status: in its config). Name it with
--node ADDR (host:port, as given to --status or printed by the node), or with
--data-dir DIR, the node's data directory, where it writes the address to
DIR/status_addr. With neither, --data-dir defaults to the current directory.
--json prints the node's /api/status reply as it is.`, stderr)
	nodeAddr := fs.String("node", "", "the node's status address, host:port")
	dataDir := fs.String("data-dir", "", "the node's data directory (reads DIR/status_addr)")
	asJSON := fs.Bool("json", false, "print the snapshot as JSON")
	timeout := fs.Duration("timeout", 10*time.Second, "give up after this long")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		fmt.Fprintf(stderr, "pipeswarm status: unexpected arguments %q\n", pos)
		return errUsage
	}
	if *nodeAddr != "" && *dataDir != "" {
		fmt.Fprintln(stderr, "pipeswarm status: give --node or --data-dir, not both")
		return errUsage
	}
	addr := *nodeAddr
	if addr == "" {
		dir := *dataDir
		if dir == "" {
			dir = "."
		}
		b, err := os.ReadFile(filepath.Join(dir, "status_addr"))
		if err != nil {
			return fmt.Errorf("no status address in %s (is a node running there with --status?): %w", dir, err)
		}
		addr = strings.TrimSpace(string(b))
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	snap, err := status.Fetch(ctx, addr)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(snap)
	}
	return status.WriteText(stdout, snap)
}
