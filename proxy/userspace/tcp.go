package userspace

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/backoff"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/balancer"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// keepAlive turns TCP keep-alive on, with the kernel's timings
// (net.ipv4.tcp_keepalive_*), for the connections Go accepts on
// ListenConfig's listeners (the DNS stub's); proxied connections get the
// same from setStreamOptions. The client's own keep-alive probes end at our
// socket, so the proxy must probe each side itself to notice a peer that
// vanished without a FIN or RST. Go's default would also set its own 15s
// timings: three more system calls per socket.
var keepAlive = net.KeepAliveConfig{Enable: true, Idle: -1, Interval: -1, Count: -1}

// tcpSocket accepts the connections for one TCP service port at one
// address. Its listening socket is carried by a loop, which accepts, starts
// the dial to the pod and carries the connection, all on its own thread:
// a new connection costs no goroutine and no hand-off between threads.
type tcpSocket struct {
	l      *portListener
	fd     int
	bound  netip.AddrPort
	loop   *loop
	slot   int32
	closed bool

	queued       bool      // on the loop's again list
	failures     int       // accept failures in a row
	backoffUntil time.Time // accepting paused after a failure (EMFILE...) until then
}

// openTCP opens a listening TCP socket at addr, ready for a loop: its
// descriptor, detached from Go's poller, and the address it got.
func openTCP(addr netip.AddrPort) (int, netip.AddrPort, error) {
	ln, err := ListenConfig.Listen(context.Background(), network("tcp", addr.Addr()), addr.String())
	if err != nil {
		return -1, netip.AddrPort{}, err
	}
	bound := ln.Addr().(*net.TCPAddr).AddrPort()
	fd, err := detachFD(ln.(*net.TCPListener))
	if err != nil {
		return -1, netip.AddrPort{}, err
	}
	// Accepted sockets inherit these from the listening one: set once
	// here, not on every connection.
	setStreamOptions(fd)
	return fd, bound, nil
}

func (l *portListener) listenTCP(addr netip.AddrPort) (socket, error) {
	fd, bound, err := openTCP(addr)
	if err != nil {
		return nil, err
	}
	return l.serveTCP(fd, bound)
}

// serveTCP has a loop accept on the listening socket fd, bound at bound:
// one just opened, or one a previous process listened on (carry.go).
func (l *portListener) serveTCP(fd int, bound netip.AddrPort) (socket, error) {
	s := &tcpSocket{l: l, fd: fd, bound: bound, loop: l.set.loop()}
	if !s.loop.add(s, unix.EPOLLIN, func(slot, _ int32) { s.slot = slot }, fd) {
		unix.Close(fd)
		return nil, errors.New("listeners are closed, or epoll refused the socket")
	}
	return s, nil
}

func (s *tcpSocket) addr() netip.AddrPort { return s.bound }
func (s *tcpSocket) descriptor() int      { return s.fd }
func (s *tcpSocket) endpointsChanged()    {} // connections stay with their endpoint

// close stops accepting, and returns once the socket is closed, so that its
// address can be bound again at once (bind mode).
func (s *tcpSocket) close() { s.loop.do(func(l *loop) { s.stop(l) }) }

func (s *tcpSocket) stop(l *loop) {
	if !s.closed {
		s.closed = true
		unix.Close(s.fd)
		l.remove(s.slot)
	}
}

func (s *tcpSocket) event(l *loop, _ int, _ uint32) { s.accept(l) }

func (s *tcpSocket) resume(l *loop) {
	s.queued = false
	s.accept(l)
}

// tick resumes accepting after a failure's backoff.
func (s *tcpSocket) tick(l *loop) {
	if !s.backoffUntil.IsZero() && !l.now.Before(s.backoffUntil) {
		s.backoffUntil = time.Time{}
		s.accept(l)
	}
}

// accept takes the connections waiting on the listening socket, a fair
// share at a time. It never waits for a dial: it starts the connection to
// the pod and the loop finishes it (the legacy proxier dialed in its
// accept loop, so one dead pod stalled every client of the Service for up
// to 3.75s).
func (s *tcpSocket) accept(l *loop) {
	for range fairShare {
		if s.closed || !s.backoffUntil.IsZero() {
			return
		}
		fd, sa, err := unix.Accept4(s.fd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		switch {
		case err == unix.EAGAIN:
			return
		case err == unix.EINTR || err == unix.ECONNABORTED:
			continue // the client gave up before we got to it
		case err != nil:
			// EMFILE and friends: pause and try again (at the next
			// tick past the backoff) instead of crashing the node's
			// Service traffic as upstream did.
			s.l.set.logListenErr.Log(s.l.log.WithError(&net.OpError{Op: "accept", Net: "tcp", Addr: net.TCPAddrFromAddrPort(s.bound), Err: err}), func(e *logrus.Entry) { e.Warn("Accept failed; backing off") })
			s.l.m.acceptErrs.Inc()
			s.backoffUntil = l.now.Add(backoff.Accept(s.failures))
			s.failures++
			return
		}
		s.failures = 0
		s.l.accepted(l, fd, addrPortOf(sa))
	}
	l.queue(s, &s.queued)
}

// accepted starts proxying the client connection on socket fd: choose an
// endpoint, start dialing it, and hand both sockets to a loop, which
// finishes the dial (the next endpoint on failure) and then copies bytes
// both ways.
func (l *portListener) accepted(lp *loop, fd int, client netip.AddrPort) {
	if !l.set.admitTCP(l) {
		// Over --tcp-max-connections (the node's or this port's
		// share): refuse with a reset at once, holding nothing.
		l.m.overLimit.Inc()
		resetClose(fd)
		return
	}
	choice := l.bal.Pick(client.Addr())
	if choice.Len() == 0 {
		// No endpoint: refuse at once. A zero linger makes the close
		// send a RST, so the client sees "connection reset" before any
		// data instead of waiting on a connection that will never
		// answer.
		l.m.noEndpoints.Inc()
		l.log.WithField("client", client).Debug("Refused connection: service has no endpoints")
		resetClose(fd)
		l.set.releaseTCP(l)
		return
	}
	c := &tcpConn{fds: [2]int{fd, -1}, l: l, client: client, choice: choice, attempt: -1,
		idleTimeout: l.set.cfg.TCPIdleTimeout, halfCloseTimeout: l.set.cfg.halfCloseTimeout(), active: lp.now}
	if l.proxyProtocol.Load() {
		c.header = proxyHeader(fd, client)
	}
	if !c.dialNext(lp.now) {
		c.dropped()
		resetClose(fd)
		l.set.releaseTCP(l)
		return
	}
	if !l.set.track(c, lp) {
		c.close() // the set is closing
		l.set.releaseTCP(l)
	}
}

// dialNext starts the next dial attempt of c, closing the socket of the
// one before: attempt i goes to the choice's endpoint i, with timeout i of
// Config.DialTimeouts. An attempt that fails at once is followed by the
// next. It reports false when no attempt is left.
func (c *tcpConn) dialNext(now time.Time) bool {
	l := c.l
	timeouts := l.set.cfg.dialTimeouts()
	for {
		if c.fds[fromBackend] >= 0 {
			unix.Close(c.fds[fromBackend])
			c.fds[fromBackend] = -1
		}
		c.attempt++
		if c.attempt >= len(timeouts) {
			return false
		}
		if c.attempt > 0 {
			l.m.dialRetries.Inc()
		}
		ep := c.choice.Endpoint(c.attempt)
		fd, err := l.set.connectFrom(l.log, service.TCP, c.client, ep)
		if err != nil {
			c.dialFailed(ep, err)
			continue
		}
		c.fds[fromBackend] = fd
		c.endpoint = ep
		c.dialDeadline = now.Add(timeouts[c.attempt])
		c.connecting = true
		return true
	}
}

// dialFailed counts and logs one failed attempt.
func (c *tcpConn) dialFailed(ep netip.AddrPort, err error) {
	c.l.m.dialErrors.Inc()
	c.errs = append(c.errs, fmt.Errorf("dial tcp %s: %w", ep, err))
	c.l.log.WithError(err).WithField("endpoint", ep).Debug("Dial failed; trying the next endpoint")
}

// dropped counts and logs a connection no endpoint answered.
func (c *tcpConn) dropped() {
	c.l.m.dialError.Inc()
	c.l.set.logDropped.Log(c.l.log.WithError(errors.Join(c.errs...)).WithField("client", c.client), func(e *logrus.Entry) {
		e.Warn("Dropped connection: no endpoint answered")
	})
}

// connected is called on the loop when the dial of c has succeeded: the
// connection starts, with the PROXY header first if the Service asks.
func (c *tcpConn) connected() {
	c.connecting = false
	c.errs = nil
	l := c.l
	setStreamOptions(c.fds[fromBackend])
	if c.attempt > 0 {
		l.bal.Connected(c.client.Addr(), c.endpoint)
	}
	if len(c.header) > 0 {
		f := &c.dirs[toBackend]
		f.buf = buffers.Get().(*[bufSize]byte)
		f.start, f.end = 0, copy(f.buf[:], c.header)
		c.header = nil
	}
	c.counted = true
	l.m.ok.Inc()
	l.m.active.Inc()
	if l.set.trace {
		// -v 5: one line per connection, naming both of its sockets'
		// far ends and the address our socket to the pod has.
		from := netip.AddrPort{}
		if sa, err := unix.Getsockname(c.fds[fromBackend]); err == nil {
			from = addrPortOf(sa)
		}
		l.log.WithFields(logrus.Fields{"client": c.client.String(), "endpoint": c.endpoint.String(), "from": from.String(), "attempt": c.attempt + 1}).
			Trace("Connected: client to endpoint")
	}
}

// over is called on the loop when c has ended: it gives back c's place
// under the bounds and counts what it carried.
func (c *tcpConn) over(up, down int64) {
	l := c.l
	if c.counted {
		l.m.active.Dec()
		l.m.toBackend.Add(float64(up))
		l.m.fromBackend.Add(float64(down))
	}
	l.set.untrack(c)
	l.set.releaseTCP(l)
}

// The two directions of a proxied connection. Direction d reads from
// fds[d] and writes to the other socket.
const (
	toBackend   = 0 // client to pod: reads the client's socket
	fromBackend = 1 // pod to client: reads the backend's socket
)

// tcpConn is one proxied connection: the client's socket and the one we
// opened to the pod, carried by a loop (loop.go), which alone touches its
// sockets and state once it has been added.
type tcpConn struct {
	l                 *portListener
	fds               [2]int  // [toBackend] the client's, [fromBackend] the backend's (-1 between dial attempts)
	dirs              [2]flow // [d] direction d
	canRead, canWrite [2]bool // by socket: epoll said so, and no call has found it empty since
	drain             [2]bool // by socket: its peer has shut its side: read to EOF
	active            time.Time
	idleTimeout       time.Duration // 0: none while both directions run
	halfCloseTimeout  time.Duration
	ended             bool
	queued            bool // on its loop's again list
	loop              *loop
	slot, gen         int32 // its place in the loop, and which use of that place

	// The dial, until connected.
	client       netip.AddrPort
	choice       balancer.Choice
	attempt      int // the dial attempt under way, an index into Config.DialTimeouts
	endpoint     netip.AddrPort
	connecting   bool
	dialDeadline time.Time
	redialAt     time.Time // when the loop started the attempt under way
	header       []byte    // the PROXY header to send first, if the Service asks
	errs         []error   // of the failed attempts, for the log
	counted      bool      // connected: counted as active
}

// close closes a connection that no loop carries, with a reset.
func (c *tcpConn) close() {
	for _, fd := range c.fds {
		if fd >= 0 {
			resetClose(fd)
		}
	}
}

// resetClose closes socket fd with a reset (SO_LINGER 0): its peer sees
// ECONNRESET and whatever was unsent is dropped.
func resetClose(fd int) {
	unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	unix.Close(fd)
}

// setStreamOptions sets what every proxied socket needs: TCP_NODELAY, so
// that a small message is forwarded at once (Nagle would hold it for the
// ACK of the last), and SO_KEEPALIVE at the kernel's timings (see
// keepAlive). Set on a listening socket, both pass to the sockets it
// accepts.
func setStreamOptions(fd int) {
	unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1)
}

// addrPortOf is the address and port of a socket address.
func addrPortOf(sa unix.Sockaddr) netip.AddrPort {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port))
	}
	return netip.AddrPort{}
}

// expired reports whether c has been idle too long at now: no byte moved
// either way for the idle timeout, or, once one direction has finished,
// for the half-close timeout.
func (c *tcpConn) expired(now time.Time) bool {
	period := c.idleTimeout
	if c.dirs[toBackend].finished || c.dirs[fromBackend].finished {
		period = c.halfCloseTimeout
	}
	return !c.connecting && period > 0 && now.Sub(c.active) >= period
}

// abort asks c's loop to reset both its sockets, from any goroutine: each
// peer sees ECONNRESET, not a clean end.
func (c *tcpConn) abort() {
	c.loop.post(func(l *loop) { l.end(c, true) })
}

// tcpEvents are what a loop asks epoll about a connection's sockets:
// readable, writable (which is also how a connect reports it finished),
// and the peer's FIN.
const tcpEvents = unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP

// carry hands c, still dialing, to loop l, from l's own goroutine (the one
// that accepted c). It reports false when l has stopped.
func (c *tcpConn) carry(l *loop) bool {
	c.loop = l
	if !l.add(c, tcpEvents, func(slot, gen int32) { c.slot, c.gen = slot, gen }, c.fds[:]...) {
		return false
	}
	l.dialing = append(l.dialing, c) // for the attempt's deadline
	return true
}
