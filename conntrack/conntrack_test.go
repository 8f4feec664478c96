package conntrack

import (
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/netnstest"
)

func run(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%v: %v: %s", args, err, out)
	}
}

// listener is a UDP socket on 127.0.0.1 that receives into a channel.
func listener(t *testing.T) (uint16, <-chan struct{}) {
	t.Helper()
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	got := make(chan struct{}, 16)
	go func() {
		buf := make([]byte, 100)
		for {
			if _, _, err := pc.ReadFrom(buf); err != nil {
				return
			}
			got <- struct{}{}
		}
	}()
	return uint16(pc.LocalAddr().(*net.UDPAddr).Port), got
}

// flows lists the UDP entries of the namespace as "dst:port->replySrcPort".
func flows(t *testing.T) map[string]bool {
	t.Helper()
	list, err := netlink.ConntrackTableList(netlink.ConntrackTable, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, f := range list {
		if f.Forward.Protocol == 17 {
			out[f.Forward.DstIP.String()+":"+strconv.Itoa(int(f.Forward.DstPort))+"->"+strconv.Itoa(int(f.Reverse.SrcPort))] = true
		}
	}
	return out
}

// TestClearStale, with the real kernel in a namespace of its own: UDP
// flows that rules of ours redirected are deleted once they lead elsewhere
// than the rules now say (a changed listener port, a removed mapping), and
// flows that still match are kept.
func TestClearStale(t *testing.T) {
	netnstest.Run(t, func() {
		run(t, "ip", "route", "add", "10.96.0.0/16", "dev", "lo")
		a, gotA := listener(t)
		b, gotB := listener(t)
		for _, r := range []struct {
			ip string
			to uint16
		}{{"10.96.0.10", a}, {"10.96.0.20", b}} {
			run(t, "iptables", "-t", "nat", "-A", "OUTPUT", "-d", r.ip, "-p", "udp", "--dport", "53", "-j", "REDIRECT", "--to-ports", strconv.Itoa(int(r.to)))
		}
		// Two clients, each keeping one socket, as a resolver does.
		for _, c := range []struct {
			ip  string
			got <-chan struct{}
		}{{"10.96.0.10:53", gotA}, {"10.96.0.20:53", gotB}} {
			conn, err := net.Dial("udp", c.ip)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.Write([]byte("x"))
			select {
			case <-c.got:
			case <-time.After(2 * time.Second):
				t.Fatalf("no datagram reached the listener of %s", c.ip)
			}
		}
		flowA := "10.96.0.10:53->" + strconv.Itoa(int(a))
		flowB := "10.96.0.20:53->" + strconv.Itoa(int(b))
		if f := flows(t); !f[flowA] || !f[flowB] {
			t.Fatalf("conntrack has %v; want %s and %s", f, flowA, flowB)
		}

		// 10.96.0.10:53 now leads to another listener; 10.96.0.20 is as
		// it was.
		current := []Mapping{
			{IP: netip.MustParseAddr("10.96.0.10"), Port: 53, Listener: a + 1},
			{IP: netip.MustParseAddr("10.96.0.20"), Port: 53, Listener: b},
		}
		if n, err := ClearStale(false, current, nil); err != nil || n != 1 {
			t.Errorf("ClearStale after a listener change deleted %d, %v; want 1", n, err)
		}
		if f := flows(t); f[flowA] || !f[flowB] {
			t.Errorf("after a listener change conntrack has %v; want %s gone, %s kept", f, flowA, flowB)
		}
		// 10.96.0.20:53 is removed.
		removed := current[1:]
		if n, err := ClearStale(false, current[:1], removed); err != nil || n != 1 {
			t.Errorf("ClearStale after a removal deleted %d, %v; want 1", n, err)
		}
		if f := flows(t); f[flowB] {
			t.Errorf("after the removal conntrack still has %s: %v", flowB, f)
		}

		// A NodePort flow (any local address), then its listener changes.
		run(t, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "30053", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "REDIRECT", "--to-ports", strconv.Itoa(int(a)))
		conn, err := net.Dial("udp", "127.0.0.1:30053")
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.Write([]byte("x"))
		select {
		case <-gotA:
		case <-time.After(2 * time.Second):
			t.Fatal("no datagram reached the NodePort's listener")
		}
		flowN := "127.0.0.1:30053->" + strconv.Itoa(int(a))
		nodePort := []Mapping{{Port: 30053, Listener: a}}
		if n, err := ClearStale(false, nodePort, nil); err != nil || n != 0 || !flows(t)[flowN] {
			t.Errorf("ClearStale with the NodePort unchanged deleted %d, %v; want 0 and %s kept", n, err, flowN)
		}
		nodePort[0].Listener = a + 1
		if n, err := ClearStale(false, nodePort, nil); err != nil || n != 1 || flows(t)[flowN] {
			t.Errorf("ClearStale after the NodePort's listener changed deleted %d, %v; want 1 and %s gone", n, err, flowN)
		}
	})
}

// TestClearStaleNodePortBeforeItsRule: a UDP client that began sending to
// a NodePort of the node before the rule existed (its datagrams refused:
// nothing listened) has its flow cleared once the rule is there, so its
// next datagram is redirected. The same port on an address that is not
// the node's is left alone.
func TestClearStaleNodePortBeforeItsRule(t *testing.T) {
	netnstest.Run(t, func() {
		run(t, "ip", "route", "add", "10.96.0.0/16", "dev", "lo")
		// The nat table is in use, as on any node: conntrack tracks.
		run(t, "iptables", "-t", "nat", "-A", "POSTROUTING", "-d", "192.0.2.0/24", "-j", "MASQUERADE")
		a, gotA := listener(t)
		send := func(to string) net.Conn {
			conn, err := net.Dial("udp", to)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { conn.Close() })
			conn.Write([]byte("x"))
			return conn
		}
		early := send("127.0.0.1:30055")
		send("10.96.0.99:30055") // not an address of the node
		before := flows(t)
		if !before["127.0.0.1:30055->30055"] || !before["10.96.0.99:30055->30055"] {
			t.Fatalf("conntrack has %v; want both flows, un-NATed", before)
		}
		run(t, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "30055", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "REDIRECT", "--to-ports", strconv.Itoa(int(a)))
		if n, err := ClearStale(false, []Mapping{{Port: 30055, Listener: a}}, nil); err != nil || n != 1 {
			t.Fatalf("ClearStale deleted %d, %v; want 1 (the local flow)", n, err)
		}
		if f := flows(t); f["127.0.0.1:30055->30055"] || !f["10.96.0.99:30055->30055"] {
			t.Errorf("after the clear conntrack has %v; want the local flow gone, the other kept", f)
		}
		// The first write may only report the refusal of the first
		// datagram (ECONNREFUSED, nothing sent); a resolver sends again.
		deadline := time.After(5 * time.Second)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for done := false; !done; {
			early.Write([]byte("x"))
			select {
			case <-gotA:
				done = true
			case <-tick.C:
			case <-deadline:
				t.Fatal("the early client's next datagrams did not reach the NodePort's listener")
			}
		}
	})
}

// TestClearStaleConnectingTCP: a connect whose first SYN left before our
// rule existed completes on its next retransmit once the entry is cleared;
// an established connection is never cleared.
func TestClearStaleConnectingTCP(t *testing.T) {
	netnstest.Run(t, func() {
		// Service IPs are routed to a neighbour that never answers, and
		// the nat table is in use, as on any node.
		run(t, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
		run(t, "ip", "addr", "add", "10.1.0.1/24", "dev", "v0")
		run(t, "ip", "link", "set", "v0", "up")
		run(t, "ip", "link", "set", "v1", "up")
		run(t, "ip", "neigh", "add", "10.1.0.2", "lladdr", "02:00:00:00:00:02", "dev", "v0")
		run(t, "ip", "route", "add", "10.96.0.0/16", "via", "10.1.0.2")
		run(t, "iptables", "-t", "nat", "-A", "POSTROUTING", "-d", "192.0.2.0/24", "-j", "MASQUERADE")
		ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		listener := uint16(ln.Addr().(*net.TCPAddr).Port)

		// The SYN leaves before any rule; nothing answers it. The socket
		// is made here, on the namespace's thread (a goroutine could run
		// on a thread of the machine's namespace), and does not block.
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		if err := unix.Connect(fd, &unix.SockaddrInet4{Port: 80, Addr: [4]byte{10, 96, 0, 30}}); err != unix.EINPROGRESS {
			t.Fatalf("connect: %v; want EINPROGRESS", err)
		}
		time.Sleep(300 * time.Millisecond)
		run(t, "iptables", "-t", "nat", "-A", "OUTPUT", "-d", "10.96.0.30", "-p", "tcp", "--dport", "80", "-j", "REDIRECT", "--to-ports", strconv.Itoa(int(listener)))
		current := []Mapping{{TCP: true, IP: netip.MustParseAddr("10.96.0.30"), Port: 80, Listener: listener}}
		if n, err := ClearStale(false, current, nil); err != nil || n != 1 {
			t.Fatalf("ClearStale with a SYN in flight deleted %d, %v; want 1", n, err)
		}
		// The retransmit (1s after the first SYN) is redirected now.
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		if n, err := unix.Poll(fds, 5000); err != nil || n != 1 {
			t.Fatalf("the connect did not complete within 5s of the clear: %v", err)
		}
		if soErr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); err != nil || soErr != 0 {
			t.Fatalf("the connect failed: %v, %v", unix.Errno(soErr), err)
		}

		// An established connection to the ClusterIP, then a rule change
		// that points elsewhere: the connection's entry stays.
		current[0].Listener = listener + 1
		if n, err := ClearStale(false, current, nil); err != nil || n != 0 {
			t.Errorf("ClearStale with an established connection deleted %d, %v; want 0", n, err)
		}
	})
}
