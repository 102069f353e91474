package wan

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/pipeswarm/pipeswarm/bench/netns"
	"github.com/pipeswarm/pipeswarm/node/launcher"
	"github.com/pipeswarm/pipeswarm/node/metrics"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/p2p"
)

// nodePort is where every node listens in its own namespace.
const nodePort = 4001

// runNetns runs every node as a `pipeswarm node` process in a network namespace of
// its own and the launcher as a `pipeswarm launch` process in another, joined by a
// bridge through links shaped by tbf and a delay line. Everything made is removed
// when it returns, whatever happened (the context ends on Ctrl-C).
func runNetns(ctx context.Context, o Options) (*outcome, error) {
	sp := o.Spec
	S, R := sp.Pipeline.Stages, sp.Pipeline.Replicas
	grid := cells(S, R)
	bin := o.Binary
	if bin == "" {
		var err error
		if bin, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("wan: netns: the pipeswarm binary: %w", err)
		}
	}
	tmp, err := os.MkdirTemp("", "pipeswarm-netns-")
	if err != nil {
		return nil, fmt.Errorf("wan: %w", err)
	}
	defer os.RemoveAll(tmp)

	links := make([]netns.Link, 0, len(grid)+1)
	for _, c := range grid {
		l := o.Profile.Link(Cell(c[0], c[1]))
		links = append(links, netns.Link{Mbps: l.Mbps, Latency: l.Latency, Loss: l.Loss})
	}
	ll := o.Profile.Link("launcher")
	links = append(links, netns.Link{Mbps: ll.Mbps, Latency: ll.Latency, Loss: ll.Loss})
	lidx := len(grid)
	nw, err := netns.Build(ctx, netns.Config{Nodes: links, Log: o.Log.With("sys", "netns")})
	if err != nil {
		return nil, fmt.Errorf("wan: netns: %w", err)
	}
	defer nw.Close()
	o.OnNote(fmt.Sprintf("netns: %d namespaces built (%d nodes and the launcher)", len(links), len(grid)))

	lkey, err := p2p.GenerateKey()
	if err != nil {
		return nil, err
	}
	keyPath := filepath.Join(tmp, "launcher.key")
	if err := p2p.WriteKey(keyPath, lkey); err != nil {
		return nil, err
	}
	lid, err := p2p.PeerID(lkey)
	if err != nil {
		return nil, err
	}
	logDir := filepath.Join(o.OutDir, "logs")
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return nil, fmt.Errorf("wan: %w", err)
	}

	// The nodes: each waits until its addrs file shows it listening.
	exited := make(chan string, 2*(len(grid)+1)+len(o.Churn))
	var peers []string
	procs := map[string]*exec.Cmd{}
	startNode := func(i int, cell string) error {
		cmd := nw.Command(ctx, i, bin, "node", "--data-dir", filepath.Join(tmp, cell), "--listen", fmt.Sprintf("/ip4/%s/tcp/%d", nw.Addr(i), nodePort),
			"--trust", lid.String(), "--threads", strconv.Itoa(o.Threads), "--gemm", cmp.Or(o.GEMM, "auto"))
		f, err := os.OpenFile(filepath.Join(logDir, cell+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		procs[cell] = cmd
		return startLogged(cmd, f, cell, exited)
	}
	for i, c := range grid {
		cell := Cell(c[0], c[1])
		dir := filepath.Join(tmp, cell)
		if err := startNode(i, cell); err != nil {
			return nil, fmt.Errorf("wan: netns: node %s: %w", cell, err)
		}
		addr, err := waitAddr(ctx, filepath.Join(dir, "addrs"), exited)
		if err != nil {
			return nil, fmt.Errorf("wan: netns: node %s: %w (log: %s)", cell, err, filepath.Join(logDir, cell+".log"))
		}
		peers = append(peers, addr)
	}
	o.OnNote(fmt.Sprintf("netns: %d node processes listening", len(grid)))

	var measured []LinkFigures
	for i := 1; i < len(grid)+1 && len(measured) < maxMeasured; i++ {
		a, b := i-1, i
		ca, cb := "", ""
		if b == lidx {
			a, ca, cb = 0, Cell(0, 0), "launcher"
		} else {
			ca, cb = Cell(grid[a][0], grid[a][1]), Cell(grid[b][0], grid[b][1])
		}
		f, err := measureLink(o, ca, cb, func(n int64) (time.Duration, float64, float64, error) {
			r, err := nw.Measure(ctx, a, b, n)
			return r.RTT, r.UpMbps, r.DownMbps, err
		})
		if err != nil {
			return nil, err
		}
		measured = append(measured, f)
	}

	specPath := filepath.Join(tmp, "spec.yaml")
	if err := os.WriteFile(specPath, []byte(sp.String()), 0o644); err != nil {
		return nil, fmt.Errorf("wan: %w", err)
	}
	swarmDir := filepath.Join(o.OutDir, "swarm")
	// The bench owns its output directory: a run left there by an earlier bench goes.
	args := []string{"launch", specPath, "--key", keyPath, "--out", swarmDir, "--quiet", "--force"}
	for _, p := range peers {
		args = append(args, "--peer", p)
	}
	launch := nw.Command(ctx, lidx, bin, args...)
	lf, err := os.Create(filepath.Join(logDir, "launcher.log"))
	if err != nil {
		return nil, fmt.Errorf("wan: %w", err)
	}
	if err := startLogged(launch, lf, "launcher", exited); err != nil {
		return nil, fmt.Errorf("wan: netns: launcher: %w", err)
	}
	index := map[string]int{}
	for i, c := range grid {
		index[Cell(c[0], c[1])] = i
	}
	restarts := make(chan Churn, len(o.Churn))
	killed := map[string]int{} // churn kills whose exit is still to come, by cell
	churn := &churner{events: o.Churn, do: func(c Churn) {
		i, ok := index[c.Cell]
		if !ok {
			o.OnNote(fmt.Sprintf("churn %s: no such cell in this run", c))
			return
		}
		o.OnNote(fmt.Sprintf("churn: %s %s at step %d", c.Action, c.Cell, c.Step))
		if c.Action == "kill" {
			if p := procs[c.Cell]; p != nil && p.Process != nil {
				if syscall.Kill(-p.Process.Pid, syscall.SIGKILL) == nil {
					killed[c.Cell]++
				}
			}
			if c.Down > 0 {
				go func() { // the loop below restarts it: it owns procs
					select {
					case <-time.After(c.Down):
						restarts <- c
					case <-ctx.Done():
					}
				}()
			}
			return
		}
		if err := startNode(i, c.Cell); err != nil {
			o.OnNote(fmt.Sprintf("churn %s: %v", c, err))
		}
	}}
	onStep := func(phase string, s metrics.Step) {
		o.OnStep(phase, s)
		churn.step(s.Step)
	}
	// Progress from the launcher's metrics. A node that exits unless the churn killed
	// it ends the measurement: the launcher would wait for it (a run without replicas
	// pauses until its node is back), and what followed would not be this benchmark.
	seen := 0
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for done := false; !done; {
		select {
		case who := <-exited:
			if who == "launcher" {
				done = true
				break
			}
			if killed[who] == 0 {
				return nil, fmt.Errorf("wan: netns: node %s exited, not killed by the churn schedule: %s", who, tail(filepath.Join(logDir, who+".log")))
			}
			killed[who]--
			o.OnNote(fmt.Sprintf("netns: node %s exited (its log: %s)", who, filepath.Join(logDir, who+".log")))
		case c := <-restarts:
			o.OnNote(fmt.Sprintf("churn: restart %s, %s after its kill", c.Cell, c.Down))
			if err := startNode(index[c.Cell], c.Cell); err != nil {
				o.OnNote(fmt.Sprintf("churn %s: %v", c, err))
			}
		case <-tick.C:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		seen = feed(filepath.Join(swarmDir, train.MetricsFile), seen, onStep)
	}
	feed(filepath.Join(swarmDir, train.MetricsFile), seen, onStep)
	if launch.ProcessState == nil || !launch.ProcessState.Success() {
		return nil, fmt.Errorf("wan: netns: the launcher failed: %s", tail(filepath.Join(logDir, "launcher.log")))
	}
	rb, err := os.ReadFile(filepath.Join(swarmDir, launcher.ResultFile))
	if err != nil {
		return nil, fmt.Errorf("wan: netns: %w", err)
	}
	var res launcher.Result
	if err := json.Unmarshal(rb, &res); err != nil {
		return nil, fmt.Errorf("wan: netns: %s: %w", launcher.ResultFile, err)
	}
	return launched(sp, swarmDir, &res, measured, nil, churn.fired())
}

// startLogged starts cmd with its output in f and says name on exited when it ends.
// It runs in a process group of its own, so the harness can kill all of it.
func startLogged(cmd *exec.Cmd, f *os.File, name string, exited chan<- string) error {
	cmd.Stdout, cmd.Stderr = f, f
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL // the harness dying takes its nodes along
	if err := cmd.Start(); err != nil {
		f.Close()
		return err
	}
	go func() {
		_ = cmd.Wait()
		f.Close()
		exited <- name
	}()
	return nil
}

// waitAddr waits for a node's addrs file and returns its first TCP address.
func waitAddr(ctx context.Context, path string, exited <-chan string) (string, error) {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if b, err := os.ReadFile(path); err == nil {
			for _, l := range strings.Fields(string(b)) {
				if strings.Contains(l, "/tcp/") {
					return l, nil
				}
			}
		}
		select {
		case who := <-exited:
			return "", fmt.Errorf("%s exited before listening", who)
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return "", errors.New("not listening after 30 s")
}

// feed passes the metrics rows after the first seen to onStep and returns how many
// rows the file has.
func feed(path string, seen int, onStep func(string, metrics.Step)) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return seen
	}
	n := 0
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if len(line) == 0 || line[len(line)-1] != '}' {
			break // a row still being written
		}
		n++
		if n <= seen {
			continue
		}
		var s struct {
			metrics.Step
			Outer *int `json:"outer_step"`
		}
		if json.Unmarshal(line, &s) == nil && s.Outer == nil && (s.Replica == nil || *s.Replica == 0) {
			onStep("swarm", s.Step)
		}
	}
	return n
}

// tail is the last lines of a log, for an error message.
func tail(path string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-5):], " | ")
}
