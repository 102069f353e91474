package status

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"
)

// Fetch reads the snapshot of the node whose status server is at addr (host:port,
// or an http:// URL).
func Fetch(ctx context.Context, addr string) (*Snapshot, error) {
	base := addr
	if !strings.HasPrefix(base, "http://") && !strings.HasPrefix(base, "https://") {
		base = "http://" + base
	}
	return fetch(ctx, http.DefaultClient, base, "is the node running, with --status?")
}

// FetchUnix reads the snapshot of the node serving its status on the unix socket at
// path (every node does, in its data directory).
func FetchUnix(ctx context.Context, path string) (*Snapshot, error) {
	var d net.Dialer
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (conn net.Conn, err error) {
		err = viaDir(path, func(p string) error {
			conn, err = d.DialContext(ctx, "unix", p)
			return err
		})
		return conn, err
	}}}
	defer c.CloseIdleConnections()
	return fetch(ctx, c, "http://node", "is the node running? A node that was killed leaves its socket behind")
}

func fetch(ctx context.Context, c *http.Client, base, hint string) (*Snapshot, error) {
	url := strings.TrimSuffix(base, "/") + "/api/status"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, fmt.Errorf("status: %w", err)
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("status: %w (%s)", err, hint)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("status: %s: %s: %s", url, resp.Status, strings.TrimSpace(string(b)))
	}
	var s Snapshot
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&s); err != nil {
		return nil, fmt.Errorf("status: %s: %w", url, err)
	}
	return &s, nil
}

// WriteText prints a snapshot for a terminal: the facts of the status page, the loss
// curve as its last few points.
func WriteText(w io.Writer, s *Snapshot) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	p := func(format string, args ...any) { fmt.Fprintf(tw, format, args...) }
	p("peer\t%s\n", s.Peer)
	p("build\t%s (%s, %s)\n", s.Build.Short(), s.Build.Go, s.Build.GEMM)
	if !s.Started.IsZero() {
		p("up\t%s\n", s.Time.Sub(s.Started).Round(time.Second))
	}
	p("reachability\t%s\n", reachabilityLine(s))
	for _, a := range s.Addrs {
		p("listening\t%s\n", a)
	}
	p("penalties\t%d given to peers\n", s.Penalties)
	p("trust\t%s\n", trustLine(s.Trust))
	if s.Open {
		p("open\ttrue: ANY launcher can make this node train its run (set open: false and list launchers under trust)\n")
	} else {
		p("open\tfalse: only runs signed by a trusted launcher are accepted\n")
	}
	p("memory budget\t%s, %d stage(s) at most\n", s.MemoryBudget, s.MaxStages)
	keep := "every run folder"
	if s.KeepRuns > 0 {
		keep = fmt.Sprintf("the newest %d run folder(s), and those they resumed from", s.KeepRuns)
	}
	p("keeps\t%s\n", keep)
	for _, b := range s.Compute {
		p("compute\t%s (%s): %s\n", b.Name, b.Precision, b.Impl)
	}
	if s.CPUOnly {
		p("compute\tCPU only: this build has no GPU backend\n")
	}
	tw.Flush()

	fmt.Fprintf(w, "\npeers: %d\n", len(s.Peers))
	if len(s.Peers) > 0 {
		p("  ID\tADDRESS\tCONNS\tLIMITED\tPENALTIES\n")
		for _, q := range s.Peers {
			p("  %s\t%s\t%d\t%v\t%d\n", q.ID, q.Addr, q.Conns, q.Limited, q.Penalties)
		}
		tw.Flush()
	}

	fmt.Fprintf(w, "\nruns: %d\n", len(s.Runs))
	if len(s.Runs) > 0 {
		p("  RUN\tNAME\tSTAGE\tREPLICA\tSTATE\tSTEP\tLOSS\tVAL LOSS\tTOKENS/S\tCOMPUTE\tBYTES IN\tBYTES OUT\n")
		for _, r := range s.Runs {
			p("  %s\t%s\t%d/%d\t%d/%d\t%s\t%d/%d\t%s\t%s\t%.0f\t%.1fs\t%s\t%s\n", r.Run, r.Name, r.Stage, r.Stages, r.Replica, r.Replicas, r.State,
				r.Step, r.Steps, lossText(r.Loss, len(r.LossCurve) > 0 || r.LossFrom != ""), lossText(r.ValLoss, r.ValLoss != 0), r.TokensPerS, r.ComputeS,
				formatBytes(r.BytesIn), formatBytes(r.BytesOut))
		}
		tw.Flush()
		for _, r := range s.Runs {
			if r.Error != "" {
				fmt.Fprintf(w, "  run %s stage %d: %s\n", r.Run, r.Stage, r.Error)
			}
			if r.LossFrom != "" {
				fmt.Fprintf(w, "  run %s loss %.4f at step %d, %s\n", r.Run, r.Loss, r.LossStep, r.LossFrom)
			}
			if n := len(r.LossCurve); n > 1 {
				tail := r.LossCurve[max(0, n-8):]
				var parts []string
				for _, pt := range tail {
					parts = append(parts, fmt.Sprintf("%d:%.4f", pt.Step, pt.Loss))
				}
				fmt.Fprintf(w, "  run %s loss (step:loss) %s\n", r.Run, strings.Join(parts, " "))
			}
		}
	}

	if len(s.Traffic) > 0 {
		fmt.Fprintf(w, "\ntraffic:\n")
		p("  PROTOCOL\tFRAMES IN\tBYTES IN\tFRAMES OUT\tBYTES OUT\n")
		for _, t := range s.Traffic {
			p("  %s\t%d\t%s\t%d\t%s\n", t.Protocol, t.FramesIn, formatBytes(int64(t.BytesIn)), t.FramesOut, formatBytes(int64(t.BytesOut)))
		}
		tw.Flush()
	}

	fmt.Fprintf(w, "\nwarnings: %d recent, %d since start\n", len(s.Warnings), s.WarningsSeen)
	for _, x := range s.Warnings {
		fmt.Fprintf(w, "  %s %s %s %s\n", x.Time.Local().Format("15:04:05"), x.Level, x.Msg, x.Attrs)
	}
	return tw.Flush()
}

func reachabilityLine(s *Snapshot) string {
	r := s.Reachability
	line := r.State
	if r.Relayed {
		line += ", through a relay"
	}
	if r.Reason != "" {
		line += ": " + r.Reason
	}
	if r.Fix != "" {
		line += " (" + r.Fix + ")"
	}
	if len(r.Addrs) > 0 {
		line += "; dial " + strings.Join(r.Addrs, " ")
	}
	return line
}

func trustLine(ids []string) string {
	if len(ids) == 0 {
		return "no launcher"
	}
	return strings.Join(ids, " ")
}

func lossText(v float64, known bool) string {
	if !known {
		return "-"
	}
	return fmt.Sprintf("%.4f", v)
}

func formatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	f, u := float64(n), "KMGTPE"
	i := -1
	for f >= unit && i < len(u)-1 {
		f /= unit
		i++
	}
	return fmt.Sprintf("%.1f %ciB", f, u[i])
}
