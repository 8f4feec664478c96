package userspace

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// TestDualStack: the two halves of a dual-stack service port are two
// listeners, each on its own family's socket (an IPv6 socket of ours takes
// no IPv4), each sending to its own family's endpoints, over TCP and UDP.
// A UDP reply over IPv6 comes from the address the client sent to
// (IPV6_PKTINFO), or the connected client socket would not take it.
func TestDualStack(t *testing.T) {
	ls := newSet(t, Config{UDPTimeout: time.Minute})
	v6 := netip.MustParseAddr("fd00:96::10")
	loopback6 := netip.MustParseAddr("::1")
	tcp4, tcp6 := tcpPort(backend(t, named("v4"))), tcpPort(backendOn(t, loopback6, named("v6")))
	tcp6.ClusterIP = v6
	udp4, udp6 := udpPort(udpBackend(t, "v4")), udpPort(udpBackendOn(t, loopback6, "v6"))
	udp6.ClusterIP = v6
	bound, err := ls.Sync(snap(t, tcp4, tcp6, udp4, udp6), ls.RedirectBinds)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		port     service.Port
		loopback string
		want     string
	}{
		{tcp4, "127.0.0.1", "v4"}, {tcp6, "::1", "v6"}, {udp4, "127.0.0.1", "v4"}, {udp6, "::1", "v6"},
	} {
		addrs := bound[tt.port.Key()]
		if len(addrs) != 1 || addrs[0].Addr().Is6() != tt.port.ClusterIP.Is6() || !addrs[0].Addr().IsUnspecified() {
			t.Fatalf("%s bound %v; want one wildcard socket of its family", tt.port.Key(), addrs)
		}
		addr := net.JoinHostPort(tt.loopback, fmt.Sprint(addrs[0].Port()))
		if tt.port.Protocol == service.TCP {
			got, err := io.ReadAll(dialTCP(t, addr))
			if err != nil || string(got) != tt.want {
				t.Errorf("%s via %s: %q, %v; want %q", tt.port.Key(), addr, got, err, tt.want)
			}
			if tt.port.ClusterIP.Is6() {
				if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", addrs[0].Port()), time.Second); err == nil {
					c.Close()
					t.Errorf("the IPv6 socket of %s took an IPv4 connection", tt.port.Key())
				}
			}
			continue
		}
		if got := exchange(t, dialUDP(t, addr), make([]byte, 9000)); got != tt.want {
			t.Errorf("%s via %s answered by %q; want %q", tt.port.Key(), addr, got, tt.want)
		}
		// The session knows the address the client sent to, from the
		// control message: replies are sent from it.
		if local := sessionLocal(ls, tt.port.Key()); local != netip.MustParseAddr(tt.loopback) {
			t.Errorf("%s: the session's local address is %v; want %s", tt.port.Key(), local, tt.loopback)
		}
	}
}

// sessionLocal is the local address of one UDP session of k's listener.
func sessionLocal(ls *Listeners, k service.Key) netip.Addr {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	for _, sock := range ls.active[k].sockets {
		u := sock.(*udpSocket)
		u.mu.Lock()
		defer u.mu.Unlock()
		for _, s := range u.sessions {
			return s.local
		}
	}
	return netip.Addr{}
}
