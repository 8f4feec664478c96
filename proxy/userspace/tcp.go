package userspace

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/backoff"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/balancer"
)

// keepAlive turns TCP keep-alive on for both sockets of every proxied
// connection, with the kernel's timings (net.ipv4.tcp_keepalive_*). The
// client's own keep-alive probes end at our socket, so the proxy must probe
// each side itself to notice a peer that vanished without a FIN or RST. Go's
// default would also set its own 15s timings: three more system calls per
// socket on the new-connection path.
var keepAlive = net.KeepAliveConfig{Enable: true, Idle: -1, Interval: -1, Count: -1}

// tcpSocket accepts the connections for one TCP service port at one
// address.
type tcpSocket struct {
	l  *portListener
	ln *net.TCPListener
}

func (l *portListener) listenTCP(addr netip.AddrPort) (socket, error) {
	ln, err := ListenConfig.Listen(context.Background(), network("tcp", addr.Addr()), addr.String())
	if err != nil {
		return nil, err
	}
	s := &tcpSocket{l: l, ln: ln.(*net.TCPListener)}
	l.set.goroutine(s.serve)
	return s, nil
}

func (s *tcpSocket) addr() netip.AddrPort { return s.ln.Addr().(*net.TCPAddr).AddrPort() }
func (s *tcpSocket) close()               { s.ln.Close() }
func (s *tcpSocket) endpointsChanged()    {} // connections stay with their endpoint

// serve is the accept loop. It never waits for a dial: each connection gets
// a goroutine of its own at once (the legacy proxier dialed in this loop, so
// one dead pod stalled every client of the Service for up to 3.75s).
func (s *tcpSocket) serve() {
	failures := 0
	for {
		c, err := s.ln.AcceptTCP()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			// EMFILE and friends: back off and try again instead of
			// crashing the node's Service traffic as upstream did.
			s.l.set.logListenErr.Log(s.l.log.WithError(err), func(e *logrus.Entry) { e.Warn("Accept failed; backing off") })
			s.l.m.acceptErrs.Inc()
			time.Sleep(backoff.Accept(failures))
			failures++
			continue
		}
		failures = 0
		if !s.l.set.admitTCP(s.l) {
			// Over --tcp-max-connections (the node's or this port's
			// share): refuse with a reset at once, holding nothing.
			s.l.m.overLimit.Inc()
			c.SetLinger(0)
			c.Close()
			continue
		}
		s.l.set.goroutine(func() {
			defer s.l.set.releaseTCP(s.l)
			s.l.handle(c)
		})
	}
}

// handle proxies one accepted client connection: choose an endpoint, dial it
// (the next endpoint on failure), then copy bytes both ways.
func (l *portListener) handle(client *net.TCPConn) {
	defer client.Close()

	clientIP := client.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
	choice := l.bal.Pick(clientIP)
	if choice.Len() == 0 {
		// No endpoint: refuse at once. A zero linger makes Close send a
		// RST, so the client sees "connection reset" before any data
		// instead of waiting on a connection that will never answer.
		client.SetLinger(0)
		l.m.noEndpoints.Inc()
		l.log.WithField("client", client.RemoteAddr()).Debug("Refused connection: service has no endpoints")
		return
	}
	backend, endpoint, err := l.dial(l.set.ctx, choice, client.RemoteAddr().(*net.TCPAddr).AddrPort())
	if err != nil {
		client.SetLinger(0)
		l.m.dialError.Inc()
		l.set.logDropped.Log(l.log.WithError(err).WithField("client", client.RemoteAddr()), func(e *logrus.Entry) {
			e.Warn("Dropped connection: no endpoint answered")
		})
		return
	}
	defer backend.Close()
	if l.proxyProtocol.Load() {
		if err := sendProxyHeader(client, backend); err != nil {
			client.SetLinger(0)
			backend.SetLinger(0)
			l.m.dialError.Inc()
			l.log.WithError(err).WithField("endpoint", endpoint).Debug("Dropped connection")
			return
		}
	}
	conn := newTCPConn(client, backend, l.set.cfg.TCPIdleTimeout, l.set.cfg.halfCloseTimeout())
	if !l.set.track(conn) {
		conn.abort()
		return // the set is closing
	}
	defer l.set.untrack(conn)
	if endpoint != choice.Endpoint(0) {
		l.bal.Connected(clientIP, endpoint)
	}
	l.m.ok.Inc()
	l.m.active.Inc()
	toBackend, fromBackend := conn.run()
	l.m.active.Dec()
	l.m.toBackend.Add(float64(toBackend))
	l.m.fromBackend.Add(float64(fromBackend))
}

// dial tries the endpoints of choice in order, one per timeout of
// Config.DialTimeouts, and returns the first connection that succeeds. It
// dials from the node, or from client's address (see dialFrom).
func (l *portListener) dial(ctx context.Context, choice balancer.Choice, client netip.AddrPort) (*net.TCPConn, netip.AddrPort, error) {
	var errs []error
	for attempt, timeout := range l.set.cfg.dialTimeouts() {
		ep := choice.Endpoint(attempt)
		c, err := l.set.dialFrom(ctx, l.log, "tcp", client, ep, timeout)
		if attempt > 0 {
			l.m.dialRetries.Inc()
		}
		if err == nil {
			return c.(*net.TCPConn), ep, nil
		}
		l.m.dialErrors.Inc()
		errs = append(errs, err)
		l.log.WithError(err).WithField("endpoint", ep).Debug("Dial failed; trying the next endpoint")
		if ctx.Err() != nil {
			break
		}
	}
	return nil, netip.AddrPort{}, errors.Join(errs...)
}

// The two directions of a proxied connection. Direction d reads from
// sockets[d] and writes to the other socket.
const (
	toBackend   = 0 // client to pod: reads the client's socket
	fromBackend = 1 // pod to client: reads the backend's socket
)

// tcpConn is one proxied connection: the client's socket, the one we opened
// to the pod, and the guard that ends it when it stops moving.
//
// How a connection ends is passed on as it happened. A clean end of one
// direction (a FIN) is forwarded as a FIN: the write side of the other
// socket is shut and the other direction goes on, so a client that sends
// its request and shuts its write side still gets the whole reply. An error
// (a RST from either peer, a write that fails) resets both sockets
// (SO_LINGER 0): a truncated transfer must never look complete to the
// other side, which a clean close would make it.
//
// The idle guard uses read deadlines only. Each direction sets the read
// deadline of the socket it reads; when it passes, the copy returns with
// the bytes it moved meanwhile and resumes with a new deadline. A
// direction whose deadline passed with nothing moved is quiet; when both
// are quiet, or one is quiet and the other has finished, the connection has
// been idle for at least one period and is reset. The period is
// Config.TCPIdleTimeout while both directions run, and the shorter
// Config.HalfCloseTimeout once one has finished (kubernetes#18354: a peer
// that never closes its half must not hold both sockets forever). Write
// deadlines are never used: a write that times out in the middle of a
// splice would lose the bytes already in its pipe.
type tcpConn struct {
	sockets          [2]*net.TCPConn // [toBackend] the client's, [fromBackend] the backend's
	idleTimeout      time.Duration   // 0: none while both directions run
	halfCloseTimeout time.Duration

	mu    sync.Mutex
	dirs  [2]direction
	reset bool // abort ran: both sockets are closed
}

// direction is what the guard knows of one direction.
type direction struct {
	done  bool      // its FIN was forwarded
	quiet bool      // its last deadline passed with no byte moved
	woke  time.Time // when its copy last returned (or started)
}

func newTCPConn(client, backend *net.TCPConn, idle, halfClose time.Duration) *tcpConn {
	c := &tcpConn{sockets: [2]*net.TCPConn{client, backend}, idleTimeout: idle, halfCloseTimeout: halfClose}
	now := time.Now()
	for d := range c.dirs {
		c.dirs[d].woke = now
		c.sockets[d].SetReadDeadline(c.deadline(now))
	}
	return c
}

// run copies both ways until both directions are done, one direction in a
// goroutine of its own and the other in the caller's. It returns the bytes
// copied each way.
func (c *tcpConn) run() (up, down int64) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		up = c.copy(toBackend)
	}()
	down = c.copy(fromBackend)
	<-done
	return up, down
}

// copy carries direction d until it ends, with splice(2): the bytes go
// from socket to socket through a kernel pipe of the direction's own and
// never into our memory.
func (c *tcpConn) copy(d int) int64 {
	src, dst := c.sockets[d], c.sockets[1-d]
	p, err := newPipe()
	if err != nil {
		c.abort() // out of descriptors: the budget should have kept us from here
		return 0
	}
	defer p.close()
	var total int64
	for {
		n, err := splice(dst, src, p)
		total += n
		switch {
		case err == nil: // src sent its FIN: forward it
			if err := dst.CloseWrite(); err != nil {
				c.abort()
			} else {
				c.finish(d)
			}
			return total
		case errors.Is(err, os.ErrDeadlineExceeded) && c.resume(d, n > 0):
			continue
		default: // a reset, a failed write, the guard, or Close
			c.abort()
			return total
		}
	}
}

// deadline is the read deadline for a period starting at now; the zero
// time is none.
func (c *tcpConn) deadline(now time.Time) time.Time {
	period := c.idleTimeout
	if c.dirs[toBackend].done || c.dirs[fromBackend].done {
		period = c.halfCloseTimeout
	}
	if period <= 0 {
		return time.Time{}
	}
	return now.Add(period)
}

// resume is called when direction d's read deadline passed; moved says
// whether d carried any byte since the last one. It reports whether the
// connection goes on (with a new deadline for d) or has been idle long
// enough to be ended.
func (c *tcpConn) resume(d int, moved bool) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	c.dirs[d].quiet = !moved
	c.dirs[d].woke = now
	other := &c.dirs[1-d]
	// A direction whose deadline has not come back for two periods is
	// stuck in a write: its peer stopped reading. It moves nothing either.
	stuck := c.idleTimeout > 0 && !other.done && now.Sub(other.woke) > 2*c.idleTimeout
	if !moved && (other.done || other.quiet || stuck) {
		return false
	}
	c.sockets[d].SetReadDeadline(c.deadline(now))
	return true
}

// finish records that direction d forwarded its FIN. The other direction
// now runs on the half-close period, starting now.
func (c *tcpConn) finish(d int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dirs[d].done = true
	if o := 1 - d; !c.dirs[o].done && !c.reset {
		now := time.Now()
		c.dirs[o].woke = now
		c.sockets[o].SetReadDeadline(c.deadline(now))
	}
}

// abort resets both sockets: each peer sees ECONNRESET, not a clean end.
// The other direction's copy then fails too and returns.
func (c *tcpConn) abort() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.reset {
		return
	}
	c.reset = true
	for _, s := range c.sockets {
		s.SetLinger(0) // Close sends a RST and drops what is unsent
		s.Close()
	}
}
