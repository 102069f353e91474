package p2p

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/host/eventbus"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	"github.com/libp2p/go-libp2p/p2p/protocol/autonatv2"
	relayv2 "github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/relay"
	"github.com/libp2p/go-libp2p/p2p/security/noise"
	tls "github.com/libp2p/go-libp2p/p2p/security/tls"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// RelayLimits bound what a circuit relay carries for others. go-libp2p's
// defaults (2 minutes and 128 KiB per relayed connection) cut a training run
// off within its first steps; these default to hours and GiBs.
type RelayLimits struct {
	Duration        time.Duration // how long one relayed connection may last
	Data            int64         // bytes relayed each way on one connection
	MaxReservations int           // peers holding a slot at once
	MaxCircuits     int           // relayed connections open per peer
}

// DefaultRelayLimits lets a relayed connection carry a long run: 24 hours and
// 64 GiB each way.
func DefaultRelayLimits() RelayLimits {
	return RelayLimits{Duration: 24 * time.Hour, Data: 64 << 30, MaxReservations: 128, MaxCircuits: 16}
}

func (l RelayLimits) validate() error {
	switch {
	case l.Duration <= 0:
		return fmt.Errorf("%w: RelayService.Duration: %v, want > 0", ErrBadOptions, l.Duration)
	case l.Data <= 0:
		return fmt.Errorf("%w: RelayService.Data: %d, want > 0", ErrBadOptions, l.Data)
	case l.MaxReservations <= 0:
		return fmt.Errorf("%w: RelayService.MaxReservations: %d, want > 0", ErrBadOptions, l.MaxReservations)
	case l.MaxCircuits <= 0:
		return fmt.Errorf("%w: RelayService.MaxCircuits: %d, want > 0", ErrBadOptions, l.MaxCircuits)
	}
	return nil
}

// startRelay makes h a circuit relay v2 with limits l. It runs whatever
// AutoNAT says: an operator who sets relay: true has a public address.
func startRelay(h host.Host, l RelayLimits) (*relayv2.Relay, error) {
	res := relayv2.DefaultResources()
	res.Limit = &relayv2.RelayLimit{Duration: l.Duration, Data: l.Data}
	res.MaxReservations = l.MaxReservations
	res.MaxCircuits = l.MaxCircuits
	res.BufferSize = 32 << 10 // the default 2 KiB is a syscall per 2 KiB of tensor
	r, err := relayv2.New(h, relayv2.WithResources(res))
	if err != nil {
		return nil, fmt.Errorf("p2p: relay service: %w", err)
	}
	return r, nil
}

// CheckAnnounce reports what is wrong with s as an address to announce.
func CheckAnnounce(s string) error {
	a, err := ma.NewMultiaddr(s)
	if err != nil {
		return err
	}
	if !announceable(a) {
		return fmt.Errorf("%q: want /ip4|ip6|dns4|dns6/HOST/tcp/PORT or .../udp/PORT/quic-v1, without /p2p", s)
	}
	return nil
}

// announceable reports whether a is an address peers can be told to dial:
// IP or DNS name, then TCP or QUIC-v1, no /p2p.
func announceable(a ma.Multiaddr) bool {
	if len(a) < 2 {
		return false
	}
	switch a[0].Code() {
	case ma.P_IP4, ma.P_IP6, ma.P_DNS, ma.P_DNS4, ma.P_DNS6:
	default:
		return false
	}
	var codes []int
	for _, c := range a[1:] {
		codes = append(codes, c.Code())
	}
	return slices.Equal(codes, []int{ma.P_TCP}) || slices.Equal(codes, []int{ma.P_UDP, ma.P_QUIC_V1})
}

// relaySource hands autorelay the configured relays; ones that turn out not
// to serve circuit v2 are dropped by autorelay after identify.
func relaySource(relays []peer.AddrInfo) func(context.Context, int) <-chan peer.AddrInfo {
	return func(ctx context.Context, n int) <-chan peer.AddrInfo {
		c := make(chan peer.AddrInfo, len(relays))
		for _, r := range relays[:min(n, len(relays))] {
			c <- r
		}
		close(c)
		return c
	}
}

// Reachability reports the host's reachability as last determined. Without
// HostOptions.Reachability it stays unknown.
func (h *Host) Reachability() Reachability {
	if h.reach == nil {
		return Reachability{State: ReachUnknown, Addrs: []string{}, Reason: "reachability checks are off"}
	}
	h.reach.mu.Lock()
	defer h.reach.mu.Unlock()
	return h.reach.cur
}

// WatchReachability returns a channel that gets the current Reachability and
// then every change, until ctx ends or the host closes. A slow reader misses
// intermediate values, never the latest one.
func (h *Host) WatchReachability(ctx context.Context) <-chan Reachability {
	out := make(chan Reachability, 1)
	if h.reach == nil {
		out <- h.Reachability()
		close(out)
		return out
	}
	r := h.reach
	in := make(chan Reachability, 1)
	r.mu.Lock()
	in <- r.cur
	r.subs = append(r.subs, in)
	r.mu.Unlock()
	go func() {
		defer close(out)
		defer func() {
			r.mu.Lock()
			r.subs = slices.DeleteFunc(r.subs, func(c chan Reachability) bool { return c == in })
			r.mu.Unlock()
		}()
		for {
			select {
			case v := <-in:
				select {
				case <-out: // replace an unread older value
				default:
				}
				out <- v
			case <-ctx.Done():
				return
			case <-r.done:
				return
			}
		}
	}()
	return out
}

// reacher keeps Host.Reachability current. One goroutine (run) owns the
// observations; it gathers them from identify, the network and autorelay,
// asks AutoNAT v2 servers to dial candidate addresses back, and turns it all
// into a Reachability with Assess.
type reacher struct {
	h        host.Host
	log      *slog.Logger
	an       *autonatv2.AutoNAT
	dialer   host.Host // the AutoNAT v2 server's dial-back host
	announce []string
	relays   bool
	private  bool // count private addresses as candidates (tests on loopback)
	random   bool // listening on port 0: the ports change at every start
	emit     event.Emitter

	mu   sync.Mutex
	cur  Reachability
	subs []chan Reachability

	cancel context.CancelFunc
	done   chan struct{}
}

const (
	// reachTick is how often the reacher looks at the host's addresses again.
	reachTick = 2 * time.Second
	// recheck is how long an AutoNAT v2 verdict stands.
	recheck = 10 * time.Minute
	// checkTimeout bounds one AutoNAT v2 request.
	checkTimeout = 30 * time.Second
)

// newReacher starts AutoNAT v2 (client and server) on h and the goroutine that
// assesses reachability. transports are the host's (nil: TCP and QUIC).
func newReacher(h host.Host, o HostOptions, transports []libp2p.Option, log *slog.Logger) (*reacher, error) {
	key, err := GenerateKey()
	if err != nil {
		return nil, err
	}
	// The server dials back from a host of its own, so that a dial-back that
	// works proves the address reachable, not an existing connection.
	dialer, err := libp2p.New(append(slices.Clone(transports),
		libp2p.Identity(key),
		libp2p.NoListenAddrs,
		libp2p.Security(noise.ID, noise.New),
		libp2p.Security(tls.ID, tls.New),
		libp2p.Muxer(yamux.ID, yamux.DefaultTransport),
		libp2p.DisableRelay(),
		libp2p.DisableMetrics(),
		libp2p.DisableIdentifyAddressDiscovery(),
	)...)
	if err != nil {
		return nil, fmt.Errorf("p2p: autonat v2 dialer: %w", err)
	}
	var anOpts []autonatv2.AutoNATOption
	if o.reachPrivate {
		anOpts = append(anOpts, autonatv2.AllowPrivateAddrs)
	}
	an, err := autonatv2.New(dialer, anOpts...)
	if err != nil {
		dialer.Close()
		return nil, fmt.Errorf("p2p: autonat v2: %w", err)
	}
	if err := an.Start(h); err != nil {
		dialer.Close()
		return nil, fmt.Errorf("p2p: autonat v2: %w", err)
	}
	emit, err := h.EventBus().Emitter(new(event.EvtLocalReachabilityChanged), eventbus.Stateful)
	if err != nil {
		an.Close()
		dialer.Close()
		return nil, fmt.Errorf("p2p: reachability emitter: %w", err)
	}
	r := &reacher{h: h, log: log, an: an, dialer: dialer, emit: emit, private: o.reachPrivate, random: randomPorts(o.Listen) && !o.PortsKept,
		relays: len(o.Relays) > 0, announce: slices.Clone(o.Announce), done: make(chan struct{})}
	sub, err := h.EventBus().Subscribe([]any{new(event.EvtPeerIdentificationCompleted), new(event.EvtAutoRelayAddrsUpdated)}, eventbus.Name("pipeswarm reachability"))
	if err != nil {
		r.closeParts()
		return nil, fmt.Errorf("p2p: reachability events: %w", err)
	}
	// The first assessment needs no peer: a host with only private addresses
	// knows at once that nobody outside can dial it.
	st := newReachState()
	r.publish(r.assess(st))
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go r.run(ctx, sub, st)
	return r, nil
}

func (r *reacher) closeParts() {
	r.emit.Close()
	r.an.Close()
	r.dialer.Close()
}

// close stops the goroutine and AutoNAT v2.
func (r *reacher) close() {
	r.cancel()
	<-r.done
	r.closeParts()
}

// reachState is what run owns.
type reachState struct {
	obs       map[string]observation // by connection ID
	checked   map[string]bool
	checkedAt map[string]time.Time
	errs      map[string]string
	relayed   []string
	checking  bool
	retryAt   time.Time // no server to ask: wait until then
}

type observation struct{ local, external, observer string }

func newReachState() *reachState {
	return &reachState{obs: map[string]observation{}, checked: map[string]bool{}, checkedAt: map[string]time.Time{}, errs: map[string]string{}}
}

type checkResult struct {
	asked []string
	res   autonatv2.Result
	err   error
}

func (r *reacher) run(ctx context.Context, sub event.Subscription, st *reachState) {
	defer close(r.done)
	defer sub.Close()
	gone := make(chan string, 64)
	notifee := &network.NotifyBundle{DisconnectedF: func(_ network.Network, c network.Conn) {
		select {
		case gone <- c.ID():
		case <-ctx.Done():
		}
	}}
	r.h.Network().Notify(notifee)
	defer r.h.Network().StopNotify(notifee)
	results := make(chan checkResult, 1)
	tick := time.NewTicker(reachTick)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			if st.checking {
				<-results
			}
			return
		case e := <-sub.Out():
			switch e := e.(type) {
			case event.EvtPeerIdentificationCompleted:
				if ob, ok := observe(e); ok {
					st.obs[e.Conn.ID()] = ob
				}
			case event.EvtAutoRelayAddrsUpdated:
				st.relayed = st.relayed[:0]
				for _, a := range e.RelayAddrs {
					st.relayed = append(st.relayed, a.Encapsulate(ma.StringCast("/p2p/"+r.h.ID().String())).String())
				}
				r.log.Info("relay reservations", "addrs", st.relayed)
			}
		case id := <-gone:
			delete(st.obs, id)
		case res := <-results:
			st.checking = false
			r.record(st, res)
		case <-tick.C:
		}
		cur := r.assess(st)
		r.publish(cur)
		if !st.checking && time.Now().After(st.retryAt) {
			if ask := r.toCheck(st); len(ask) > 0 {
				st.checking = true
				go func() { results <- r.check(ctx, ask) }()
			}
		}
	}
}

// observe turns an identify result into an observation, if it is one: on a
// direct connection, of a TCP or QUIC address that is not loopback.
func observe(e event.EvtPeerIdentificationCompleted) (observation, bool) {
	if e.Conn == nil || e.ObservedAddr == nil || isRelayed(e.Conn) || manet.IsIPLoopback(e.ObservedAddr) {
		return observation{}, false
	}
	ext, ok := thinWaist(e.ObservedAddr)
	if !ok {
		return observation{}, false
	}
	local, ok := thinWaist(e.Conn.LocalMultiaddr())
	if !ok {
		return observation{}, false
	}
	ip, err := manet.ToIP(e.Conn.RemoteMultiaddr())
	if err != nil {
		return observation{}, false
	}
	return observation{local: local, external: ext, observer: ip.String()}, true
}

// thinWaist cuts a to /ip/X/tcp/N or /ip/X/udp/N/quic-v1.
func thinWaist(a ma.Multiaddr) (string, bool) {
	if len(a) < 2 || (a[0].Code() != ma.P_IP4 && a[0].Code() != ma.P_IP6) {
		return "", false
	}
	switch {
	case a[1].Code() == ma.P_TCP:
		return a[:2].String(), true
	case a[1].Code() == ma.P_UDP && len(a) >= 3 && a[2].Code() == ma.P_QUIC_V1:
		return a[:3].String(), true
	}
	return "", false
}

func isRelayed(c network.Conn) bool {
	_, err := c.RemoteMultiaddr().ValueForProtocol(ma.P_CIRCUIT)
	return err == nil
}

// randomPorts reports whether any listen address asks for port 0 (any free port).
func randomPorts(listen []string) bool {
	if listen == nil {
		listen = DefaultListen
	}
	for _, s := range listen {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			continue
		}
		for _, p := range []int{ma.P_TCP, ma.P_UDP} {
			if v, err := a.ValueForProtocol(p); err == nil && v == "0" {
				return true
			}
		}
	}
	return false
}

// observations gathers what the host knows now.
func (r *reacher) observations(st *reachState) Observations {
	o := Observations{Announced: r.announce, Relayed: slices.Clone(st.relayed), Relays: r.relays,
		Checked: st.checked, Errors: st.errs, AllowPrivate: r.private, RandomPorts: r.random}
	ifaces, _ := r.h.Network().InterfaceListenAddresses()
	for _, a := range ifaces {
		o.Listen = append(o.Listen, a.String())
	}
	if all, ok := r.h.(interface{ AllAddrs() []ma.Multiaddr }); ok {
		for _, a := range all.AllAddrs() {
			if s := a.String(); manet.IsPublicAddr(a) && !slices.Contains(o.Listen, s) {
				o.Found = append(o.Found, s)
			}
		}
	}
	type pair struct{ local, external string }
	seen := map[pair]map[string]bool{}
	var order []pair
	for _, ob := range st.obs {
		p := pair{ob.local, ob.external}
		if seen[p] == nil {
			seen[p] = map[string]bool{}
			order = append(order, p)
		}
		seen[p][ob.observer] = true
	}
	slices.SortFunc(order, func(a, b pair) int {
		if a.local != b.local {
			return compareStrings(a.local, b.local)
		}
		return compareStrings(a.external, b.external)
	})
	for _, p := range order {
		o.Observed = append(o.Observed, Observed{Local: p.local, External: p.external, Observers: len(seen[p])})
	}
	return o
}

func compareStrings(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func (r *reacher) assess(st *reachState) Reachability { return Assess(r.observations(st)) }

// toCheck lists the candidates with no verdict, or one older than recheck.
func (r *reacher) toCheck(st *reachState) []string {
	var out []string
	for _, a := range candidates(r.observations(st)) {
		if at, ok := st.checkedAt[a]; !ok || time.Since(at) > recheck {
			out = append(out, a)
		}
	}
	return out
}

// check asks one AutoNAT v2 server to dial one of addrs back.
func (r *reacher) check(ctx context.Context, addrs []string) checkResult {
	var reqs []autonatv2.Request
	for _, s := range addrs {
		if a, err := ma.NewMultiaddr(s); err == nil {
			reqs = append(reqs, autonatv2.Request{Addr: a, SendDialData: true})
		}
	}
	ctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	res, err := r.an.GetReachability(ctx, reqs)
	return checkResult{asked: addrs, res: res, err: err}
}

func (r *reacher) record(st *reachState, c checkResult) {
	switch {
	case errors.Is(c.err, autonatv2.ErrNoPeers):
		st.retryAt = time.Now().Add(reachTick)
		for _, a := range c.asked {
			st.errs[a] = "no AutoNAT v2 server connected"
		}
		return
	case c.err != nil:
		r.log.Debug("reachability check failed", "addrs", c.asked, "err", c.err)
		st.retryAt = time.Now().Add(reachTick)
		for _, a := range c.asked {
			st.errs[a] = c.err.Error()
		}
		return
	case c.res.AllAddrsRefused || c.res.Addr == nil:
		// The server would dial none of them (a transport it lacks): try
		// another server later rather than call them unreachable.
		st.retryAt = time.Now().Add(reachTick)
		return
	}
	a := c.res.Addr.String()
	switch c.res.Reachability {
	case network.ReachabilityPublic:
		st.checked[a] = true
	case network.ReachabilityPrivate:
		st.checked[a] = false
	default:
		return
	}
	st.checkedAt[a] = time.Now()
	delete(st.errs, a)
	r.log.Info("reachability checked", "addr", a, "reachable", st.checked[a])
}

// publish stores cur, tells the watchers and libp2p if it changed.
func (r *reacher) publish(cur Reachability) {
	r.mu.Lock()
	prev := r.cur
	if prev.State != "" && prev.Equal(cur) {
		r.mu.Unlock()
		return
	}
	r.cur = cur
	for _, c := range r.subs {
		select {
		case <-c:
		default:
		}
		c <- cur
	}
	r.mu.Unlock()
	// Autorelay reserves, and the host advertises relay addresses, while
	// libp2p believes the host private: anything short of a confirmed public
	// address is private to it. (AutoNAT v1 never contradicts this: no
	// pipeswarm peer runs its service.)
	if prev.State == "" || (prev.State == ReachPublic) != (cur.State == ReachPublic) {
		lr := network.ReachabilityPrivate
		if cur.State == ReachPublic {
			lr = network.ReachabilityPublic
		}
		if err := r.emit.Emit(event.EvtLocalReachabilityChanged{Reachability: lr}); err != nil {
			r.log.Warn("reachability event not emitted", "err", err)
		}
	}
	r.log.Info("reachability", "state", cur.State, "reason", cur.Reason, "addrs", cur.Addrs, "relayed", cur.Relayed)
}
