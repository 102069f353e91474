package status

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

// collector turns a Snapshot into Prometheus series at each scrape: the daemon's
// counters are the truth, and nothing here keeps a second copy of them.
type collector struct {
	snapshot func() Snapshot

	buildInfo, peers, peersLimited, reachable, penalties, warnings *prometheus.Desc
	frames, bytes                                                  *prometheus.Desc
	runs, step, loss, valLoss, tokens, compute, runBytes           *prometheus.Desc
}

var runLabels = []string{"run", "stage", "replica"}

func newCollector(snapshot func() Snapshot) *collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("pipeswarm_"+name, help, labels, nil)
	}
	return &collector{
		snapshot:     snapshot,
		buildInfo:    d("build_info", "Always 1; the labels say which build this node runs.", "version", "commit", "go", "gemm"),
		peers:        d("peers", "Peers connected now."),
		peersLimited: d("peers_limited", "Connected peers reached only over limited (relayed) connections."),
		reachable:    d("reachable", "Whether other peers can dial this node: 1 public, 0 private (behind NAT or a firewall), -1 unknown."),
		penalties:    d("penalties_total", "Penalties recorded against peers for protocol violations."),
		warnings:     d("warnings_total", "Log records at warn level or above."),
		frames:       d("frames_total", "Frames (messages) moved, per wire protocol and direction (in, out).", "protocol", "direction"),
		bytes:        d("bytes_total", "Bytes of frames moved on the wire, headers included, per wire protocol and direction (in, out).", "protocol", "direction"),
		runs:         d("runs", "Stages of runs held now, by state.", "state"),
		step:         d("step", "Optimiser steps a stage has taken.", runLabels...),
		loss:         d("loss", "Training loss of the last step (last stage only).", runLabels...),
		valLoss:      d("val_loss", "Validation loss of the last evaluation (last stage of replica 0 only).", runLabels...),
		tokens:       d("tokens_per_second", "Tokens per second through a stage over its last few steps.", runLabels...),
		compute:      d("compute_seconds_total", "Seconds a stage has spent computing.", runLabels...),
		runBytes:     d("run_bytes_total", "Bytes of tensor frames a stage received (in) and sent (out).", append(runLabels, "direction")...),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.buildInfo, c.peers, c.peersLimited, c.reachable, c.penalties, c.warnings,
		c.frames, c.bytes, c.runs, c.step, c.loss, c.valLoss, c.tokens, c.compute, c.runBytes} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.snapshot()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	gauge(c.buildInfo, 1, s.Build.Version, s.Build.Commit, s.Build.Go, s.Build.GEMM)
	limited := 0
	for _, p := range s.Peers {
		if p.Limited {
			limited++
		}
	}
	gauge(c.peers, float64(len(s.Peers)))
	gauge(c.peersLimited, float64(limited))
	gauge(c.reachable, Reachable(s.Reachability.State))
	counter(c.penalties, float64(s.Penalties))
	counter(c.warnings, float64(s.WarningsSeen))
	for _, t := range s.Traffic {
		counter(c.frames, float64(t.FramesIn), t.Protocol, "in")
		counter(c.frames, float64(t.FramesOut), t.Protocol, "out")
		counter(c.bytes, float64(t.BytesIn), t.Protocol, "in")
		counter(c.bytes, float64(t.BytesOut), t.Protocol, "out")
	}
	states := map[string]int{RunAccepted: 0, RunRunning: 0}
	seen := map[[3]string]bool{}
	for _, r := range s.Runs {
		l := []string{r.Run, strconv.Itoa(r.Stage), strconv.Itoa(r.Replica)}
		if seen[[3]string(l)] {
			continue // the registry refuses a scrape with a series twice; the first (held now) wins
		}
		seen[[3]string(l)] = true
		if r.State == RunAccepted || r.State == RunRunning {
			states[r.State]++
		}
		gauge(c.step, float64(r.Step), l...)
		if r.Stage == r.Stages-1 && len(r.LossCurve) > 0 {
			gauge(c.loss, r.Loss, l...)
		}
		if r.ValLoss != 0 {
			gauge(c.valLoss, r.ValLoss, l...)
		}
		gauge(c.tokens, r.TokensPerS, l...)
		counter(c.compute, r.ComputeS, l...)
		counter(c.runBytes, float64(r.BytesIn), append(l, "in")...)
		counter(c.runBytes, float64(r.BytesOut), append(l, "out")...)
	}
	for st, n := range states {
		gauge(c.runs, float64(n), st)
	}
}

// Reachable is the pipeswarm_reachable value of a reachability state: 1 public,
// 0 private, -1 anything else (unknown).
func Reachable(state string) float64 {
	switch state {
	case "public":
		return 1
	case "private":
		return 0
	}
	return -1
}
