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
reachability, the launchers it trusts, whether it is open to any launcher, its
memory budget and what it computes with, the peers it is connected to (and whether
only through a relay), the runs it serves, newest first (stage, replica, step, loss
and the last points of the loss curve, tokens/s, compute time, bytes in and out),
frames and bytes per protocol, and its recent warnings.

Name the node by --data-dir DIR, its data directory: every node serves its status
on the unix socket DIR/status.sock (no flag needed). With neither --data-dir nor
--node, DIR is the current directory. Or name a node that runs with --status ADDR
by --node ADDR (host:port, as given to --status or printed by the node), from any
machine that can reach it. --json prints the node's /api/status reply as it is.`, stderr)
	nodeAddr := fs.String("node", "", "the node's status address, host:port")
	dataDir := fs.String("data-dir", "", "the node's data directory (reads DIR/status.sock, else DIR/status_addr)")
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
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	var snap *status.Snapshot
	if *nodeAddr != "" {
		snap, err = status.Fetch(ctx, *nodeAddr)
	} else {
		snap, err = localStatus(ctx, *dataDir)
	}
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

// localStatus reads the status of the node whose data directory is dir ("" for the
// current one): on its unix socket, or at the address it wrote when it serves
// --status and has no socket.
func localStatus(ctx context.Context, dir string) (*status.Snapshot, error) {
	if dir == "" {
		dir = "."
	}
	sock := filepath.Join(dir, "status.sock")
	if _, err := os.Stat(sock); err == nil {
		return status.FetchUnix(ctx, sock)
	}
	b, err := os.ReadFile(filepath.Join(dir, "status_addr"))
	if err != nil {
		if _, serr := os.Stat(dir); serr != nil {
			return nil, fmt.Errorf("status: %w (give the node's --data-dir, or --node HOST:PORT)", serr)
		}
		return nil, fmt.Errorf("status: no node is running on %s (no %s): start one with 'pipeswarm node --data-dir %s', or name a node by --node HOST:PORT",
			dir, sock, dir)
	}
	return status.Fetch(ctx, strings.TrimSpace(string(b)))
}
