package daemon

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/pipeswarm/pipeswarm/node/ckpt"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/train"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/shard"
)

// handleWeights serves p2p.ProtoWeights: one request, one reply, then the file.
func (d *Daemon) handleWeights(s network.Stream) {
	defer s.Close()
	from := s.Conn().RemotePeer()
	_ = s.SetReadDeadline(time.Now().Add(wire.Window(d.host, from)))
	var req wire.WeightsReq
	if err := p2p.ReadMsg(s, &req, wire.MaxWeightsMsg); err != nil {
		d.penalise(s, from, err)
		return
	}
	path, size, err := d.weightsFor(from, req)
	reply := wire.WeightsReply{OK: err == nil, Bytes: size}
	if err != nil {
		reply.Error = err.Error()
		d.log.Warn("stage weights not given", "peer", from, "run", fmt.Sprintf("%016x", req.Run), "stage", req.Stage, "replica", req.Replica, "err", err)
	}
	// The file at a link's slowest plausible rate, 256 KiB/s, on top of the usual window.
	_ = s.SetWriteDeadline(time.Now().Add(wire.Window(d.host, from) + time.Duration(size>>18)*time.Second))
	if err := p2p.WriteMsg(s, reply); err != nil || !reply.OK {
		return
	}
	f, err := os.Open(path)
	if err != nil {
		s.Reset()
		return
	}
	defer f.Close()
	if n, err := io.Copy(s, io.LimitReader(f, size)); err != nil || n != size {
		d.log.Warn("stage weights cut short", "peer", from, "path", path, "sent", n, "err", err)
		s.Reset()
		return
	}
	d.log.Info("stage weights given to the run's launcher for export", "run", fmt.Sprintf("%016x", req.Run), "stage", req.Stage,
		"replica", req.Replica, "step", req.Step, "bytes", size)
}

// weightsFor checks a request for a cell's weights and finds the checkpoint file: the
// node's consent, the run's launcher, the run's spec.
func (d *Daemon) weightsFor(from peer.ID, req wire.WeightsReq) (string, int64, error) {
	if req.Run == 0 || req.Stage < 0 || req.Replica < 0 || req.Step < 1 {
		return "", 0, fmt.Errorf("bad request: run %016x stage %d replica %d step %d", req.Run, req.Stage, req.Replica, req.Step)
	}
	runDir := d.dir.RunDir(fmt.Sprintf("%016x", req.Run))
	b, err := os.ReadFile(filepath.Join(runDir, ckpt.LauncherFile))
	if err != nil {
		return "", 0, fmt.Errorf("no run %016x here", req.Run)
	}
	var rec launcherRecord
	if err := json.Unmarshal(b, &rec); err != nil {
		return "", 0, fmt.Errorf("run %016x: unreadable launcher record: %w", req.Run, err)
	}
	if from.String() != rec.Launcher {
		return "", 0, fmt.Errorf("%w: only the run's launcher %s may collect its weights, not %s", wire.ErrExportRefused, rec.Launcher, from)
	}
	if !d.cfg.ExportAllowed() {
		return "", 0, fmt.Errorf("%w: this node's config says export: deny (its owner can set export: allow in its config, or start it with --export allow)",
			wire.ErrExportRefused)
	}
	for _, replicas := range []int{1, 2} { // stage-N, else stage-N-replica-R
		if replicas == 1 && req.Replica != 0 {
			continue
		}
		for _, p := range ckpt.Pairs(runDir, ckpt.Base(req.Stage, req.Replica, replicas)) {
			meta, err := shard.ReadCheckpointMetadata(p.Weights)
			if err != nil || meta[train.MetaStep] != strconv.Itoa(req.Step) {
				continue
			}
			sp, err := spec.Parse([]byte(meta[train.MetaSpec]), "checkpoint spec")
			if err != nil {
				return "", 0, fmt.Errorf("%s: %w", p.Weights, err)
			}
			if sp.Export != spec.ExportAllowed {
				return "", 0, fmt.Errorf("%w: run %016x's spec says export: %s: its weights stay on the nodes that trained them", wire.ErrExportRefused, req.Run, sp.Export)
			}
			st, err := os.Stat(p.Weights)
			if err != nil {
				return "", 0, err
			}
			return p.Weights, st.Size(), nil
		}
	}
	return "", 0, fmt.Errorf("no checkpoint of stage %d replica %d of run %016x at step %d here", req.Stage, req.Replica, req.Run, req.Step)
}
