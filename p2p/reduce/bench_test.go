package reduce

import (
	"context"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
)

// loopbackHosts starts R real libp2p hosts on TCP over 127.0.0.1, all
// connected to each other.
func loopbackHosts(b *testing.B, R int) []host.Host {
	hs := make([]host.Host, R)
	for i := range hs {
		h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.DisableRelay())
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { h.Close() })
		hs[i] = h
	}
	for i, a := range hs {
		for _, c := range hs[i+1:] {
			if err := a.Connect(context.Background(), peer.AddrInfo{ID: c.ID(), Addrs: c.Addrs()}); err != nil {
				b.Fatal(err)
			}
		}
	}
	return hs
}

// BenchmarkAllReduceLoopback runs rounds of 1.6M values between real
// hosts on loopback TCP and reports the bytes every member sends per
// second of round; the raw sub-benchmark moves one member's bytes over a
// plain libp2p stream between two of the same hosts, for comparison.
func BenchmarkAllReduceLoopback(b *testing.B) {
	const n = 1_600_000
	for _, R := range []int{2, 4} {
		for _, cs := range []string{"fp32", "int8/32"} {
			c := spec(b, cs)
			ys := randVecs(R, n, 1)
			_, _, sent := Reference(c, ys)
			b.Run(fmt.Sprintf("R%d/%s/reduce", R, cs), func(b *testing.B) {
				hs := loopbackHosts(b, R)
				ids := make([]peer.ID, R)
				for i, h := range hs {
					ids[i] = h.ID()
				}
				gs := make([]*Group, R)
				for i, h := range hs {
					svc := NewService(h, testLog(), nil)
					h.SetStreamHandler(Proto, svc.HandleStream)
					b.Cleanup(func() { svc.Close() })
					g, err := svc.Join(GroupConfig{Run: 1, Group: 1, Peers: ids, Self: i, Codec: c, MaxValues: n})
					if err != nil {
						b.Fatal(err)
					}
					gs[i] = g
				}
				ctx := context.Background()
				var bytes int64
				b.ResetTimer()
				for it := range b.N {
					errs := make(chan error, R)
					for i, g := range gs {
						go func() {
							res, err := g.AllReduce(ctx, uint64(it+1), ys[i], time.Minute)
							if err == nil && len(res.Missing) > 0 {
								err = fmt.Errorf("missing %v", res.Missing)
							}
							errs <- err
						}()
					}
					for range R {
						if err := <-errs; err != nil {
							b.Fatal(err)
						}
					}
					bytes += sent[0]
				}
				b.ReportMetric(float64(bytes)/b.Elapsed().Seconds(), "B/s/member")
				b.ReportMetric(float64(sent[0]), "B/member/round")
			})
			b.Run(fmt.Sprintf("R%d/%s/raw", R, cs), func(b *testing.B) {
				hs := loopbackHosts(b, 2)
				hs[1].SetStreamHandler("/bench/raw", func(st network.Stream) {
					io.Copy(io.Discard, st)
					st.Write([]byte{1})
					st.Close()
				})
				buf := make([]byte, 256<<10)
				b.ResetTimer()
				for range b.N {
					st, err := hs[0].NewStream(context.Background(), hs[1].ID(), "/bench/raw")
					if err != nil {
						b.Fatal(err)
					}
					for left := sent[0]; left > 0; left -= int64(len(buf)) {
						if _, err := st.Write(buf[:min(left, int64(len(buf)))]); err != nil {
							b.Fatal(err)
						}
					}
					st.CloseWrite()
					if _, err := io.ReadFull(st, make([]byte, 1)); err != nil {
						b.Fatal(err)
					}
					st.Close()
				}
				b.ReportMetric(float64(sent[0]*int64(b.N))/b.Elapsed().Seconds(), "B/s/member")
			})
		}
	}
}
