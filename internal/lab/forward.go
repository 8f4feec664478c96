package lab

import (
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/nsvisit"
)

// Forward makes target (an address on this process's own loopback, such as
// a test API server's 127.0.0.1:port) reachable from inside namespace n at
// 127.0.0.1:<returned port>. The listening socket is created inside n; each
// connection to it is carried by this process to target. A socket keeps the
// namespace it was made in, so one process can join the two. Close stops it.
func (l *Lab) Forward(n *NS, target string) (int, error) {
	var ln net.Listener
	err := n.visit(func() (err error) {
		ln, err = net.Listen("tcp", "127.0.0.1:0")
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("listen in %s: %w", n.Name, err)
	}
	f := &forwarder{ln: ln, target: target}
	l.mu.Lock()
	l.forwarders = append(l.forwarders, f)
	l.mu.Unlock()
	f.wg.Go(f.serve)
	return ln.Addr().(*net.TCPAddr).Port, nil
}

type forwarder struct {
	ln     net.Listener
	target string
	wg     sync.WaitGroup

	mu    sync.Mutex
	conns []net.Conn
}

func (f *forwarder) serve() {
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		f.wg.Go(func() { f.carry(c) })
	}
}

func (f *forwarder) carry(c net.Conn) {
	defer c.Close()
	up, err := net.Dial("tcp", f.target)
	if err != nil {
		return
	}
	defer up.Close()
	f.mu.Lock()
	f.conns = append(f.conns, c, up)
	f.mu.Unlock()
	done := make(chan struct{})
	go func() {
		io.Copy(up, c)
		up.(*net.TCPConn).CloseWrite()
		close(done)
	}()
	io.Copy(c, up)
	c.(*net.TCPConn).CloseWrite()
	<-done
}

func (f *forwarder) close() {
	f.ln.Close()
	f.mu.Lock()
	for _, c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}

// Dial connects to addr from inside namespace n (see visit), so a test can
// be a client inside a pod without starting a process per request.
func (n *NS) Dial(network, addr string) (c net.Conn, err error) {
	return n.DialTimeout(network, addr, 2*time.Second)
}

// DialTimeout is Dial giving up after timeout.
func (n *NS) DialTimeout(network, addr string, timeout time.Duration) (c net.Conn, err error) {
	err = n.visit(func() error {
		c, err = net.DialTimeout(network, addr, timeout)
		return err
	})
	return c, err
}

// visit runs f inside namespace n (package nsvisit).
func (n *NS) visit(f func() error) error { return nsvisit.Do(n.Name, f) }
