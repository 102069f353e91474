package daemon

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/ckpt"
	"github.com/pipeswarm/pipeswarm/node/spec"
	"github.com/pipeswarm/pipeswarm/node/wire"
	"github.com/pipeswarm/pipeswarm/node/worker"
	"github.com/pipeswarm/pipeswarm/p2p"
	"github.com/pipeswarm/pipeswarm/p2p/traffic"
)

// Bounds on control streams: what one peer, and every peer that is neither a
// trusted launcher nor a peer of a run here, may hold open at once, and the
// largest message those others may send (a plan from a launcher this node does
// not list in trust is one of those).
// The strangers' streams are bounded per address too (identities are free, addresses
// are not) so that one attacker's do not crowd out an honest stranger's, and in all,
// so that what they may send (ctlStrangers × maxStrangerMsg) stays small.
const (
	ctlPerPeer     = 8
	ctlPerIP       = 16
	ctlStrangers   = 256
	maxStrangerMsg = 256 << 10
)

// ctlClass is what a control stream's sender is to this node.
type ctlClass int

const (
	ctlStranger ctlClass = iota // no run here, not trusted
	ctlMember                   // a peer of a run held here
	ctlLauncher                 // a trusted launcher, or the launcher of a run held here
)

// ctlAdmit counts a control stream from p at ip, and reports what p is and whether
// it may open one more now; release undoes it.
func (d *Daemon) ctlAdmit(p peer.ID, ip string) (ctlClass, bool) {
	r := &ctlOpened{p: p, ip: ip}
	if !d.ask(r) {
		return ctlStranger, false
	}
	return r.class, r.ok
}

func (d *Daemon) ctlRelease(p peer.ID, ip string, class ctlClass) {
	d.ask(&ctlClosed{p: p, ip: ip, class: class})
}

func (d *Daemon) handleControl(s network.Stream) {
	from := s.Conn().RemotePeer()
	ip := "" // a connection with no IP (a relayed one): its relay's limits hold
	if a, err := manet.ToIP(s.Conn().RemoteMultiaddr()); err == nil {
		ip = a.String()
	}
	class, ok := d.ctlAdmit(from, ip)
	if !ok {
		d.log.Debug("control stream refused: too many open", "peer", from)
		s.Reset()
		return
	}
	defer d.ctlRelease(from, ip, class)
	defer s.Close()
	_ = s.SetReadDeadline(time.Now().Add(wire.Window(d.host, from)))
	meter := d.meters.For(p2p.ProtoControl)
	limit := p2p.MaxMsgBytes
	if class != ctlLauncher {
		limit = maxStrangerMsg
	}
	var m wire.Msg
	cr := &traffic.CountingReader{R: s}
	if err := p2p.ReadMsg(cr, &m, limit); err != nil {
		if class == ctlStranger && !errors.Is(err, p2p.ErrViolation) && !errors.Is(err, io.EOF) {
			// Holding a stream open, or a buffer part-filled, is how a peer with no
			// business here ties the node up: from it, a message that never arrives
			// whole is a violation.
			err = fmt.Errorf("%w: message cut short or stalled after %d bytes: %w", p2p.ErrBadMsg, cr.N, err)
		}
		d.penalise(s, from, err)
		return
	}
	meter.In(cr.N)
	r := d.control(from, m) // the caller's deadline bounds this
	_ = s.SetWriteDeadline(time.Now().Add(wire.Window(d.host, from)))
	cw := &traffic.CountingWriter{W: s}
	if err := p2p.WriteMsg(cw, r); err != nil {
		d.log.Debug("control reply not sent", "peer", from, "err", err)
		return
	}
	meter.Out(cw.N)
}

func (d *Daemon) control(from peer.ID, m wire.Msg) wire.Reply {
	switch m.Type {
	case wire.MsgOffer:
		if !d.cfg.Open && !d.trust[from] {
			// Only what a launcher needs to hear that this node will not take its run:
			// not its memory, addresses or free slots.
			r := &offerRefused{}
			if d.ask(r) && !r.quiet { // once a minute at most: strangers' offers cost no disk
				d.log.Warn("refusing an offer request from an untrusted key", "key", from)
			}
			return wire.Reply{Error: fmt.Sprintf("refused: %s is a key this node does not trust (trust it with --trust %s, or set open: true)", from, from)}
		}
		v := d.view.Load()
		free := d.cfg.MaxStages - len(v.runs) - v.pending
		r := wire.Reply{OK: true, Offer: &assign.Offer{Peer: d.host.ID().String(), Addrs: d.host.Addrs(),
			MemoryBytes: d.cfg.MemoryBudgetBytes(), MaxStages: free, Precisions: d.cfg.Precisions(), NoExport: !d.cfg.ExportAllowed()}}
		if m.Run != 0 && m.Spec != "" {
			if sp, err := spec.Parse([]byte(m.Spec), "run spec"); err == nil {
				r.Held = ckpt.HeldIn(d.dir.RunDir(fmt.Sprintf("%016x", m.Run)), sp.String(), sp.Pipeline.Stages, sp.Pipeline.Replicas, d.log)
			}
		}
		return r
	case wire.MsgAssign:
		if err := d.accept(from, m.Signed); err != nil {
			if errors.Is(err, p2p.ErrViolation) { // unsigned, or a signature that does not hold
				d.offence(from, err)
			}
			return wire.Reply{Error: err.Error()}
		}
		return wire.Reply{OK: true}
	case wire.MsgStart, wire.MsgAbort, wire.MsgIdle, wire.MsgReplace, wire.MsgDrop, wire.MsgNorm, wire.MsgCheckpoint, wire.MsgRecorded, wire.MsgStopAt:
	default:
		err := fmt.Errorf("%w: unknown control message %q", p2p.ErrBadMsg, m.Type)
		d.offence(from, err)
		return wire.Reply{Error: err.Error()}
	}
	w := d.run(m.Run)
	if w == nil {
		return wire.Reply{Error: fmt.Sprintf("no run %016x here", m.Run)}
	}
	switch m.Type {
	case wire.MsgStart:
		if from != w.Launcher() {
			return wire.Reply{Error: "only the run's launcher may start it"}
		}
		w.Start()
		return wire.Reply{OK: true}
	case wire.MsgAbort:
		if from != w.Launcher() {
			return wire.Reply{Error: "only the run's launcher may abort it"}
		}
		w.Cancel(fmt.Errorf("%w: %s", ErrAborted, m.Reason))
		w.Start() // a worker never started still has to finish
		return wire.Reply{OK: true}
	case wire.MsgIdle:
		if from != w.Launcher() {
			return wire.Reply{Error: "only the run's launcher may idle its stages"}
		}
		w.Cancel(fmt.Errorf("%w: %s", worker.ErrIdle, m.Reason))
		w.Start()
		return wire.Reply{OK: true}
	case wire.MsgReplace:
		if from != w.Launcher() {
			return wire.Reply{Error: "only the run's launcher may move a cell"}
		}
		if m.Cell != nil {
			if id, err := peer.Decode(m.Cell.Peer); err == nil {
				d.addAddrs(id, m.Cell.Addrs)
				d.addMember(m.Run, id, m.Cell.Addrs)
			}
		}
		if err := w.Replace(m.Cell); err != nil {
			return wire.Reply{Error: err.Error()}
		}
		return wire.Reply{OK: true}
	case wire.MsgDrop:
		if from != w.Launcher() {
			return wire.Reply{Error: "only the run's launcher may drop a replica pipeline"}
		}
		if err := w.Drop(m.Cell, m.Reason); err != nil {
			return wire.Reply{Error: err.Error()}
		}
		return wire.Reply{OK: true}
	case wire.MsgCheckpoint, wire.MsgRecorded, wire.MsgStopAt:
		if from != w.Launcher() {
			return wire.Reply{Error: "only the run's launcher may say when its stages checkpoint or stop"}
		}
		if err := w.Order(m.Type, m.Step, m.Reason); err != nil {
			return wire.Reply{Error: err.Error()}
		}
		return wire.Reply{OK: true}
	case wire.MsgNorm:
		n := m.Norm
		if n == nil || !w.PeerHolds(from, n.Stage) {
			err := fmt.Errorf("%w: norm from a peer that does not hold that stage", p2p.ErrBadMsg)
			d.offence(from, err)
			return wire.Reply{Error: err.Error()}
		}
		w.Norm(n.Step, n.Stage, n.SumSq)
	}
	return wire.Reply{OK: true}
}
