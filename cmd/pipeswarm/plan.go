package main

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/config"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/shard"
)

// planOnly staffs sp on nodes hypothetical nodes of nodeMemory each (as a node offers
// its memory budget) and prints the plan with each stage's memory, training nothing. A
// plan that leaves a stage without a node is printed as far as it goes and is an error
// that says why.
func planOnly(w io.Writer, sp *spec.Spec, nodes int, nodeMemory string) error {
	if nodes < 1 {
		return fmt.Errorf("--plan-only needs --nodes N, how many nodes to plan for (at least 1, got %d), and --node-memory SIZE", nodes)
	}
	mem, err := config.ParseBytes(nodeMemory)
	if err == nil && mem < 1 {
		err = fmt.Errorf("size %q is not positive", nodeMemory)
	}
	if err != nil {
		return fmt.Errorf("--node-memory: %w; want each node's memory budget, such as 24GiB", err)
	}
	offers := make([]assign.Offer, nodes)
	for i := range offers {
		offers[i] = assign.Offer{Peer: fmt.Sprintf("node%d", i+1), MemoryBytes: mem, MaxStages: 1, Precisions: []string{sp.Model.Precision}}
	}
	p := sp.Pipeline
	mb := sp.Train.BatchSize / p.MicroBatches
	cfg := train.ModelConfig(sp)
	plan, refusals, err := assign.Plan(cfg, p.Stages, p.Replicas, mb, p.MicroBatches, p.InFlight, sp.Model.Recompute, offers)
	if err != nil && !errors.Is(err, assign.ErrUnstaffed) {
		return err
	}
	printPlan(w, sp, plan)
	fmt.Fprintf(w, "%d nodes of %s each: ", nodes, assign.FormatBytes(mem))
	if err != nil {
		fmt.Fprintln(w, "the run cannot be staffed")
		return err
	}
	fmt.Fprintf(w, "every stage has a node (%d used)\n", len(plan))
	for _, r := range refusals {
		fmt.Fprintln(w, "  not used:", r)
	}
	return nil
}

// printPlan writes the run's shape and one row per stage and replica with the stage's
// memory by part and the node plan gives it.
func printPlan(w io.Writer, sp *spec.Spec, plan []assign.Assignment) {
	p, m := sp.Pipeline, sp.Model
	mb := sp.Train.BatchSize / p.MicroBatches
	recompute := "off"
	if m.Recompute {
		recompute = "on"
	}
	cells := fmt.Sprintf("%d stages", p.Stages)
	if p.Replicas > 1 {
		cells += fmt.Sprintf(" × %d replica pipelines", p.Replicas)
	}
	fmt.Fprintf(w, "%s: %s parameters (d_model %d, %d layers, vocab %d, %s) in %s; micro-batches of %d × %d tokens; recompute %s\n",
		sp.Name, commas(assign.ParamCount(train.ModelConfig(sp))), m.DModel, m.NLayers, m.Vocab, m.Precision, cells, mb, m.SeqLen, recompute)
	cfg := train.ModelConfig(sp)
	ranges, _ := shard.SplitLayers(m.NLayers, p.Stages) // the spec is valid
	given := map[[2]int]string{}
	for _, a := range plan {
		given[[2]int{a.Stage, a.Replica}] = a.Peer
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "stage\treplica\tlayers\tin flight\tweights\tgradients\tAdamW\tactivations\tevaluation\tworkspace\toverhead\ttotal\tnode\t")
	for rep := range p.Replicas {
		for s, r := range ranges {
			slots := assign.Slots(p.Stages, s, p.MicroBatches, p.InFlight)
			me := assign.StageMemory(cfg, r, s == 0, s == p.Stages-1, mb, slots, m.Recompute)
			node, ok := given[[2]int{s, rep}]
			if !ok {
				node = "none fits"
			}
			fmt.Fprintf(tw, "%d\t%d\t[%d,%d)\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", s, rep, r.Lo, r.Hi, slots,
				assign.FormatBytes(me.Weights), assign.FormatBytes(me.Grads), assign.FormatBytes(me.Optimizer),
				assign.FormatBytes(me.Activations), assign.FormatBytes(me.Evaluation), assign.FormatBytes(me.Workspace), assign.FormatBytes(me.Overhead),
				assign.FormatBytes(me.Total()), node)
		}
	}
	tw.Flush()
}

// commas writes n with thousands separated: 1,028,737,024.
func commas(n int64) string {
	s := fmt.Sprint(n)
	var b strings.Builder
	for i, r := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(r)
	}
	return b.String()
}
