package p2p

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/control"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/discovery/mdns"
	"github.com/libp2p/go-libp2p/p2p/host/autorelay"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	relayv2 "github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/relay"
	"github.com/libp2p/go-libp2p/p2p/protocol/holepunch"
	"github.com/libp2p/go-libp2p/p2p/security/noise"
	tls "github.com/libp2p/go-libp2p/p2p/security/tls"
	quic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// DefaultListen listens on every IPv4 interface, on a kernel-chosen TCP
// port and a kernel-chosen QUIC (UDP) port.
var DefaultListen = []string{"/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"}

const (
	// DefaultMemoryLimit is the resource manager's memory budget when
	// HostOptions.MemoryLimit is 0.
	DefaultMemoryLimit = 512 << 20
	// MDNSService is the mDNS service name pipeswarm peers advertise.
	MDNSService = "pipeswarm"

	// fdLimit is the file descriptors the resource manager may hand out.
	// A pipeline peer talks to tens of peers, not thousands.
	fdLimit = 512
	// mdnsDialTimeout bounds one attempt to connect to a peer found by mDNS.
	mdnsDialTimeout = 10 * time.Second
)

// subnetLimitsV4 bound the connections open at once from one IPv4 address and
// from one /24 (loopback and this machine's own addresses are exempt): a peer, or a few addresses of one network,
// cannot take every connection slot however many identities they make.
var subnetLimitsV4 = []rcmgr.ConnLimitPerSubnet{{PrefixLength: 32, ConnCount: 8}, {PrefixLength: 24, ConnCount: 64}}

// ownAddressLimits are the network prefixes exempt from the per-address limits:
// loopback, as libp2p has it, and this machine's own interface addresses. A connection
// from one of those comes from this machine (several nodes, or a node and its
// launcher, side by side), not from a stranger on the network; counted, the processes
// of one machine would share eight connections, and a restarted one's stale
// connections could lock it out.
func ownAddressLimits() (v4, v6 []rcmgr.NetworkPrefixLimit) {
	v4 = slices.Clone(rcmgr.DefaultNetworkPrefixLimitV4)
	v6 = slices.Clone(rcmgr.DefaultNetworkPrefixLimitV6)
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return v4, v6
	}
	for _, a := range addrs {
		n, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(n.IP)
		if !ok || ip.IsLoopback() {
			continue
		}
		ip = ip.Unmap()
		lim := rcmgr.NetworkPrefixLimit{Network: netip.PrefixFrom(ip, ip.BitLen()), ConnCount: math.MaxInt}
		if ip.Is4() {
			v4 = append(v4, lim)
		} else {
			v6 = append(v6, lim)
		}
	}
	return v4, v6
}

// ErrBadOptions is wrapped by HostOptions.Validate errors.
var ErrBadOptions = errors.New("p2p: bad host options")

// HostOptions configures NewHost.
type HostOptions struct {
	Key         crypto.PrivKey // required: the host's identity
	Listen      []string       // multiaddrs (TCP or QUIC-v1); nil = DefaultListen
	MemoryLimit int64          // memory budget in bytes; libp2p's default resource limits are scaled to it; 0 = DefaultMemoryLimit
	MDNS        bool           // LAN discovery: connect to pipeswarm peers found by mDNS (service MDNSService)
	Log         *slog.Logger   // nil = slog.Default()
	// PortsKept: the caller keeps the ports port 0 picks for the next start, so the
	// reachability fix may name them; otherwise port 0 is advised against.
	PortsKept bool
	// Transports, if set, replace the TCP and QUIC transports (and the default
	// security and muxer options stay): e.g. QUIC over an in-process simulated
	// network for the WAN bench. Listen must then be addresses they serve.
	Transports []libp2p.Option

	// NAT traversal; all off by default (tests, the simulated bench), where it
	// would only add traffic.

	// Reachability runs AutoNAT v2, asking peers to dial this host's public,
	// announced and observed addresses back and answering their requests, and
	// keeps Host.Reachability current.
	Reachability bool
	// Announce lists addresses others should dial besides the listen ones
	// (a cloud box's mapped port): /ip4|ip6|dns4|dns6/HOST/tcp/N or
	// .../udp/N/quic-v1, without /p2p.
	Announce []string
	// PortMap asks the router to forward the listen ports (UPnP IGD, NAT-PMP).
	PortMap bool
	// RelayService, if set, makes this host a circuit relay v2 for others
	// with these limits.
	RelayService *RelayLimits
	// Relays are relays to reserve a slot on while this host is not publicly
	// reachable, full multiaddrs ending in /p2p/<id>; peers that turn out not
	// to serve circuit v2 are skipped.
	Relays []string
	// HolePunch dials and accepts relayed connections and upgrades them to
	// direct ones by hole punching (DCUtR). Relays and RelayService imply
	// relayed connections too.
	HolePunch bool
	// HolePunchGrace is how long a new tensor stream waits for hole punching
	// to replace a young relayed connection; 0 = DefaultHolePunchGrace.
	HolePunchGrace time.Duration

	// reachPrivate counts private and loopback addresses as reachability
	// candidates and lets AutoNAT v2 dial them: tests on one machine.
	reachPrivate bool
	// Penalties sets how violations are scored and how long bans last.
	Penalties PenaltyOptions
}

// Validate reports the first bad field: a missing key, a listen address
// that does not parse or is neither TCP nor QUIC-v1 over IP, a negative
// memory limit. Errors wrap ErrBadOptions.
func (o HostOptions) Validate() error {
	if o.Key == nil {
		return fmt.Errorf("%w: Key: missing", ErrBadOptions)
	}
	for i, s := range o.Listen {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			return fmt.Errorf("%w: Listen[%d] %q: %w", ErrBadOptions, i, s, err)
		}
		if !listenable(a) {
			return fmt.Errorf("%w: Listen[%d] %q: want /ip4|ip6/.../tcp/PORT or /ip4|ip6/.../udp/PORT/quic-v1", ErrBadOptions, i, s)
		}
	}
	if o.MemoryLimit < 0 {
		return fmt.Errorf("%w: MemoryLimit: %d is negative", ErrBadOptions, o.MemoryLimit)
	}
	for i, s := range o.Announce {
		if err := CheckAnnounce(s); err != nil {
			return fmt.Errorf("%w: Announce[%d]: %w", ErrBadOptions, i, err)
		}
	}
	for i, s := range o.Relays {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			return fmt.Errorf("%w: Relays[%d] %q: %w", ErrBadOptions, i, s, err)
		}
		if _, err := peer.AddrInfoFromP2pAddr(a); err != nil {
			return fmt.Errorf("%w: Relays[%d] %q: want a full address ending in /p2p/<id>: %w", ErrBadOptions, i, s, err)
		}
	}
	if o.RelayService != nil {
		if err := o.RelayService.validate(); err != nil {
			return err
		}
	}
	if o.HolePunchGrace < 0 {
		return fmt.Errorf("%w: HolePunchGrace: %v is negative", ErrBadOptions, o.HolePunchGrace)
	}
	return o.Penalties.Validate()
}

// listenable reports whether a is an address our transports can listen on.
func listenable(a ma.Multiaddr) bool {
	var codes []int
	for _, c := range a {
		codes = append(codes, c.Code())
	}
	if len(codes) < 2 || (codes[0] != ma.P_IP4 && codes[0] != ma.P_IP6) {
		return false
	}
	return slices.Equal(codes[1:], []int{ma.P_TCP}) || slices.Equal(codes[1:], []int{ma.P_UDP, ma.P_QUIC_V1})
}

func (o HostOptions) withDefaults() HostOptions {
	if o.Listen == nil {
		o.Listen = DefaultListen
	}
	if o.MemoryLimit == 0 {
		o.MemoryLimit = DefaultMemoryLimit
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.HolePunchGrace == 0 {
		o.HolePunchGrace = DefaultHolePunchGrace
	}
	return o
}

// Host is a libp2p host plus gossipsub. Stream handlers should be set with
// Handle, so streams from banned peers never reach them.
type Host struct {
	host.Host
	PubSub *pubsub.PubSub

	log       *slog.Logger
	penalties *Penalties
	mdns      mdns.Service   // nil unless HostOptions.MDNS
	relay     *relayv2.Relay // nil unless HostOptions.RelayService
	reach     *reacher       // nil unless HostOptions.Reachability
	paths     paths
	punches   punches
	gates     gates
	allow     *rcmgr.Allowlist // Reserve's entries
	// holePunchGrace is HostOptions.HolePunchGrace.
	holePunchGrace time.Duration

	ctx    context.Context    // lives until Close
	cancel context.CancelFunc // ends pubsub and mDNS dials

	dialMu    sync.Mutex
	closing   bool           // under dialMu: no new mDNS dials
	dials     sync.WaitGroup // mDNS dials in flight
	closeOnce sync.Once
	closeErr  error
}

// NewHost builds the host: TCP and QUIC transports, Noise and TLS security,
// yamux, a resource manager with o.MemoryLimit, identify, a connection
// gater that refuses banned peers; gossipsub on it; mDNS if asked.
// Listening has started when it returns.
//
// ctx bounds construction only; the host runs until Close.
func NewHost(ctx context.Context, o HostOptions) (*Host, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("p2p: new host: %w", err)
	}
	o = o.withDefaults()
	pen, err := NewPenalties(o.Penalties)
	if err != nil {
		return nil, err
	}
	h := &Host{log: o.Log.With("subsystem", "p2p"), penalties: pen}
	h.paths = paths{log: h.log, m: map[peer.ID]StreamPath{}}
	h.holePunchGrace = o.HolePunchGrace
	h.punches = punches{log: h.log.With("part", "holepunch"), m: map[peer.ID]HolePunch{}}

	limits := rcmgr.DefaultLimits // a copy: Scale must not touch the package default
	own4, own6 := ownAddressLimits()
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(limits.Scale(o.MemoryLimit, fdLimit)), rcmgr.WithMetricsDisabled(),
		rcmgr.WithLimitPerSubnet(subnetLimitsV4, nil), // IPv6: libp2p's /56 and /48 limits
		rcmgr.WithNetworkPrefixLimit(own4, own6))
	if err != nil {
		return nil, fmt.Errorf("p2p: resource manager: %w", err)
	}
	transports := o.Transports
	if transports == nil {
		transports = []libp2p.Option{libp2p.Transport(tcp.NewTCPTransport), libp2p.Transport(quic.NewTransport)}
	}
	opts := append([]libp2p.Option{
		libp2p.Identity(o.Key),
		libp2p.ListenAddrStrings(o.Listen...),
	}, transports...)
	opts = append(opts,
		libp2p.Security(noise.ID, noise.New),
		libp2p.Security(tls.ID, tls.New),
		libp2p.Muxer(yamux.ID, yamux.DefaultTransport),
		libp2p.ResourceManager(rm),
		libp2p.ConnectionGater(gater{h.penalties}),
		libp2p.DisableMetrics(),
	)
	opts = append(opts, natOptions(o, &h.punches)...)
	lh, err := libp2p.New(opts...)
	if err != nil {
		rm.Close()
		return nil, fmt.Errorf("p2p: new host on %v: %w", o.Listen, err)
	}
	h.Host = lh
	h.allow = rcmgr.GetAllowlist(rm)
	h.ctx, h.cancel = context.WithCancel(context.Background())
	if o.RelayService != nil {
		if h.relay, err = startRelay(lh, *o.RelayService); err != nil {
			h.Close()
			return nil, err
		}
	}
	if o.Reachability {
		if h.reach, err = newReacher(lh, o, o.Transports, h.log.With("part", "reachability")); err != nil {
			h.Close()
			return nil, err
		}
	}

	h.PubSub, err = pubsub.NewGossipSub(h.ctx, lh, pubsub.WithBlacklist(pubsubBlacklist{h.penalties}))
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("p2p: gossipsub: %w", err)
	}
	if o.MDNS {
		h.mdns = mdns.NewMdnsService(lh, MDNSService, mdnsNotifee{h})
		if err := h.mdns.Start(); err != nil {
			h.Close()
			return nil, fmt.Errorf("p2p: mdns: %w", err)
		}
	}
	h.log.Info("host up", "id", lh.ID(), "addrs", h.Addrs(), "mdns", o.MDNS, "relay_service", o.RelayService != nil,
		"relays", len(o.Relays), "hole_punch", o.HolePunch, "announce", o.Announce)
	return h, nil
}

// natOptions are the libp2p options for o's NAT traversal settings. Relays
// are validated already.
func natOptions(o HostOptions, tracer *punches) []libp2p.Option {
	var opts []libp2p.Option
	if o.HolePunch || o.RelayService != nil || len(o.Relays) > 0 {
		opts = append(opts, libp2p.EnableRelay())
	} else {
		opts = append(opts, libp2p.DisableRelay())
	}
	if o.HolePunch {
		opts = append(opts, libp2p.EnableHolePunching(holepunch.WithTracer(tracer)))
	}
	if len(o.Relays) > 0 {
		var infos []peer.AddrInfo
		for _, s := range o.Relays {
			info, _ := peer.AddrInfoFromString(s)
			infos = append(infos, *info)
		}
		opts = append(opts, libp2p.EnableAutoRelayWithPeerSource(relaySource(infos),
			autorelay.WithMinCandidates(1), // reserve on the first relay found, not after the boot delay
			autorelay.WithBootDelay(0),
			autorelay.WithNumRelays(min(2, len(infos))),
			autorelay.WithMaxCandidates(len(infos)),
			autorelay.WithBackoff(time.Minute), // a configured relay that restarts is tried again soon
			autorelay.WithMinInterval(10*time.Second)))
	}
	if o.PortMap {
		opts = append(opts, libp2p.NATPortMap())
	}
	if len(o.Announce) > 0 {
		var announce []ma.Multiaddr
		for _, s := range o.Announce {
			announce = append(announce, ma.StringCast(s))
		}
		opts = append(opts, libp2p.AddrsFactory(func(addrs []ma.Multiaddr) []ma.Multiaddr {
			return append(slices.Clone(announce), addrs...)
		}))
	}
	return opts
}

// Penalties is the host's misbehaviour record (Limit DefaultPenaltyLimit).
// Banned peers' streams are reset by Handle, their new connections refused,
// and their gossip dropped.
// Penalties is the host's record of protocol violations
// (HostOptions.Penalties). While a peer's ban lasts, its streams are reset by
// Handle, its new connections refused and its gossip dropped; when the ban
// ends it is served again.
func (h *Host) Penalties() *Penalties { return h.penalties }

// Handle sets fn as the handler for proto. Streams from banned peers, and
// from peers proto's gate (Gate) refuses, are reset before fn runs; the first
// refusal of each ban is logged.
func (h *Host) Handle(proto protocol.ID, fn func(network.Stream)) {
	h.SetStreamHandler(proto, func(s network.Stream) {
		id := s.Conn().RemotePeer()
		if !h.gates.allow(proto, id) {
			// Before a byte is read: a stranger's stream costs its negotiation only,
			// and leaves the protocol's shared stream limit to the peers it is for.
			h.log.Debug("stream refused by its protocol's gate", "peer", id, "protocol", proto)
			s.Reset()
			return
		}
		if banned, first := h.penalties.firstRefusal(id); banned {
			if first {
				h.log.Warn("refusing streams from banned peer", "peer", id, "protocol", proto,
					"score", fmt.Sprintf("%.1f", h.penalties.Score(id)), "until", h.penalties.BannedUntil(id).Format(time.RFC3339))
			}
			s.Reset()
			return
		}
		fn(s)
	})
}

// Gate makes Handle refuse proto's streams from every peer allow says no to,
// at once, before they are read (allow must be quick and safe for concurrent
// use). A nil allow lifts the gate. The refusals are counted (GateRefusals),
// not penalised: a peer may open a stream just as its run ends here.
func (h *Host) Gate(proto protocol.ID, allow func(peer.ID) bool) {
	h.gates.mu.Lock()
	defer h.gates.mu.Unlock()
	if h.gates.m == nil {
		h.gates.m = map[protocol.ID]func(peer.ID) bool{}
	}
	if allow == nil {
		delete(h.gates.m, proto)
		return
	}
	h.gates.m[proto] = allow
}

// Reserve lets connections from id at the IP addresses in addrs past the host's
// connection limits once they are full (not past the per-address ones): a run's
// own peers and its launcher get in while strangers hold every other slot.
// Release undoes one Reserve of the same arguments.
func (h *Host) Reserve(id peer.ID, addrs []ma.Multiaddr) { h.reserve(id, addrs, h.allow.Add) }

// Release undoes one Reserve(id, addrs).
func (h *Host) Release(id peer.ID, addrs []ma.Multiaddr) { h.reserve(id, addrs, h.allow.Remove) }

func (h *Host) reserve(id peer.ID, addrs []ma.Multiaddr, do func(ma.Multiaddr) error) {
	if h.allow == nil {
		return
	}
	for _, a := range addrs {
		ip, err := manet.ToIP(a)
		if err != nil || ip.IsLoopback() {
			continue // loopback has no limit to pass
		}
		proto := "ip4"
		if ip.To4() == nil {
			proto = "ip6"
		}
		if m, err := ma.NewMultiaddr("/" + proto + "/" + ip.String() + "/p2p/" + id.String()); err == nil {
			_ = do(m)
		}
	}
}

// GateRefusals is how many streams the gates (Gate) have refused.
func (h *Host) GateRefusals() int64 { return h.gates.refused.Load() }

// gates are the per-protocol admission checks of Handle.
type gates struct {
	mu      sync.RWMutex
	m       map[protocol.ID]func(peer.ID) bool
	refused atomic.Int64
}

func (g *gates) allow(proto protocol.ID, id peer.ID) bool {
	g.mu.RLock()
	allow := g.m[proto]
	g.mu.RUnlock()
	if allow == nil || allow(id) {
		return true
	}
	g.refused.Add(1)
	return false
}

// Addrs is every address the host listens on as a full multiaddr string
// ending in /p2p/<id>, with unspecified addresses (0.0.0.0) expanded to
// the concrete interface addresses; loopback addresses come first.
func (h *Host) Addrs() []string {
	addrs := slices.Clone(h.Host.Addrs())
	slices.SortStableFunc(addrs, func(a, b ma.Multiaddr) int {
		la, lb := manet.IsIPLoopback(a), manet.IsIPLoopback(b)
		switch {
		case la && !lb:
			return -1
		case lb && !la:
			return 1
		}
		return 0
	})
	full, err := peer.AddrInfoToP2pAddrs(&peer.AddrInfo{ID: h.ID(), Addrs: addrs})
	if err != nil { // only for an empty peer ID, which a running host never has
		return nil
	}
	out := make([]string, len(full))
	for i, a := range full {
		out[i] = a.String()
	}
	return out
}

// Connect dials addr, a full multiaddr ending in /p2p/<id>, keeps the
// address in the peerstore, and returns the peer's ID. Errors name addr.
func (h *Host) Connect(ctx context.Context, addr string) (peer.ID, error) {
	a, err := ma.NewMultiaddr(addr)
	if err != nil {
		return "", fmt.Errorf("p2p: connect %q: %w", addr, err)
	}
	info, err := peer.AddrInfoFromP2pAddr(a)
	if err != nil {
		return "", fmt.Errorf("p2p: connect %q: want a full address ending in /p2p/<id>: %w", addr, err)
	}
	if info.ID == h.ID() {
		return "", fmt.Errorf("p2p: connect %q: that is this host", addr)
	}
	h.Peerstore().AddAddrs(info.ID, info.Addrs, peerstore.PermanentAddrTTL)
	// A relayed connection counts: a peer behind a NAT may have no other.
	if err := h.Host.Connect(AllowRelayed(ctx, "connect"), *info); err != nil {
		return "", fmt.Errorf("p2p: connect %q: %w", addr, err)
	}
	return info.ID, nil
}

// Close stops mDNS, pubsub and the host. It is safe to call more than once;
// later calls return the first call's result.
func (h *Host) Close() error {
	h.closeOnce.Do(func() {
		h.dialMu.Lock()
		h.closing = true
		h.dialMu.Unlock()
		h.cancel()
		var errs []error
		if h.mdns != nil {
			errs = append(errs, h.mdns.Close())
		}
		if h.reach != nil {
			h.reach.close()
		}
		if h.relay != nil {
			errs = append(errs, h.relay.Close())
		}
		h.dials.Wait()
		errs = append(errs, h.Host.Close())
		if err := errors.Join(errs...); err != nil {
			h.closeErr = fmt.Errorf("p2p: close: %w", err)
		}
	})
	return h.closeErr
}

// mdnsNotifee connects to pipeswarm peers that mDNS finds.
type mdnsNotifee struct{ h *Host }

func (n mdnsNotifee) HandlePeerFound(info peer.AddrInfo) {
	h := n.h
	if info.ID == h.ID() || h.Network().Connectedness(info.ID) == network.Connected || h.penalties.Banned(info.ID) {
		return
	}
	h.dialMu.Lock()
	defer h.dialMu.Unlock()
	if h.closing {
		return
	}
	h.dials.Add(1)
	go func() {
		defer h.dials.Done()
		ctx, cancel := context.WithTimeout(h.ctx, mdnsDialTimeout)
		defer cancel()
		if err := h.Host.Connect(ctx, info); err != nil {
			h.log.Debug("mdns: connect failed", "peer", info.ID, "err", err)
			return
		}
		h.log.Info("mdns: connected", "peer", info.ID)
	}()
}

// gater refuses connections to and from peers while they are banned.
// Connections that are already open stay up; Handle resets their new streams.
type gater struct{ p *Penalties }

func (g gater) InterceptPeerDial(id peer.ID) bool                 { return !g.p.Banned(id) }
func (g gater) InterceptAddrDial(id peer.ID, _ ma.Multiaddr) bool { return !g.p.Banned(id) }
func (g gater) InterceptAccept(network.ConnMultiaddrs) bool       { return true }
func (g gater) InterceptSecured(_ network.Direction, id peer.ID, _ network.ConnMultiaddrs) bool {
	return !g.p.Banned(id)
}
func (g gater) InterceptUpgraded(network.Conn) (bool, control.DisconnectReason) { return true, 0 }
