package simlink

import (
	"context"
	"fmt"
	"net"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/network"
	quictransport "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/quicreuse"
	"github.com/quic-go/quic-go"
	"go.uber.org/fx"
)

// transports is the libp2p QUIC transport with its UDP sockets on nd's
// endpoints. quicOver builds the QUIC connection manager as libp2p's default
// does (inbound connections are charged to the resource manager), with
// two hooks: listening opens nd's endpoint, and the source address for
// dialing is nd's address, so dials reuse the listening endpoint.
func (n *Network) transports(nd *node) []libp2p.Option {
	return quicOver(net.IP(nd.ip.AsSlice()), func(addr *net.UDPAddr) (net.PacketConn, error) {
		return n.listen(nd, addr)
	})
}

// quicOver is the QUIC transport with sockets from listen, dialing from
// source.
func quicOver(source net.IP, listen func(*net.UDPAddr) (net.PacketConn, error)) []libp2p.Option {
	newConnManager := func(key quic.StatelessResetKey, tokens quic.TokenGeneratorKey, rcmgr network.ResourceManager, lc fx.Lifecycle) (*quicreuse.ConnManager, error) {
		cm, err := quicreuse.NewConnManager(key, tokens,
			quicreuse.ConnContext(func(ctx context.Context, info *quic.ClientInfo) (context.Context, error) {
				addr, err := quicreuse.ToQuicMultiaddr(info.RemoteAddr, quic.Version1)
				if err != nil {
					addr = nil // let the resource manager decide
				}
				scope, err := rcmgr.OpenConnection(network.DirInbound, false, addr)
				if err != nil {
					return ctx, err
				}
				ctx = network.WithConnManagementScope(ctx, scope)
				context.AfterFunc(ctx, scope.Done)
				return ctx, nil
			}),
			quicreuse.VerifySourceAddress(rcmgr.VerifySourceAddress),
			quicreuse.OverrideSourceIPSelector(func() (quicreuse.SourceIPSelector, error) {
				return sourceIP{source}, nil
			}),
			quicreuse.OverrideListenUDP(func(_ string, addr *net.UDPAddr) (net.PacketConn, error) {
				return listen(addr)
			}),
		)
		if err != nil {
			return nil, fmt.Errorf("simlink: %v: quic conn manager: %w", source, err)
		}
		lc.Append(fx.StopHook(cm.Close))
		return cm, nil
	}
	return []libp2p.Option{
		libp2p.Transport(quictransport.NewTransport),
		libp2p.QUICReuse(newConnManager),
	}
}

// sourceIP says every destination is reached from the node's address.
type sourceIP struct{ ip net.IP }

func (s sourceIP) PreferredSourceIPForDestination(*net.UDPAddr) (net.IP, error) { return s.ip, nil }
