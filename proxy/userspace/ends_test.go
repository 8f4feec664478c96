package userspace

import (
	"bytes"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// How a connection ends must reach the other side as it happened: a reset
// as a reset, a FIN as a FIN, and the idle guards end only what is idle.

// reset closes c so that its peer sees a RST, not a FIN.
func reset(c *net.TCPConn) {
	c.SetLinger(0)
	c.Close()
}

// readUntilError reads c until it fails or ends, and returns what it read
// and how it ended (nil for a clean EOF).
func readUntilError(c net.Conn) ([]byte, error) {
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var got bytes.Buffer
	_, err := io.Copy(&got, c)
	return got.Bytes(), err
}

// TestBackendResetReachesTheClient: a pod that resets in the middle of its
// reply must not look, to the client, like a short but complete reply.
func TestBackendResetReachesTheClient(t *testing.T) {
	ls := newSet(t, Config{})
	ep := backend(t, func(c *net.TCPConn) {
		c.Write(bytes.Repeat([]byte("half"), 16<<10))
		reset(c)
	})
	// The reset may even beat connect's return on a busy machine.
	c, err := net.Dial("tcp", listen(t, ls, snap(t, tcpPort(ep)), tcpPort().Key()))
	if err == nil {
		defer c.Close()
		_, err = readUntilError(c)
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client's read after the pod reset = %v; want ECONNRESET", err)
	}
}

// TestClientResetReachesTheBackend: a client that resets in the middle of
// an upload must not look, to the pod, like a complete upload.
func TestClientResetReachesTheBackend(t *testing.T) {
	ended := make(chan error, 1)
	ls := newSet(t, Config{})
	ep := backend(t, func(c *net.TCPConn) {
		_, err := readUntilError(c)
		ended <- err
	})
	c := dialTCP(t, listen(t, ls, snap(t, tcpPort(ep)), tcpPort().Key()))
	if _, err := c.Write(bytes.Repeat([]byte("upload"), 16<<10)); err != nil {
		t.Fatal(err)
	}
	reset(c)
	select {
	case err := <-ended:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("pod's read after the client reset = %v; want ECONNRESET", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the pod's read did not end")
	}
}

// TestHalfClosedReplyKeepsFlowing: after the client shuts its write side,
// a reply that keeps moving is never cut, however long it takes (nc -N,
// redis-cli --pipe, HTTP/1.0 uploads); the guard is an idle timer.
func TestHalfClosedReplyKeepsFlowing(t *testing.T) {
	const timeout = 500 * time.Millisecond
	ls := newSet(t, Config{HalfCloseTimeout: timeout})
	want := bytes.Repeat([]byte{'.'}, 16) // one every 100ms: 1.6s, over 3 timeouts
	ep := backend(t, func(c *net.TCPConn) {
		io.Copy(io.Discard, c) // until the client's FIN
		for _, b := range want {
			c.Write([]byte{b})
			time.Sleep(100 * time.Millisecond)
		}
	})
	c := dialTCP(t, listen(t, ls, snap(t, tcpPort(ep)), tcpPort().Key()))
	c.CloseWrite()
	got, err := readUntilError(c)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("trickled reply after half-close = %q, %v; want %q and a clean end", got, err, want)
	}
}

// TestHalfOpenGuard: a backend that never answers and never closes after the
// client's FIN must not hold both sockets forever (kubernetes#18354); the
// connection is reset, which tells the client the reply never came.
func TestHalfOpenGuard(t *testing.T) {
	release := make(chan struct{})
	ls := newSet(t, Config{HalfCloseTimeout: 200 * time.Millisecond})
	ep := backend(t, func(c *net.TCPConn) {
		io.Copy(io.Discard, c)
		<-release // hold the connection open, never answer, never close
	})
	defer close(release)
	c := dialTCP(t, listen(t, ls, snap(t, tcpPort(ep)), tcpPort().Key()))
	c.CloseWrite()
	if _, err := readUntilError(c); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read after half-close = %v; want ECONNRESET from the guard", err)
	}
	waitNoConnections(t, ls)
}

// TestIdleTimeout: a connection that moves nothing either way for
// TCPIdleTimeout is reset; one that keeps talking is not.
func TestIdleTimeout(t *testing.T) {
	ls := newSet(t, Config{TCPIdleTimeout: 300 * time.Millisecond})
	addr := listen(t, ls, snap(t, tcpPort(backend(t, echo))), tcpPort().Key())

	busy := dialTCP(t, addr)
	for i := range 15 { // 1.5s of one echo every 100ms
		if got := exchangeTCP(t, busy, "ping"); got != "ping" {
			t.Fatalf("echo %d on the busy connection = %q", i, got)
		}
		time.Sleep(100 * time.Millisecond)
	}
	idle := dialTCP(t, addr)
	exchangeTCP(t, idle, "once")
	if _, err := readUntilError(idle); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("idle connection ended with %v; want ECONNRESET", err)
	}
}

// TestIdleTimeoutEndsAStuckReader: a client that stops reading while the
// pod sends holds the pod's writes stuck in our socket; that moves nothing
// and is ended like any idle connection.
func TestIdleTimeoutEndsAStuckReader(t *testing.T) {
	ended := make(chan error, 1)
	ls := newSet(t, Config{TCPIdleTimeout: 200 * time.Millisecond})
	ep := backend(t, func(c *net.TCPConn) {
		chunk := make([]byte, 64<<10)
		c.SetWriteDeadline(time.Now().Add(20 * time.Second))
		for {
			if _, err := c.Write(chunk); err != nil {
				ended <- err
				return
			}
		}
	})
	dialTCP(t, listen(t, ls, snap(t, tcpPort(ep)), tcpPort().Key())) // never read
	select {
	case err := <-ended:
		if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
			t.Fatalf("pod's write to a client that stopped reading ended with %v; want a reset", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("a connection whose client stopped reading was never ended")
	}
	waitNoConnections(t, ls)
}

// exchangeTCP writes msg and reads as many bytes back.
func exchangeTCP(t *testing.T, c net.Conn, msg string) string {
	t.Helper()
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("write %q: %v", msg, err)
	}
	buf := make([]byte, len(msg))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("read the echo of %q: %v", msg, err)
	}
	return string(buf)
}

// waitNoConnections waits until the set tracks no proxied connection.
func waitNoConnections(t *testing.T, ls *Listeners) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for ls.ActiveConnections() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := ls.ActiveConnections(); n != 0 {
		t.Fatalf("ActiveConnections() = %d, want 0", n)
	}
}

// TestShutdownDrains: stopping the proxy refuses new connections at once,
// lets a transfer that ends within the grace period finish whole, and
// resets one that does not, so that its client knows it was cut.
func TestShutdownDrains(t *testing.T) {
	finish := make(chan struct{})
	body := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB
	ep := backend(t, func(c *net.TCPConn) {
		c.Write([]byte("started"))
		select {
		case <-finish:
			c.Write(body)
		case <-time.After(30 * time.Second):
		}
	})
	ls := newSet(t, Config{})
	addr := listen(t, ls, snap(t, tcpPort(ep)), tcpPort().Key())
	c := dialTCP(t, addr)
	if got := readN(t, c, len("started")); got != "started" {
		t.Fatalf("first bytes = %q", got)
	}
	left := make(chan int, 1)
	go func() { left <- ls.Shutdown(20 * time.Second) }()
	waitRefused(t, addr)
	close(finish)
	got, err := readUntilError(c)
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("transfer during the grace period: %d bytes, %v; want %d bytes and a clean end", len(got), err, len(body))
	}
	c.Close() // the client's FIN ends the connection
	if n := <-left; n != 0 {
		t.Errorf("Shutdown reset %d connections; want 0 (the only one finished)", n)
	}
}

// TestShutdownResetsWhatOutlivesTheGrace: a transfer still running when
// the grace period ends is reset, never closed cleanly.
func TestShutdownResetsWhatOutlivesTheGrace(t *testing.T) {
	ep := backend(t, func(c *net.TCPConn) {
		for range 300 { // 30s of one byte every 100ms
			if _, err := c.Write([]byte{'.'}); err != nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
	ls := newSet(t, Config{})
	c := dialTCP(t, listen(t, ls, snap(t, tcpPort(ep)), tcpPort().Key()))
	readN(t, c, 1)
	if n := ls.Shutdown(300 * time.Millisecond); n != 1 {
		t.Errorf("Shutdown reset %d connections; want 1", n)
	}
	if _, err := readUntilError(c); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("a transfer cut by the end of the grace period ended with %v; want ECONNRESET", err)
	}
}

// readN reads exactly n bytes from c.
func readN(t *testing.T, c net.Conn, n int) string {
	t.Helper()
	buf := make([]byte, n)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("read %d bytes: %v", n, err)
	}
	return string(buf)
}

// waitRefused waits until a connect to addr is refused: the listener is
// closed.
func waitRefused(t *testing.T, addr string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if errors.Is(err, syscall.ECONNREFUSED) {
			return
		}
		if err == nil {
			c.Close()
		}
		if time.Now().After(deadline) {
			t.Fatalf("connect to %s after Shutdown: %v; want ECONNREFUSED", addr, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestTCPConnectionsBounded: beyond TCPMaxConnections a new connection is
// reset at once; a place given back takes a new one again.
func TestTCPConnectionsBounded(t *testing.T) {
	m, _ := NewMetrics(nil)
	ls := newSet(t, Config{TCPMaxConnections: 2, TCPMaxConnectionsPerPort: 2, Metrics: m})
	addr := listen(t, ls, snap(t, tcpPort(backend(t, echo))), tcpPort().Key())
	held := []*net.TCPConn{dialTCP(t, addr), dialTCP(t, addr)}
	for _, c := range held {
		exchangeTCP(t, c, "in")
	}
	// The kernel completes the handshake and we reset at once; the reset
	// may even beat connect's return.
	over, err := net.Dial("tcp", addr)
	if err == nil {
		defer over.Close()
		_, err = readUntilError(over)
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("a third connection over a bound of 2 ended with %v; want ECONNRESET", err)
	}
	if got := testutil.ToFloat64(m.forProtocol("TCP").overLimit); got != 1 {
		t.Errorf("connections_total{result=over_limit} = %v, want 1", got)
	}
	held[0].Close()
	waitFor(t, func() bool { return ls.tcpConns.Load() == 1 })
	if got := exchangeTCP(t, dialTCP(t, addr), "again"); got != "again" {
		t.Errorf("after a place was given back: %q", got)
	}
}

// TestFDBudget: the reserve is kept whatever the limit, and what peers may
// take fits in the rest.
func TestFDBudget(t *testing.T) {
	for _, tt := range []struct{ limit, other, reserve, udp, tcp int }{
		{1 << 20, 2000, 1 << 18, DefaultUDPMaxSessions, (1<<20 - 1<<18 - 2000 - 2*DefaultMaxPipes - DefaultUDPMaxSessions) / 2},
		{20000, 0, 5000, 3622, 5433},
		{2048, 0, 1024, 224, 336},
		{1024, 0, 1024, 0, 0},
	} {
		b := budgetFor(tt.limit, tt.other)
		if b.Reserve != tt.reserve || b.UDPSessions != tt.udp || b.TCPConnections != tt.tcp {
			t.Errorf("budgetFor(%d, %d) = %+v; want reserve %d, udp %d, tcp %d", tt.limit, tt.other, b, tt.reserve, tt.udp, tt.tcp)
		}
		if !b.Fits(b.TCPConnections, b.UDPSessions) || b.Fits(b.TCPConnections+1, b.UDPSessions+6) {
			t.Errorf("budgetFor(%d, %d): its own bounds do not fit exactly", tt.limit, tt.other)
		}
	}
}

// waitFor waits up to 10s for cond.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
	}
}
