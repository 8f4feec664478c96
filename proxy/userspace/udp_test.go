package userspace

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

var dns = service.PortName{Namespace: "default", Name: "dns", Port: "dns"}

func udpPort(eps ...netip.AddrPort) service.Port {
	return service.Port{Name: dns, Protocol: service.UDP, ClusterIP: netip.MustParseAddr("10.96.0.10"), Port: 53, Endpoints: eps}
}

// udpBackend answers every datagram with name, a newline and the datagram,
// on 127.0.0.1.
func udpBackend(t *testing.T, name string) netip.AddrPort {
	t.Helper()
	return udpBackendOn(t, netip.MustParseAddr("127.0.0.1"), name)
}

// udpBackendOn is udpBackend on loopback address ip.
func udpBackendOn(t *testing.T, ip netip.Addr, name string) netip.AddrPort {
	t.Helper()
	pc, err := net.ListenUDP(network("udp", ip), net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, 0)))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		pc.Close()
		wg.Wait()
	})
	wg.Go(func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(append([]byte(name+"\n"), buf[:n]...), from)
		}
	})
	return pc.LocalAddr().(*net.UDPAddr).AddrPort()
}

// exchange sends payload from c and returns who answered, checking that the
// payload came back intact.
func exchange(t *testing.T, c net.Conn, payload []byte) string {
	t.Helper()
	if _, err := c.Write(payload); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 70000)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("no reply to a %d-byte datagram: %v", len(payload), err)
	}
	name, rest, _ := bytes.Cut(buf[:n], []byte("\n"))
	if !bytes.Equal(rest, payload) {
		t.Fatalf("reply carried %d bytes back, want the %d sent", len(rest), len(payload))
	}
	return string(name)
}

func dialUDP(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// udpSessions counts the sessions of every socket of k's listener.
func udpSessions(ls *Listeners, k service.Key) int {
	ls.mu.Lock()
	var socks []socket
	for _, sock := range ls.active[k].sockets {
		socks = append(socks, sock)
	}
	ls.mu.Unlock()
	n := 0
	for _, sock := range socks {
		n += sock.(*udpSocket).Sessions()
	}
	return n
}

// waitSessions waits up to 5s for the session count to become want.
func waitSessions(t *testing.T, ls *Listeners, k service.Key, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for udpSessions(ls, k) != want && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := udpSessions(ls, k); got != want {
		t.Fatalf("UDP sessions = %d, want %d", got, want)
	}
}

// TestUDPLargeDatagrams: datagrams far over upstream's 4 KiB buffer arrive
// whole (kubernetes#47659).
func TestUDPLargeDatagrams(t *testing.T) {
	ls := newSet(t, Config{})
	addr := listen(t, ls, snap(t, udpPort(udpBackend(t, "a"))), udpPort().Key())
	c := dialUDP(t, addr)
	for _, size := range []int{1, 4097, 9000, 65000} {
		if got := exchange(t, c, bytes.Repeat([]byte{'x'}, size)); got != "a" {
			t.Errorf("%d bytes answered by %q", size, got)
		}
	}
}

func TestUDPSessionPerClient(t *testing.T) {
	ls := newSet(t, Config{UDPTimeout: time.Minute})
	addr := listen(t, ls, snap(t, udpPort(udpBackend(t, "a"), udpBackend(t, "b"))), udpPort().Key())
	c1, c2 := dialUDP(t, addr), dialUDP(t, addr)
	first1, first2 := exchange(t, c1, []byte("one")), exchange(t, c2, []byte("two"))
	if first1 == first2 {
		t.Errorf("two clients were both sent to %q; round robin should split them", first1)
	}
	for range 3 { // each client stays on its session's endpoint
		if got := exchange(t, c1, []byte("one")); got != first1 {
			t.Errorf("client 1 moved from %q to %q within its session", first1, got)
		}
		if got := exchange(t, c2, []byte("two")); got != first2 {
			t.Errorf("client 2 moved from %q to %q within its session", first2, got)
		}
	}
	if got := udpSessions(ls, udpPort().Key()); got != 2 {
		t.Errorf("UDP sessions = %d, want 2", got)
	}
}

func TestUDPSessionIdleTimeout(t *testing.T) {
	m, _ := NewMetrics(nil)
	ls := newSet(t, Config{UDPTimeout: 150 * time.Millisecond, Metrics: m})
	addr := listen(t, ls, snap(t, udpPort(udpBackend(t, "a"))), udpPort().Key())
	c := dialUDP(t, addr)
	// Traffic more often than the timeout keeps the one session alive.
	for range 8 {
		exchange(t, c, []byte("ping"))
		if got := udpSessions(ls, udpPort().Key()); got != 1 {
			t.Fatalf("UDP sessions during steady traffic = %d, want 1", got)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Silence ends it.
	waitSessions(t, ls, udpPort().Key(), 0)
	if got := testutil.ToFloat64(m.expired); got != 1 {
		t.Errorf("udp_sessions_expired_total = %v, want 1", got)
	}
	// And the next datagram starts a new one.
	if got := exchange(t, c, []byte("again")); got != "a" {
		t.Errorf("after expiry answered by %q", got)
	}
}

// TestUDPEndpointRemoved: a session whose endpoint goes away is ended, so
// the client's next datagram reaches a live endpoint instead of a dead pod.
func TestUDPEndpointRemoved(t *testing.T) {
	a, b := udpBackend(t, "a"), udpBackend(t, "b")
	ls := newSet(t, Config{UDPTimeout: time.Minute})
	addr := listen(t, ls, snap(t, udpPort(a)), udpPort().Key())
	c := dialUDP(t, addr)
	if got := exchange(t, c, []byte("1")); got != "a" {
		t.Fatalf("answered by %q, want a", got)
	}
	listen(t, ls, snap(t, udpPort(b)), udpPort().Key())
	if got := udpSessions(ls, udpPort().Key()); got != 0 {
		t.Errorf("sessions right after the endpoint was removed = %d, want 0", got)
	}
	if got := exchange(t, c, []byte("2")); got != "b" {
		t.Errorf("after a's removal answered by %q, want b", got)
	}
}

func TestUDPNoEndpointsThenSome(t *testing.T) {
	ls := newSet(t, Config{})
	addr := listen(t, ls, snap(t, udpPort()), udpPort().Key())
	c := dialUDP(t, addr)
	c.Write([]byte("nobody"))
	c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if n, err := c.Read(make([]byte, 100)); err == nil {
		t.Fatalf("a service with no endpoints answered %d bytes", n)
	}
	listen(t, ls, snap(t, udpPort(udpBackend(t, "a"))), udpPort().Key())
	if got := exchange(t, c, []byte("now")); got != "a" {
		t.Errorf("answered by %q, want a", got)
	}
}

// TestUDPSessionsBoundedPerPort: a service port holds at most
// UDPMaxSessionsPerPort sessions; a new client evicts the one used least
// recently, and every client is still answered.
func TestUDPSessionsBoundedPerPort(t *testing.T) {
	m, _ := NewMetrics(nil)
	ls := newSet(t, Config{UDPTimeout: time.Minute, UDPMaxSessionsPerPort: 3, Metrics: m})
	addr := listen(t, ls, snap(t, udpPort(udpBackend(t, "a"))), udpPort().Key())
	var clients []net.Conn
	for i := range 5 {
		c := dialUDP(t, addr)
		clients = append(clients, c)
		if got := exchange(t, c, []byte("hello")); got != "a" {
			t.Fatalf("client %d answered by %q", i, got)
		}
		if i > 0 {
			exchange(t, clients[0], []byte("still here")) // client 0 keeps being the most recent
		}
	}
	if got := udpSessions(ls, udpPort().Key()); got != 3 {
		t.Errorf("sessions = %d, want the cap, 3", got)
	}
	if got := testutil.ToFloat64(m.evicted); got != 2 {
		t.Errorf("udp_sessions_evicted_total = %v, want 2", got)
	}
	// Clients 1 and 2 were the least recently used: evicted. Client 0
	// still has its session; an evicted client gets a new one.
	if got := udpSessionClients(ls, udpPort().Key()); !got[clients[0].LocalAddr().String()] || got[clients[1].LocalAddr().String()] || got[clients[2].LocalAddr().String()] {
		t.Errorf("sessions after eviction belong to %v; want client 0 kept, 1 and 2 evicted", got)
	}
	if got := exchange(t, clients[1], []byte("back")); got != "a" {
		t.Errorf("an evicted client's next datagram answered by %q", got)
	}
}

// TestUDPSessionsBoundedOnTheNode: once the node holds UDPMaxSessions, a
// new client of a port without sessions of its own is refused (its
// datagram dropped and counted), while a port with sessions gives up its
// oldest.
func TestUDPSessionsBoundedOnTheNode(t *testing.T) {
	m, _ := NewMetrics(nil)
	ls := newSet(t, Config{UDPTimeout: time.Minute, UDPMaxSessions: 2, Metrics: m})
	other := udpPort(udpBackend(t, "b"))
	other.Name.Name, other.Port = "other", 54
	bound, err := ls.Sync(snap(t, udpPort(udpBackend(t, "a")), other), ls.RedirectBinds)
	if err != nil {
		t.Fatal(err)
	}
	at := func(p service.Port) string { return fmt.Sprintf("127.0.0.1:%d", bound[p.Key()][0].Port()) }
	for range 2 {
		exchange(t, dialUDP(t, at(udpPort())), []byte("fill"))
	}
	c := dialUDP(t, at(other))
	c.Write([]byte("no room"))
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, err := c.Read(make([]byte, 100)); err == nil {
		t.Fatalf("a new client of a port with no session answered (%d bytes) on a full node", n)
	}
	if got := testutil.ToFloat64(m.refused); got != 1 {
		t.Errorf("udp_sessions_refused_total = %v, want 1", got)
	}
	if got := exchange(t, dialUDP(t, at(udpPort())), []byte("third")); got != "a" {
		t.Errorf("a third client of the full port answered by %q", got)
	}
	if got := testutil.ToFloat64(m.evicted); got != 1 {
		t.Errorf("udp_sessions_evicted_total = %v, want 1", got)
	}
	if n := ls.udpSessions.Load(); n != 2 {
		t.Errorf("node's session count = %d, want 2", n)
	}
}

// udpSessionClients lists the client addresses with a session on k.
func udpSessionClients(ls *Listeners, k service.Key) map[string]bool {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	out := map[string]bool{}
	for _, sock := range ls.active[k].sockets {
		u := sock.(*udpSocket)
		u.mu.Lock()
		for client := range u.sessions {
			out[client.String()] = true
		}
		u.mu.Unlock()
	}
	return out
}

// TestUDPBurstOfClients: datagrams from many clients at once, read by the
// loop several to a system call, each reach their own session and each
// reply goes back to the client that asked, with its own payload.
func TestUDPBurstOfClients(t *testing.T) {
	ls := newSet(t, Config{UDPTimeout: time.Minute})
	addr := listen(t, ls, snap(t, udpPort(udpBackend(t, "a"), udpBackend(t, "b"))), udpPort().Key())
	const clients = 64
	var cs []net.Conn
	for range clients {
		cs = append(cs, dialUDP(t, addr))
	}
	for round := range 5 {
		for i, c := range cs { // all sent before any is read
			if _, err := fmt.Fprintf(c, "round %d client %d", round, i); err != nil {
				t.Fatal(err)
			}
		}
		for i, c := range cs {
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 100)
			n, err := c.Read(buf)
			if err != nil {
				t.Fatalf("round %d: client %d had no reply: %v", round, i, err)
			}
			_, got, _ := bytes.Cut(buf[:n], []byte("\n"))
			if want := fmt.Sprintf("round %d client %d", round, i); string(got) != want {
				t.Fatalf("client %d was answered %q; want %q", i, got, want)
			}
		}
	}
	if got := udpSessions(ls, udpPort().Key()); got != clients {
		t.Errorf("UDP sessions = %d, want %d", got, clients)
	}
}
