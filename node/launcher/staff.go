package launcher

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/clock"
)

// idlePeers are the nodes heard on the heartbeat topic holding no stage, with when
// each was last heard so: candidates for a cell whose node is gone.
type idlePeers struct {
	clock clock.Clock
	mu    sync.Mutex
	seen  map[peer.ID]idleSeen
}

type idleSeen struct {
	at    time.Time
	addrs []string
}

// listenIdle follows the heartbeat topic on h until ctx ends or h closes.
func listenIdle(ctx context.Context, h *p2p.Host, clk clock.Clock, log *slog.Logger) *idlePeers {
	ip := &idlePeers{clock: clock.Or(clk), seen: map[peer.ID]idleSeen{}}
	t, err := h.PubSub.Join(p2p.TopicHeartbeats)
	if err != nil {
		log.Debug("no heartbeat topic: only --peers can take a gone node's cell", "err", err)
		return ip
	}
	sub, err := t.Subscribe()
	if err != nil {
		_ = t.Close()
		log.Debug("no heartbeat subscription: only --peers can take a gone node's cell", "err", err)
		return ip
	}
	go func() {
		defer func() { sub.Cancel(); _ = t.Close() }()
		for {
			m, err := sub.Next(ctx)
			if err != nil {
				return
			}
			var hb wire.Heartbeat
			if json.Unmarshal(m.Data, &hb) != nil {
				continue
			}
			from := m.GetFrom() // signed by its sender, unlike the heartbeat's own peer field
			ip.mu.Lock()
			if len(hb.Runs) == 0 {
				var addrs []string
				for _, a := range hb.Addrs {
					if info, err := peer.AddrInfoFromString(a); err == nil && info.ID == from {
						addrs = append(addrs, a) // only its own
					}
				}
				ip.seen[from] = idleSeen{ip.clock.Now(), addrs}
			} else {
				delete(ip.seen, from)
			}
			ip.mu.Unlock()
		}
	}()
	return ip
}

// recent lists, by peer ID, the idle peers heard within the last three heartbeats,
// each with the addresses it gave.
func (ip *idlePeers) recent() map[peer.ID][]string {
	ip.mu.Lock()
	defer ip.mu.Unlock()
	out := map[peer.ID][]string{}
	for id, s := range ip.seen {
		if ip.clock.Since(s.at) < 3*wire.HeartbeatInterval {
			out[id] = s.addrs
		}
	}
	return out
}

func newRunID() uint64 {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return binary.LittleEndian.Uint64(b[:]) | 1 // never 0
}

// staff asks every peer for an offer and plans the stages, retrying until
// StaffTimeout while stages are missing.
func staff(ctx context.Context, h *p2p.Host, calls *wire.CallClock, sp *spec.Spec, o Options, prev *runRecord, timeout time.Duration, log *slog.Logger) (*wire.Plan, error) {
	o.Clock = clock.Or(o.Clock)
	deadline := o.Clock.Now().Add(timeout)
	// Waiting can last minutes (a paused run): say what is missing when it changes,
	// and otherwise every half minute.
	var said string
	var saidAt time.Time
	// Only steps whose rows are all recorded can be resumed from; the file does not
	// change while staffing, so it is read once.
	var through int
	if prev != nil {
		through = recordedThrough(filepath.Join(o.OutDir, train.MetricsFile))
	}
	say := func(msg, missing string, args ...any) {
		if missing == said && o.Clock.Since(saidAt) < 30*time.Second {
			return
		}
		said, saidAt = missing, o.Clock.Now()
		log.Warn(msg, append([]any{"missing", missing}, args...)...)
	}
	mb := sp.Train.BatchSize / sp.Pipeline.MicroBatches
	noCommon := 0 // staffing rounds in a row in which every node answered and none held a common step
	for {
		var offers []assign.Offer
		var problems, refused []string
		held := map[string][]wire.Held{}
		ask := wire.Msg{Type: wire.MsgOffer}
		if prev != nil {
			ask.Run, ask.Spec = prev.id, sp.String()
		}
		for _, addr := range o.Peers {
			id, err := h.Connect(ctx, addr)
			if err != nil {
				// A node restarted (during a pause, say) may listen elsewhere now; it
				// dials the launchers it knew, so it may be connected all the same.
				if a, aerr := ma.NewMultiaddr(addr); aerr == nil {
					if info, ierr := peer.AddrInfoFromP2pAddr(a); ierr == nil && p2p.Linked(h.Network(), info.ID) {
						id, err = info.ID, nil
					}
				}
			}
			if err != nil {
				problems = append(problems, err.Error())
				continue
			}
			r, err := wire.Call(ctx, h, calls, nil, id, wire.Msg{Type: ask.Type, Run: ask.Run, Spec: ask.Spec})
			if err == nil && !r.OK && r.Error != "" {
				// A node that will not take this launcher's runs at all (its key is not
				// trusted there): waiting does not change that.
				refused = append(refused, fmt.Sprintf("%s on %s", r.Error, addr))
				continue
			}
			if err != nil || !r.OK || r.Offer == nil {
				problems = append(problems, fmt.Sprintf("%s gave no offer: %v", id, err))
				continue
			}
			r.Offer.Peer = id.String()
			offers = append(offers, *r.Offer)
			held[id.String()] = r.Held
		}
		if len(refused) > 0 {
			return nil, fmt.Errorf("%w: %s", ErrRunFailed, strings.Join(refused, "; "))
		}
		var resume *wire.ResumePlan
		restart := false
		if prev != nil {
			r, ordered, err := resumePoint(sp, prev.id, through, offers, held)
			switch {
			case err == nil:
				resume, offers, noCommon = r, ordered, 0
			case len(problems) == 0 && noCommon >= 1:
				// Every node given has answered, twice, and none holds more: no step every
				// stage checkpointed will come. The run starts again from its beginning,
				// which is as exact as resuming.
				log.Warn("the run restarts from its start: no step has a checkpoint of every stage", "why", err)
				restart = true
			default:
				if len(problems) == 0 {
					noCommon++
				} else {
					noCommon = 0
				}
				if o.Clock.Now().After(deadline) {
					return nil, fmt.Errorf("%w: %v%s", ErrRunFailed, err, notReached(problems))
				}
				say("waiting for the nodes that hold the run's checkpoints", err.Error(), "unreachable", len(problems), "timeout_in", deadline.Sub(o.Clock.Now()).Round(time.Second))
				select {
				case <-ctx.Done():
					return nil, ctx.Err()
				case <-o.Clock.After(2 * time.Second):
				}
				continue
			}
		}
		able, refusals := assign.ForPrecision(offers, sp.Model.Precision)
		stages, planRefusals, err := assign.Plan(train.ModelConfig(sp), train.StaffSchedule(sp), sp.Pipeline.Replicas, mb, sp.Model.Recompute, able)
		refusals = append(refusals, planRefusals...)
		for _, r := range refusals {
			log.Warn("peer not given a stage", "reason", r)
		}
		if err == nil {
			// Assigning and starting take a call per cell; a plan not started within the
			// staffing timeout (at least a minute) is stale.
			now := time.Now().UTC()
			life := max(time.Minute, time.Duration(sp.Pipeline.StaffTimeout)*time.Second)
			if err := resumeHolders(sp, resume, stages, offers); err != nil {
				return nil, fmt.Errorf("%w: %v", ErrRunFailed, err)
			}
			if sp.Export == spec.ExportAllowed {
				warnNoExport(sp, stages, offers, log)
			}
			return &wire.Plan{Spec: sp.String(), Stages: stages, Created: now, Expires: now.Add(life), Resume: resume, Restarted: restart}, nil
		}
		if !errors.Is(err, assign.ErrUnstaffed) || o.Clock.Now().After(deadline) {
			return nil, fmt.Errorf("%w: %v%s", ErrRunFailed, err, notReached(problems))
		}
		say("waiting for peers", err.Error(), "unreachable", len(problems), "timeout_in", deadline.Sub(o.Clock.Now()).Round(time.Second))
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-o.Clock.After(2 * time.Second):
		}
	}
}

// notReached says which peers staffing could not reach or get an offer from, if any.
func notReached(problems []string) string {
	if len(problems) == 0 {
		return ""
	}
	return fmt.Sprintf("; %s not reached (is it running, at that address?): %s", plural(len(problems), "node"), strings.Join(problems, "; "))
}

// ErrNotMultiaddr is wrapped by CheckPeerAddr's error for text that is not a
// multiaddr at all (a command may then try it as a file).
var ErrNotMultiaddr = errors.New("not a multiaddr")

// CheckPeerAddr returns the peer ID of addr, a node's full address: a multiaddr ending
// in /p2p/ and the node's peer ID. The error says what a full address looks like and
// where a node prints it.
func CheckPeerAddr(addr string) (peer.ID, error) {
	const where = "a node prints its full addresses when it starts (\"listening on ...\") and writes them to DIR/addrs in its data directory"
	info, err := peer.AddrInfoFromString(addr)
	if err == nil {
		return info.ID, nil
	}
	if id, derr := peer.Decode(addr); derr == nil {
		return "", fmt.Errorf("%s is a peer ID alone: give the node's full address, a multiaddr ending in /p2p/%s (%s)", addr, id, where)
	}
	if m, merr := ma.NewMultiaddr(addr); merr == nil {
		return "", fmt.Errorf("%s has no peer ID: a node's full address ends in /p2p/ and its ID, as in %s/p2p/12D3KooW... (%s)", addr, m, where)
	} else {
		return "", fmt.Errorf("%w (%v): a node's full address looks like /ip4/10.0.0.5/tcp/4001/p2p/12D3KooW... (%s)", ErrNotMultiaddr, merr, where)
	}
}

// checkPeers refuses peer addresses that cannot be dialled and fewer nodes than the
// run has cells (each node holds one), before any node is asked.
func checkPeers(sp *spec.Spec, addrs []string) error {
	ids := map[peer.ID]bool{}
	var errs []error
	for _, a := range addrs {
		id, err := CheckPeerAddr(a)
		if err != nil {
			errs = append(errs, fmt.Errorf("peer %w", err))
			continue
		}
		ids[id] = true
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	S, R := sp.Pipeline.Stages, sp.Pipeline.Replicas
	need := S * R
	if len(ids) >= need {
		return nil
	}
	what, fix := plural(S, "stage"), "lower pipeline.stages"
	if R > 1 {
		what, fix = what+" × "+plural(R, "replica"), "lower pipeline.replicas"
	}
	offered := fmt.Sprintf("%d offered", len(ids))
	if len(addrs) != len(ids) {
		offered = fmt.Sprintf("%d offered (%d addresses, some of the same node)", len(ids), len(addrs))
	}
	return fmt.Errorf("this run needs %s (%s), %s: start %d more and pass each with --peer, or %s",
		plural(need, "node"), what, offered, need-len(ids), fix)
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)

}

func announce(ctx context.Context, h *p2p.Host, plan *wire.Plan, log *slog.Logger) {
	t, err := h.PubSub.Join(p2p.TopicRuns)
	if err != nil {
		log.Debug("no run topic", "err", err)
		return
	}
	defer t.Close()
	b, _ := json.Marshal(map[string]any{"run": fmt.Sprintf("%016x", plan.ID), "launcher": plan.Launcher, "cells": len(plan.Stages)})
	if err := t.Publish(ctx, b); err != nil {
		log.Debug("run announcement not published", "err", err)
	}
}
