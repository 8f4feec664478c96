package userspace

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

var web = service.PortName{Namespace: "default", Name: "web", Port: "http"}

// newSet returns listeners that are closed, with no goroutine left behind,
// when the test ends.
func newSet(t *testing.T, cfg Config) *Listeners {
	t.Helper()
	ls, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ls.Close()
		goleak.VerifyNone(t, goleak.IgnoreCurrent())
	})
	return ls
}

func snap(t *testing.T, ports ...service.Port) service.Snapshot {
	t.Helper()
	s, err := service.NewSnapshot(ports)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func tcpPort(eps ...netip.AddrPort) service.Port {
	return service.Port{Name: web, Protocol: service.TCP, ClusterIP: netip.MustParseAddr("10.96.0.10"), Port: 80, Endpoints: eps}
}

// listen applies s and returns the listener address of key on loopback.
func listen(t *testing.T, ls *Listeners, s service.Snapshot, key service.Key) string {
	t.Helper()
	bound, err := ls.Sync(s, ls.RedirectBinds)
	if err != nil {
		t.Fatal(err)
	}
	addrs, ok := bound[key]
	if !ok {
		t.Fatalf("no listener for %s", key)
	}
	return fmt.Sprintf("127.0.0.1:%d", addrs[0].Port())
}

// backend is a TCP server on 127.0.0.1 that runs handle for each
// connection.
func backend(t *testing.T, handle func(*net.TCPConn)) netip.AddrPort {
	t.Helper()
	return backendOn(t, netip.MustParseAddr("127.0.0.1"), handle)
}

// backendOn is backend on loopback address ip.
func backendOn(t *testing.T, ip netip.Addr, handle func(*net.TCPConn)) netip.AddrPort {
	t.Helper()
	ln, err := net.ListenTCP(network("tcp", ip), net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip, 0)))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				handle(c)
			})
		}
	})
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// echo copies everything back, then closes its write side.
func echo(c *net.TCPConn) {
	io.Copy(c, c)
	c.CloseWrite()
}

// dialTCP connects to addr; the connection is closed when the test ends.
func dialTCP(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// named answers with its name and closes.
func named(name string) func(*net.TCPConn) {
	return func(c *net.TCPConn) { io.WriteString(c, name) }
}

func TestTenMegabytesBothWays(t *testing.T) {
	ls := newSet(t, Config{})
	addr := listen(t, ls, snap(t, tcpPort(backend(t, echo))), tcpPort().Key())

	c := dialTCP(t, addr)
	payload := make([]byte, 10<<20)
	rand.Read(payload)
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.CloseWrite()
		}
		errc <- err
	}()
	h := sha256.New()
	n, err := io.Copy(h, c)
	if err != nil {
		t.Fatalf("read the echo: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("write: %v", err)
	}
	if want := sha256.Sum256(payload); n != int64(len(payload)) || !bytes.Equal(h.Sum(nil), want[:]) {
		t.Errorf("echoed %d bytes with sha256 %x; want %d bytes with %x", n, h.Sum(nil), len(payload), want)
	}
}

// TestHalfClose: a client that sends its request, shuts its write side and
// then reads gets the whole reply (the legacy proxier closed both sides at
// the first EOF and cut the reply off).
func TestHalfClose(t *testing.T) {
	ls := newSet(t, Config{})
	ep := backend(t, func(c *net.TCPConn) {
		n, _ := io.Copy(io.Discard, c) // read until the client's FIN
		time.Sleep(50 * time.Millisecond)
		fmt.Fprintf(c, "read %d bytes; here is the reply after your FIN", n)
	})
	addr := listen(t, ls, snap(t, tcpPort(ep)), tcpPort().Key())
	c := dialTCP(t, addr)
	io.WriteString(c, "request")
	c.CloseWrite()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(c)
	if want := "read 7 bytes; here is the reply after your FIN"; err != nil || string(got) != want {
		t.Errorf("reply after half-close = %q, %v; want %q", got, err, want)
	}
}

func TestNoEndpointsRefusedAtOnce(t *testing.T) {
	ls := newSet(t, Config{})
	addr := listen(t, ls, snap(t, tcpPort()), tcpPort().Key())
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return // refused at connect: as good
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(make([]byte, 1))
	var ne net.Error
	if n != 0 || err == nil || (errors.As(err, &ne) && ne.Timeout()) {
		t.Errorf("read from a service with no endpoints = %d, %v; want the connection reset at once", n, err)
	}
}

func TestFailoverToTheNextEndpoint(t *testing.T) {
	// A port that refuses: a listener opened and closed again.
	dead, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().(*net.TCPAddr).AddrPort()
	dead.Close()
	live := backend(t, named("live"))

	ls := newSet(t, Config{})
	addr := listen(t, ls, snap(t, tcpPort(deadAddr, live)), tcpPort().Key())
	for i := range 10 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil || string(got) != "live" {
			t.Fatalf("connection %d = %q, %v; want it carried to the live endpoint", i, got, err)
		}
	}
}

// blackhole returns a loopback address whose dials hang: a listening socket
// with a backlog of 0 that never accepts, its one queue slot taken, so the
// kernel drops every further SYN, as a dead pod's node would.
func blackhole(t *testing.T) netip.AddrPort {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(sa.(*syscall.SockaddrInet4).Port))
	// Fill the queue.
	for range 2 {
		d := net.Dialer{Timeout: 200 * time.Millisecond}
		if c, err := d.Dial("tcp", addr.String()); err == nil {
			t.Cleanup(func() { c.Close() })
		}
	}
	return addr
}

// TestDeadEndpointDoesNotBlockAccept: while one client's dial hangs on an
// endpoint that never answers, the next client of the same service is
// accepted and served at once. (The legacy proxier dialed in its accept
// loop, so every client waited behind the hanging one.) The hanging client
// is carried to the live endpoint when its first dial times out.
func TestDeadEndpointDoesNotBlockAccept(t *testing.T) {
	const dialTimeout = 2 * time.Second
	dead, live := blackhole(t), backend(t, named("live"))
	ls := newSet(t, Config{DialTimeouts: []time.Duration{dialTimeout, dialTimeout}})
	addr := listen(t, ls, snap(t, tcpPort(dead, live)), tcpPort().Key())

	type result struct {
		body    string
		err     error
		elapsed time.Duration
	}
	results := make(chan result, 2)
	start := time.Now()
	// Two clients at once: round robin sends one of them to the dead
	// endpoint first.
	for range 2 {
		go func() {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				results <- result{err: err}
				return
			}
			defer c.Close()
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			b, err := io.ReadAll(c)
			results <- result{string(b), err, time.Since(start)}
		}()
	}
	fast, slow := <-results, <-results
	for _, r := range []result{fast, slow} {
		if r.err != nil || r.body != "live" {
			t.Fatalf("a client got %q, %v; want both carried to the live endpoint", r.body, r.err)
		}
	}
	if slow.elapsed < dialTimeout {
		t.Fatalf("no client waited for the dead endpoint's dial timeout (%s, %s): the blackhole did not hang", fast.elapsed, slow.elapsed)
	}
	if fast.elapsed >= dialTimeout {
		t.Errorf("the second client was served after %s, behind the hanging dial; want it served at once", fast.elapsed)
	}
}

func TestEndpointChangeKeepsTheListener(t *testing.T) {
	one, two := backend(t, named("one")), backend(t, named("two"))
	ls := newSet(t, Config{})
	before := listen(t, ls, snap(t, tcpPort(one)), tcpPort().Key())
	after := listen(t, ls, snap(t, tcpPort(two)), tcpPort().Key())
	if before != after {
		t.Fatalf("listener moved from %s to %s on an endpoint change", before, after)
	}
	c, err := net.Dial("tcp", after)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, _ := io.ReadAll(c); string(got) != "two" {
		t.Errorf("after the change the connection reached %q, want two", got)
	}
}

// TestRemovedServiceKeepsEstablishedConnections: closing a service's
// listener stops new connections but not the ones already proxied.
func TestRemovedServiceKeepsEstablishedConnections(t *testing.T) {
	ls := newSet(t, Config{})
	addr := listen(t, ls, snap(t, tcpPort(backend(t, echo))), tcpPort().Key())
	c := dialTCP(t, addr)
	roundTrip := func(msg string) (string, error) {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, msg); err != nil {
			return "", err
		}
		buf := make([]byte, len(msg))
		_, err := io.ReadFull(c, buf)
		return string(buf), err
	}
	if got, err := roundTrip("before"); err != nil || got != "before" {
		t.Fatalf("echo before removal = %q, %v", got, err)
	}
	empty := snap(t)
	if _, err := ls.Sync(empty, ls.RedirectBinds); err != nil {
		t.Fatal(err)
	}
	ls.CloseUnused()
	if got, err := roundTrip("after"); err != nil || got != "after" {
		t.Errorf("echo on the established connection after removal = %q, %v; want it still working", got, err)
	}
	if c2, err := net.Dial("tcp", addr); err == nil {
		c2.Close()
		t.Errorf("a new connection to the removed service's listener was accepted")
	}
}

func TestLoopbackBindRefused(t *testing.T) {
	if _, err := New(Config{BindAddress: netip.MustParseAddr("127.0.0.1")}); !errors.Is(err, ErrLoopbackBind) {
		t.Errorf("New with bind 127.0.0.1: %v, want ErrLoopbackBind", err)
	}
}

// TestSocketsFollowBinds: a listener serves every address binds names,
// one socket each feeding the same balancer; an address binds stops naming
// is closed by CloseUnused, and only then.
func TestSocketsFollowBinds(t *testing.T) {
	ls := newSet(t, Config{})
	p := tcpPort(backend(t, named("pod")))
	two := func(*service.Port) []netip.AddrPort {
		return []netip.AddrPort{netip.MustParseAddrPort("127.0.0.2:0"), netip.MustParseAddrPort("127.0.0.3:0")}
	}
	one := func(*service.Port) []netip.AddrPort { return two(nil)[:1] }
	s := snap(t, p)
	bound, err := ls.Sync(s, two)
	if err != nil {
		t.Fatal(err)
	}
	addrs := bound[p.Key()]
	if len(addrs) != 2 {
		t.Fatalf("bound = %v, want two sockets", addrs)
	}
	fetch := func(a netip.AddrPort) (string, error) {
		c, err := net.DialTimeout("tcp", a.String(), time.Second)
		if err != nil {
			return "", err
		}
		defer c.Close()
		b, err := io.ReadAll(c)
		return string(b), err
	}
	for _, a := range addrs {
		if got, err := fetch(a); err != nil || got != "pod" {
			t.Errorf("through %s: %q, %v", a, got, err)
		}
	}
	if _, err := ls.Sync(s, one); err != nil {
		t.Fatal(err)
	}
	if got, err := fetch(addrs[1]); err != nil || got != "pod" {
		t.Errorf("before CloseUnused the dropped socket %s must still serve: %q, %v", addrs[1], got, err)
	}
	ls.CloseUnused()
	if _, err := fetch(addrs[1]); err == nil {
		t.Errorf("after CloseUnused %s still accepts", addrs[1])
	}
	if got, err := fetch(addrs[0]); err != nil || got != "pod" {
		t.Errorf("the kept socket %s: %q, %v", addrs[0], got, err)
	}
}

// TestAddressChangesHands: one sync removes a service port and gives its
// exact address (in bind mode, a NodePort or a Service IP and port) to
// another. The new one must be served by that very sync, not fail to bind
// because the old socket still held the address.
func TestAddressChangesHands(t *testing.T) {
	ls := newSet(t, Config{})
	free, err := net.Listen("tcp", "127.0.0.4:0")
	if err != nil {
		t.Fatal(err)
	}
	at := netip.MustParseAddrPort(free.Addr().String())
	free.Close()
	fixed := func(*service.Port) []netip.AddrPort { return []netip.AddrPort{at} }
	old := tcpPort(backend(t, named("old")))
	if _, err := ls.Sync(snap(t, old), fixed); err != nil {
		t.Fatal(err)
	}
	ls.CloseUnused()
	heir := tcpPort(backend(t, named("new")))
	heir.Name.Name = "heir"
	bound, err := ls.Sync(snap(t, heir), fixed)
	if err != nil {
		t.Fatalf("sync giving %s to another service port: %v", at, err)
	}
	if got := bound[heir.Key()]; len(got) != 1 || got[0] != at {
		t.Fatalf("bound = %v, want %s", got, at)
	}
	ls.CloseUnused()
	c, err := net.DialTimeout("tcp", at.String(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, _ := io.ReadAll(c); string(got) != "new" {
		t.Errorf("%s answered %q, want the new service port's pod", at, got)
	}
}
