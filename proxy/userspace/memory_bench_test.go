package userspace

import (
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"golang.org/x/net/ipv4"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// idleSessionsConfig holds sessions for the whole round.
func idleSessionsConfig() Config {
	return Config{UDPTimeout: time.Hour, UDPMaxSessions: idleSessions, UDPMaxSessionsPerPort: idleSessions}
}

// idleSessions is how many idle UDP sessions BenchmarkUDPIdleSessions holds.
const idleSessions = 10000

// BenchmarkUDPIdleSessions opens 10,000 UDP sessions, one datagram each,
// and reports what an idle session costs the proxy: Go heap and goroutine
// stacks, per session ("B/session"), besides its socket (kernel memory).
// Each op is one whole round: 10,000 sessions from 10,000 client
// addresses (one socket sending from 127.1.x.y with IP_PKTINFO).
func BenchmarkUDPIdleSessions(b *testing.B) {
	echo := udpBenchEcho(b)
	client, err := net.ListenUDP("udp4", &net.UDPAddr{})
	if err != nil {
		b.Fatal(err)
	}
	defer client.Close()
	pc := ipv4.NewPacketConn(client)
	var perSession float64
	for range b.N {
		ls, err := New(idleSessionsConfig())
		if err != nil {
			b.Fatal(err)
		}
		s, err := service.NewSnapshot([]service.Port{udpPort(echo)})
		if err != nil {
			b.Fatal(err)
		}
		bound, err := ls.Sync(s, ls.RedirectBinds)
		if err != nil {
			b.Fatal(err)
		}
		to := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(bound[udpPort().Key()][0].Port())}
		before := heapAndStacks()
		// In batches of 100, each sent again until all its sessions
		// exist: a datagram dropped by a full socket buffer is not an
		// error, only a session to make again.
		deadline := time.Now().Add(60 * time.Second)
		for batch := 0; batch < idleSessions; batch += 100 {
			for udpSessions(ls, udpPort().Key()) < batch+100 {
				if time.Now().After(deadline) {
					b.Fatalf("%d sessions made in 60s, want %d", udpSessions(ls, udpPort().Key()), idleSessions)
				}
				for i := batch; i < batch+100; i++ {
					src := net.IPv4(127, 1, byte(i>>8), byte(i))
					if _, err := pc.WriteTo([]byte("hello"), &ipv4.ControlMessage{Src: src}, to); err != nil {
						b.Fatal(err)
					}
				}
				time.Sleep(5 * time.Millisecond)
			}
		}
		perSession = float64(heapAndStacks()-before) / idleSessions
		ls.Close()
	}
	b.ReportMetric(perSession, "B/session")
}

// heapAndStacks is the Go heap and goroutine stack memory in use, after a
// garbage collection.
func heapAndStacks() int64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapInuse + m.StackInuse)
}

// udpBenchEcho is a UDP echo server on loopback for the benchmark's life.
func udpBenchEcho(b *testing.B) netip.AddrPort {
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			pc.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	return pc.LocalAddr().(*net.UDPAddr).AddrPort()
}
