package netns

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// profilesEnv turns on TestProfilesMeasured, which takes about a minute and
// reports figures rather than checking a claim: 1 for every profile, or a
// comma-separated list of names ("ceiling" is a 10 Gbit/s link, to see how
// fast a delay line goes).
const profilesEnv = "PSW_NETNS_PROFILES"

// TestProfilesMeasured measures each profile between two nodes with Measure,
// then the harness's CPU time per transferred gigabit when the endpoints are
// other processes (so that it is the delay lines' cost, with the kernel work
// that writing packets back runs on their threads).
func TestProfilesMeasured(t *testing.T) {
	if os.Getenv(profilesEnv) == "" {
		t.Skipf("set %s=1 to measure the link profiles (about a minute)", profilesEnv)
	}
	needNetns(t)
	type row struct {
		name string
		link Link
	}
	var rows []row
	for _, name := range ProfileNames() {
		rows = append(rows, row{name, profile(t, name)})
	}
	rows = append(rows, row{"ceiling", Link{Mbps: 10000, Latency: 500 * time.Microsecond}})
	only := strings.Split(os.Getenv(profilesEnv), ",")
	for _, r := range rows {
		if only[0] != "1" && !slices.Contains(only, r.name) {
			continue
		}
		n := build(t, Config{Nodes: []Link{r.link, r.link}})
		// About three seconds at the link's rate, the second half of which
		// is measured: well past slow start.
		bytes := max(int64(r.link.Mbps*1e6/8*3), 8<<20)
		bytes = min(bytes, 1<<30)
		m, err := n.Measure(t.Context(), 0, 1, bytes)
		if err != nil {
			t.Fatalf("%s: %v", r.name, err)
		}
		mbps, cpu, err := delayLineCost(t, n, min(bytes, 256<<20))
		if err != nil {
			t.Fatalf("%s: %v", r.name, err)
		}
		t.Logf("%-28s %6.0f Mbit/s %8v one way %5.2f%% loss | %s | process endpoints %.1f Mbit/s, harness CPU %.2f s per Gbit",
			r.name, r.link.Mbps, r.link.Latency, 100*r.link.Loss, m, mbps, cpu)
		if err := n.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// delayLineCost sends bytes from node 0 to node 1 between two helper
// processes and returns the rate and this process's CPU seconds per gigabit
// meanwhile.
func delayLineCost(t *testing.T, n *Net, bytes int64) (mbps, cpuPerGbit float64, err error) {
	arg := helperArgEnv + "=" + net.JoinHostPort(n.Addr(1), "5201") + " " + strconv.FormatInt(bytes, 10)
	sink := n.Command(t.Context(), 1, os.Args[0], "-test.run=^$")
	sink.Env = append(os.Environ(), helperEnv+"=sink", arg)
	sink.Stderr = os.Stderr
	out, err := sink.StdoutPipe()
	if err != nil {
		return 0, 0, err
	}
	if err := sink.Start(); err != nil {
		return 0, 0, err
	}
	defer sink.Wait()
	sc := bufio.NewScanner(out)
	if !sc.Scan() || sc.Text() != "ready" {
		return 0, 0, fmt.Errorf("sink did not start: %q %v", sc.Text(), sc.Err())
	}
	before, sysBefore := cpuTime()
	src := n.Command(t.Context(), 0, os.Args[0], "-test.run=^$")
	src.Env = append(os.Environ(), helperEnv+"=source", arg)
	src.Stderr = os.Stderr
	said, err := src.Output()
	if err != nil {
		return 0, 0, fmt.Errorf("source: %w", err)
	}
	after, sysAfter := cpuTime()
	cpu := after - before
	t.Logf("harness CPU %v of which system %v", cpu, sysAfter-sysBefore)
	mbps, err = strconv.ParseFloat(strings.TrimSpace(string(said)), 64)
	if err != nil {
		return 0, 0, fmt.Errorf("source said %q", said)
	}
	return mbps, cpu.Seconds() / (float64(bytes) * 8 / 1e9), nil
}

func cpuTime() (total, sys time.Duration) {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), time.Duration(ru.Stime.Nano())
}

const helperArgEnv = "PSW_NETNS_ARG"

// runTransferHelper is the sink or source of delayLineCost.
func runTransferHelper(h string) int {
	if h != "sink" && h != "source" {
		return -1
	}
	f := strings.Fields(os.Getenv(helperArgEnv))
	if len(f) != 2 {
		fmt.Fprintln(os.Stderr, "helper: want addr and bytes in", helperArgEnv)
		return 2
	}
	addr := f[0]
	bytes, _ := strconv.ParseInt(f[1], 10, 64)
	switch h {
	case "sink":
		ln, err := net.Listen("tcp4", addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, "sink:", err)
			return 1
		}
		fmt.Println("ready")
		c, err := ln.Accept()
		if err == nil {
			if err = drain(c, bytes); err == nil {
				_, err = c.Write([]byte{opDone})
			}
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "sink:", err)
			return 1
		}
		io.Copy(io.Discard, c) // until the source hangs up
	case "source":
		c, err := net.Dial("tcp4", addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, "source:", err)
			return 1
		}
		mbps, err := sendMeasured(c, c, bytes)
		if err != nil {
			fmt.Fprintln(os.Stderr, "source:", err)
			return 1
		}
		fmt.Println(mbps)
	}
	return 0
}
