package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/spec"
)

// Mistakes launch can see without asking a node are refused at once, before
// staffing (whose timeout here is a minute), each saying what to do, with no stray
// "()", and without leaving the run's directory behind.
func TestLaunchRefusesAtOnceWhatItCanCheckBeforeStaffing(t *testing.T) {
	dir := t.TempDir()
	keyPath := filepath.Join(dir, "k")
	if code, _, stderr := runCLI(t, "keygen", "--out", keyPath); code != 0 {
		t.Fatal(stderr)
	}
	const (
		idA = "12D3KooWLRPJAA5o6Gp5PvTRWjWMDbfcmKXnu2Zh3ztz6UYFXmG9"
		idB = "12D3KooWDLppM8FNq7Xh1ks78Nk1zTSiefXGeATLdm6XHVY6sNKL"
	)
	full := func(id string) string { return "/ip4/127.0.0.1/tcp/9/p2p/" + id }
	write := func(name, src string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	two := write("two.yaml", strings.Replace(testSpec, "stages: 2, micro_batches: 2", "stages: 2, micro_batches: 2, staff_timeout: 60", 1))
	grid := write("grid.yaml", strings.Replace(testSpec, "stages: 2, micro_batches: 2", "stages: 2, replicas: 2, micro_batches: 2, staff_timeout: 60", 1)+
		"diloco: {inner_steps: 4}\n")
	noData := write("nodata.yaml", strings.Replace(testSpec, "data: {val_fraction: 0.01}", "data:\n  val_fraction: 0.01\n  path: nothere.txt", 1))

	// A run that finished: its record, spec and every step's row.
	finished := filepath.Join(dir, "finished")
	if err := os.MkdirAll(finished, 0o755); err != nil {
		t.Fatal(err)
	}
	sp, err := spec.Load(two)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(map[string]string{"run": "0123456789abcdef"})
	must(t, os.WriteFile(filepath.Join(finished, "run.json"), b, 0o644))
	must(t, os.WriteFile(filepath.Join(finished, "spec.yaml"), []byte(sp.String()), 0o644))
	mw, err := metrics.Create(filepath.Join(finished, "metrics.jsonl"))
	must(t, err)
	for s := 1; s <= sp.Train.Steps; s++ {
		must(t, mw.Write(metrics.Step{Step: s, Loss: 5, Tokens: int64(s * sp.TokensPerStep())}))
	}
	must(t, mw.Close())

	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"a peer without its ID", []string{two, "--peer", "/ip4/127.0.0.1/tcp/9", "--peer", full(idB)},
			[]string{"--peer /ip4/127.0.0.1/tcp/9 has no peer ID: a node's full address ends in /p2p/ and its ID, as in /ip4/127.0.0.1/tcp/9/p2p/12D3KooW...", `("listening on ...")`, "DIR/addrs"}},
		{"a peer ID alone", []string{two, "--peer", idA, "--peer", full(idB)},
			[]string{"--peer " + idA + " is a peer ID alone: give the node's full address, a multiaddr ending in /p2p/" + idA}},
		{"neither an address nor a file", []string{two, "--peer", "node9/addrs", "--peer", full(idB)},
			[]string{"--peer node9/addrs: no such file, and not a multiaddr", "/ip4/10.0.0.5/tcp/4001/p2p/12D3KooW..."}},
		{"fewer nodes than cells", []string{grid, "--peer", full(idA), "--peer", full(idB)},
			[]string{"this run needs 4 nodes (2 stages × 2 replicas), 2 offered: start 2 more and pass each with --peer, or lower pipeline.replicas"}},
		{"one node given twice", []string{two, "--peer", full(idA), "--peer", strings.Replace(full(idA), "tcp/9", "tcp/10", 1)},
			[]string{"this run needs 2 nodes (2 stages), 1 offered (2 addresses, some of the same node): start 1 more and pass each with --peer, or lower pipeline.stages"}},
		{"missing data", []string{noData, "--peer", full(idA), "--peer", full(idB)},
			[]string{"nodata.yaml:9: data.path: \"nothere.txt\": no such file or directory; want a text file"}},
		{"resuming a finished run", []string{two, "--peer", full(idA), "--peer", full(idB), "--resume", "--out", finished},
			[]string{"the run in " + finished + " finished at step 8 (train.steps 8): there is nothing to resume", "launch the spec again with more steps (--steps N) into another --out"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"launch", "--key", keyPath, "--quiet"}, tc.args...)
			out := filepath.Join(dir, "runs", strings.ReplaceAll(tc.name, " ", "-"))
			if !strings.Contains(strings.Join(tc.args, " "), "--out") {
				args = append(args, "--out", out)
			}
			code, _, stderr := runCLI(t, args...)
			if code != 1 {
				t.Fatalf("exit %d, want 1:\n%s", code, stderr)
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr:\n%s\nwant it to contain:\n%s", stderr, w)
				}
			}
			if strings.Contains(stderr, "()") || strings.Contains(stderr, "waiting for peers") {
				t.Errorf("stderr has a stray () or waited for peers:\n%s", stderr)
			}
			if _, err := os.Stat(out); err == nil {
				t.Errorf("the refused launch left %s", out)
			}
		})
	}
	// Staffing that times out (no node answers) says which were not reached, with no
	// "()", and leaves no directory either.
	short := write("short.yaml", strings.Replace(testSpec, "stages: 2, micro_batches: 2", "stages: 2, micro_batches: 2, staff_timeout: 1", 1))
	out := filepath.Join(dir, "made", "short")
	code, _, stderr := runCLI(t, "launch", short, "--key", keyPath, "--quiet", "--peer", full(idA), "--peer", full(idB), "--out", out)
	if code != 1 || !strings.Contains(stderr, "run cannot be staffed") || !strings.Contains(stderr, "2 nodes not reached (is it running, at that address?)") || strings.Contains(stderr, "()") {
		t.Errorf("staffing with no node up: exit %d, stderr:\n%s\nwant the unreached nodes named and no ()", code, stderr)
	}
	if _, err := os.Stat(out); err == nil {
		t.Errorf("the failed launch left %s", out)
	}
}

// --peer takes a node's addrs file by an absolute or a relative path, or the node's
// data directory; the first address in it is dialled.
func TestPeerTakesAnAddrsFileByAbsoluteOrRelativePathOrItsDirectory(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	const addr = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWLRPJAA5o6Gp5PvTRWjWMDbfcmKXnu2Zh3ztz6UYFXmG9"
	must(t, os.MkdirAll("n0", 0o755))
	must(t, os.WriteFile(filepath.Join("n0", "addrs"), []byte(addr+"\n/ip4/10.0.0.5/tcp/4001/p2p/12D3KooWLRPJAA5o6Gp5PvTRWjWMDbfcmKXnu2Zh3ztz6UYFXmG9\n"), 0o644))
	for _, v := range []string{filepath.Join(dir, "n0", "addrs"), filepath.Join("n0", "addrs"), "n0", addr} {
		got, err := peerAddrs([]string{v})
		if err != nil || len(got) != 1 || got[0] != addr {
			t.Errorf("--peer %s: %q, %v; want [%s]", v, got, err, addr)
		}
	}
	must(t, os.WriteFile("empty", nil, 0o644))
	if _, err := peerAddrs([]string{"empty"}); err == nil || !strings.Contains(err.Error(), "holds no address") {
		t.Errorf("--peer of an empty file: %v", err)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
