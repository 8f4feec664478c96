package userspace

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
)

// echoBulk writes payload to c and reads the echo back at the same time,
// and reports whether every byte came back in order.
func echoBulk(t *testing.T, c *net.TCPConn, payload []byte) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		errc <- err
	}()
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Errorf("read the echo: %v", err)
		return
	}
	if err := <-errc; err != nil {
		t.Errorf("write: %v", err)
	}
	if !bytes.Equal(got, payload) {
		t.Errorf("the echo of %d bytes differs: sha256 %x, sent %x", len(payload), sha256.Sum256(got), sha256.Sum256(payload))
	}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// TestCopyAdapts: small messages are copied through a buffer and never
// borrow a pipe; bulk on the same connection is spliced through one; the
// connection then idles holding none; and every byte arrives in order
// across the switches.
func TestCopyAdapts(t *testing.T) {
	ls := newSet(t, Config{})
	addr := listen(t, ls, snap(t, tcpPort(backend(t, echo))), tcpPort().Key())
	c := dialTCP(t, addr)
	for range 20 {
		if got := exchangeTCP(t, c, "ping"); got != "ping" {
			t.Fatalf("echo of a small message: %q", got)
		}
	}
	if s := ls.pipes.stats(); s.lends != 0 {
		t.Errorf("small messages borrowed %d pipes; want none (%+v)", s.lends, s)
	}
	echoBulk(t, c, randomBytes(8<<20))
	if s := ls.pipes.stats(); s.lends == 0 {
		t.Errorf("8 MiB both ways borrowed no pipe: bulk was not spliced (%+v)", s)
	}
	if got := exchangeTCP(t, c, "after the burst"); got != "after the burst" {
		t.Fatalf("echo after bulk: %q", got)
	}
	// An idle connection holds no pipe: the read that finds the socket
	// empty gives it back (just after the client has its echo, maybe).
	waitFor(t, func() bool { return ls.pipes.stats().lent == 0 })
	echoBulk(t, c, randomBytes(3<<20+17)) // and bulk again, of an odd size
}

// TestPipePoolBound: with one pipe for the whole set, three bulk transfers
// at once all arrive whole; those that find the pool empty copy.
func TestPipePoolBound(t *testing.T) {
	ls := newSet(t, Config{MaxPipes: 1})
	addr := listen(t, ls, snap(t, tcpPort(backend(t, echo))), tcpPort().Key())
	var wg sync.WaitGroup
	for range 3 {
		c := dialTCP(t, addr)
		wg.Go(func() { echoBulk(t, c, randomBytes(4<<20)) })
	}
	wg.Wait()
	if s := ls.pipes.stats(); s.peak != 1 || s.lends == 0 {
		t.Errorf("pool of one: %+v; want a peak of 1 and some lends", s)
	}
}

// openFiles counts this process's open sockets and pipes.
func openFiles(t *testing.T) (sockets, pipes int) {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		target, _ := os.Readlink("/proc/self/fd/" + fd.Name())
		switch {
		case strings.HasPrefix(target, "socket:"):
			sockets++
		case strings.HasPrefix(target, "pipe:"):
			pipes++
		}
	}
	return sockets, pipes
}

// bufferedEcho is echo through a buffer: io.Copy between TCPConns would
// splice through pipes of the runtime's, and this test counts pipes.
func bufferedEcho(c *net.TCPConn) {
	io.CopyBuffer(struct{ io.Writer }{c}, struct{ io.Reader }{c}, make([]byte, 32<<10))
	c.CloseWrite()
}

// TestIdleConnectionHoldsTwoDescriptors: a proxied connection that has
// moved bulk and gone quiet holds its two sockets and nothing else; the
// pipes its bursts used are back in the pool, which keeps a few idle.
func TestIdleConnectionHoldsTwoDescriptors(t *testing.T) {
	ls := newSet(t, Config{})
	addr := listen(t, ls, snap(t, tcpPort(backend(t, bufferedEcho))), tcpPort().Key())
	socketsBefore, pipesBefore := openFiles(t)
	const n = 50
	for range n {
		c := dialTCP(t, addr)
		echoBulk(t, c, randomBytes(256<<10))
		if got := exchangeTCP(t, c, "quiet now"); got != "quiet now" {
			t.Fatalf("echo: %q", got)
		}
	}
	// The last read of a burst, the one that finds the socket empty,
	// gives the pipe back; it may come just after the client has its echo.
	waitFor(t, func() bool { return ls.pipes.stats().lent == 0 })
	s := ls.pipes.stats()
	sockets, pipes := openFiles(t)
	// Each connection is four sockets in this process: the test's client,
	// the proxy's two, the backend's accepted one. Pipes of the runtime's
	// (other tests' io.Copy) can only have closed meanwhile.
	if sockets-socketsBefore != 4*n {
		t.Errorf("%d idle connections hold %d sockets; want %d (2 of the proxy's each)", n, sockets-socketsBefore, 4*n)
	}
	if pipes > pipesBefore+2*s.idle {
		t.Errorf("%d idle connections: %d pipe descriptors, %d before and %d idle in the pool (%+v)", n, pipes, pipesBefore, s.idle, s)
	}
}
