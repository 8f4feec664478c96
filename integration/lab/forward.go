package lab

import (
	"fmt"
	"io"
	"net"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Forward makes target (an address on this process's own loopback, such as
// a test API server's 127.0.0.1:port) reachable from inside namespace n at
// 127.0.0.1:<returned port>. The listening socket is created inside n; each
// connection to it is carried by this process to target. A socket keeps the
// namespace it was made in, so one process can join the two. Close stops it.
func (l *Lab) Forward(n *NS, target string) (int, error) {
	type result struct {
		ln  net.Listener
		err error
	}
	res := make(chan result, 1)
	go func() {
		// This thread visits n and comes back. It must come back rather
		// than be discarded: processes started with Pdeathsig (the lab's,
		// the control plane's) are killed when the thread that started
		// them exits, and any thread may have started one. Only if the way
		// back fails is the thread left locked, so the runtime ends it
		// instead of running other goroutines inside n.
		runtime.LockOSThread()
		home, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			res <- result{err: err}
			return
		}
		defer unix.Close(home)
		fd, err := unix.Open("/var/run/netns/"+n.Name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			res <- result{err: err}
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			res <- result{err: err}
			return
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if unix.Setns(home, unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		res <- result{ln, err}
	}()
	r := <-res
	if r.err != nil {
		return 0, fmt.Errorf("listen in %s: %w", n.Name, r.err)
	}
	f := &forwarder{ln: r.ln, target: target}
	l.mu.Lock()
	l.forwarders = append(l.forwarders, f)
	l.mu.Unlock()
	f.wg.Go(f.serve)
	return r.ln.Addr().(*net.TCPAddr).Port, nil
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

// Dial connects to addr from inside namespace n: the socket is made by a
// thread that visits n and comes back (see Forward), so a test can be a
// client inside a pod without starting a process per request.
func (n *NS) Dial(network, addr string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	res := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		home, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			res <- result{err: err}
			return
		}
		defer unix.Close(home)
		fd, err := unix.Open("/var/run/netns/"+n.Name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			res <- result{err: err}
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			res <- result{err: err}
			return
		}
		c, err := net.DialTimeout(network, addr, 2*time.Second)
		if unix.Setns(home, unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		res <- result{c, err}
	}()
	r := <-res
	return r.c, r.err
}
