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
	plan, refusals, err := assign.Plan(cfg, train.StaffSchedule(sp), p.Replicas, mb, sp.Model.Recompute, offers)
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
// memory by part and the node plan gives it. An async run's rows show the past weight
// versions each stage keeps, and what they hold.
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
	schedule := ""
	if p.Async() {
		schedule = fmt.Sprintf("; schedule async, delay %s", sp.Train.Delay)
	}
	fmt.Fprintf(w, "%s: %s parameters (d_model %d, %d layers, vocab %d, %s) in %s; micro-batches of %d × %d tokens; recompute %s%s\n",
		sp.Name, commas(assign.ParamCount(train.ModelConfig(sp))), m.DModel, m.NLayers, m.Vocab, m.Precision, cells, mb, m.SeqLen, recompute, schedule)
	cfg := train.ModelConfig(sp)
	sched := train.StaffSchedule(sp)
	ranges, _ := shard.SplitLayers(m.NLayers, p.Stages) // the spec is valid
	given := map[[2]int]string{}
	for _, a := range plan {
		given[[2]int{a.Stage, a.Replica}] = a.Peer
	}
	// NAdam, the update rule of train.delay: nesterov, keeps AdamW's two moments.
	rule := "AdamW"
	if p.Async() && sp.Train.Delay == spec.DelayNesterov {
		rule = "NAdam"
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	if p.Async() {
		fmt.Fprintf(tw, "stage\treplica\tlayers\tin flight\tversions\tweights\tgradients\t%s\tpast weights\tactivations\tevaluation\tworkspace\toverhead\ttotal\tnode\t\n", rule)
	} else {
		fmt.Fprintf(tw, "stage\treplica\tlayers\tin flight\tweights\tgradients\t%s\tactivations\tevaluation\tworkspace\toverhead\ttotal\tnode\t\n", rule)
	}
	for rep := range p.Replicas {
		for s, r := range ranges {
			me := assign.StageMemory(cfg, r, sched, s, mb, m.Recompute)
			node, ok := given[[2]int{s, rep}]
			if !ok {
				node = "none fits"
			}
			row := []any{s, rep, fmt.Sprintf("[%d,%d)", r.Lo, r.Hi), sched.Slots(s)}
			if p.Async() {
				row = append(row, sched.Versions(s))
			}
			row = append(row, assign.FormatBytes(me.Weights), assign.FormatBytes(me.Grads), assign.FormatBytes(me.Optimizer))
			if p.Async() {
				row = append(row, assign.FormatBytes(me.Stashed))
			}
			row = append(row, assign.FormatBytes(me.Activations), assign.FormatBytes(me.Evaluation), assign.FormatBytes(me.Workspace),
				assign.FormatBytes(me.Overhead), assign.FormatBytes(me.Total()), node)
			for _, v := range row {
				fmt.Fprintf(tw, "%v\t", v)
			}
			fmt.Fprintln(tw)
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
