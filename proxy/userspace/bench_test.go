package userspace

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// The benchmarks measure each path twice in one run: "direct" straight to
// the backend, and "proxy" through a listener of ours. Read them as the
// ratio proxy/direct (docs/performance.md); absolute numbers on a shared
// 2-core machine mean little.

// benchTarget returns the address to use for path "direct" or "proxy".
func benchTarget(b *testing.B, path string, p service.Port) string {
	b.Helper()
	if path == "direct" {
		return p.Endpoints[0].String()
	}
	ls, err := New(Config{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(ls.Close)
	s, err := service.NewSnapshot([]service.Port{p})
	if err != nil {
		b.Fatal(err)
	}
	bound, err := ls.Sync(s, ls.RedirectBinds)
	if err != nil {
		b.Fatal(err)
	}
	return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), bound[p.Key()][0].Port()).String()
}

// benchDial connects to path's address for p; the connection is closed when
// the benchmark ends.
func benchDial(b *testing.B, path string, p service.Port) net.Conn {
	b.Helper()
	network := "tcp"
	if p.Protocol == service.UDP {
		network = "udp"
	}
	c, err := net.Dial(network, benchTarget(b, path, p))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

// benchBackend is a TCP server on loopback that runs handle for each
// connection until the benchmark ends.
func benchBackend(b *testing.B, handle func(*net.TCPConn)) netip.AddrPort {
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// BenchmarkTCPBulk: one stream of bytes to a sink; bytes/s through splice.
func BenchmarkTCPBulk(b *testing.B) {
	sink := benchBackend(b, func(c *net.TCPConn) { io.Copy(io.Discard, c) })
	for _, path := range []string{"direct", "proxy"} {
		b.Run(path, func(b *testing.B) {
			c := benchDial(b, path, tcpPort(sink))
			buf := make([]byte, 256<<10)
			b.SetBytes(int64(len(buf)))
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkTCPRequestResponse: 64-byte ping-pong on one connection, like an
// HTTP keep-alive client; one op is one round trip.
func BenchmarkTCPRequestResponse(b *testing.B) {
	pong := benchBackend(b, func(c *net.TCPConn) {
		buf := make([]byte, 64)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	})
	for _, path := range []string{"direct", "proxy"} {
		b.Run(path, func(b *testing.B) {
			c := benchDial(b, path, tcpPort(pong))
			buf := make([]byte, 64)
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkTCPConnect: a new connection per request, answered and closed by
// the backend; one op is connect, read the answer, close.
func BenchmarkTCPConnect(b *testing.B) {
	hello := benchBackend(b, func(c *net.TCPConn) { io.WriteString(c, "hello") })
	for _, path := range []string{"direct", "proxy"} {
		b.Run(path, func(b *testing.B) {
			addr := benchTarget(b, path, tcpPort(hello))
			buf := make([]byte, 16)
			b.ResetTimer()
			for range b.N {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadAtLeast(c, buf, 5); err != nil {
					b.Fatal(err)
				}
				c.Close()
			}
		})
	}
}

// BenchmarkUDPRequestResponse: a 64-byte datagram and its echo; one op is
// one round trip within one session.
func BenchmarkUDPRequestResponse(b *testing.B) {
	echo := udpBenchEcho(b)
	for _, path := range []string{"direct", "proxy"} {
		b.Run(path, func(b *testing.B) {
			c := benchDial(b, path, udpPort(echo))
			buf := make([]byte, 64)
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
				if _, err := c.Read(buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkSyncNewPorts opens listeners for 1,000 new service ports per op:
// the listener share of a large first sync.
func BenchmarkSyncNewPorts(b *testing.B) {
	ports := make([]service.Port, 1000)
	for i := range ports {
		ports[i] = service.Port{Name: service.PortName{Namespace: "default", Name: fmt.Sprintf("s%d", i)}, Protocol: service.TCP,
			Endpoints: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:9")}}
	}
	s, err := service.NewSnapshot(ports)
	if err != nil {
		b.Fatal(err)
	}
	for range b.N {
		ls, err := New(Config{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := ls.Sync(s, ls.RedirectBinds); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		ls.Close()
		b.StartTimer()
	}
}
