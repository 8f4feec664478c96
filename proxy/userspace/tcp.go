package userspace

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

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
			if !s.l.handle(c) {
				s.l.set.releaseTCP(s.l)
			}
		})
	}
}

// handle proxies one accepted client connection: choose an endpoint, dial it
// (the next endpoint on failure), then hand both sockets to a loop, which
// copies bytes both ways. It reports whether the connection was handed
// over; if so, its place under the connection bounds is given back when it
// ends, else the caller gives it back.
func (l *portListener) handle(client *net.TCPConn) bool {
	clientIP := client.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
	choice := l.bal.Pick(clientIP)
	if choice.Len() == 0 {
		// No endpoint: refuse at once. A zero linger makes Close send a
		// RST, so the client sees "connection reset" before any data
		// instead of waiting on a connection that will never answer.
		client.SetLinger(0)
		client.Close()
		l.m.noEndpoints.Inc()
		l.log.WithField("client", client.RemoteAddr()).Debug("Refused connection: service has no endpoints")
		return false
	}
	backend, endpoint, err := l.dial(l.set.ctx, choice, client.RemoteAddr().(*net.TCPAddr).AddrPort())
	if err != nil {
		client.SetLinger(0)
		client.Close()
		l.m.dialError.Inc()
		l.set.logDropped.Log(l.log.WithError(err).WithField("client", client.RemoteAddr()), func(e *logrus.Entry) {
			e.Warn("Dropped connection: no endpoint answered")
		})
		return false
	}
	if l.proxyProtocol.Load() {
		if err := sendProxyHeader(client, backend); err != nil {
			for _, c := range []*net.TCPConn{client, backend} {
				c.SetLinger(0)
				c.Close()
			}
			l.m.dialError.Inc()
			l.log.WithError(err).WithField("endpoint", endpoint).Debug("Dropped connection")
			return false
		}
	}
	if endpoint != choice.Endpoint(0) {
		l.bal.Connected(clientIP, endpoint)
	}
	var conn *tcpConn // for its end, which comes once the loop has it
	conn, err = newTCPConn(client, backend, l.set.cfg.TCPIdleTimeout, l.set.cfg.halfCloseTimeout(), func(up, down int64) {
		l.m.active.Dec()
		l.m.toBackend.Add(float64(up))
		l.m.fromBackend.Add(float64(down))
		l.set.untrack(conn)
		l.set.releaseTCP(l)
	})
	if err != nil {
		client.Close()
		backend.Close()
		l.log.WithError(err).WithField("endpoint", endpoint).Debug("Dropped connection")
		return false // a socket closed under us, or out of descriptors
	}
	l.m.ok.Inc()
	l.m.active.Inc()
	if !l.set.track(conn) {
		conn.close() // the set is closing
		l.m.active.Dec()
		return false
	}
	return true
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
// fds[d] and writes to the other socket.
const (
	toBackend   = 0 // client to pod: reads the client's socket
	fromBackend = 1 // pod to client: reads the backend's socket
)

// tcpConn is one proxied connection: the client's socket and the one we
// opened to the pod, carried by a loop (loop.go), which alone touches its
// sockets and state once it has been added.
type tcpConn struct {
	fds               [2]int  // [toBackend] the client's, [fromBackend] the backend's
	dirs              [2]flow // [d] direction d
	canRead, canWrite [2]bool // by socket: epoll said so, and no call has found it empty since
	drain             [2]bool // by socket: its peer has shut its side: read to EOF
	active            time.Time
	idleTimeout       time.Duration // 0: none while both directions run
	halfCloseTimeout  time.Duration
	ended             bool
	queued            bool // on its loop's again list
	loop              *loop
	slot              int32                // its place in the loop
	done              func(up, down int64) // called by the loop once it has ended
}

// newTCPConn takes the sockets of client and backend away from the Go
// runtime, to be carried by a loop: each is duplicated and the original
// closed, which also takes it out of the runtime's poller, so that the
// runtime never wakes for them again. done is called when the connection
// has ended.
func newTCPConn(client, backend *net.TCPConn, idle, halfClose time.Duration, done func(up, down int64)) (*tcpConn, error) {
	c := &tcpConn{idleTimeout: idle, halfCloseTimeout: halfClose, active: time.Now(), done: done}
	for side, s := range []*net.TCPConn{client, backend} {
		fd, err := detachFD(s)
		if err != nil {
			if side == fromBackend {
				unix.Close(c.fds[toBackend])
			}
			return nil, err
		}
		c.fds[side] = fd
	}
	return c, nil
}

// close closes a connection that no loop carries, with a reset.
func (c *tcpConn) close() {
	for _, fd := range c.fds {
		unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
		unix.Close(fd)
	}
}

// expired reports whether c has been idle too long at now: no byte moved
// either way for the idle timeout, or, once one direction has finished,
// for the half-close timeout.
func (c *tcpConn) expired(now time.Time) bool {
	period := c.idleTimeout
	if c.dirs[toBackend].finished || c.dirs[fromBackend].finished {
		period = c.halfCloseTimeout
	}
	failed := c.dirs[toBackend].failed || c.dirs[fromBackend].failed
	return failed || period > 0 && now.Sub(c.active) >= period
}

// abort asks c's loop to reset both its sockets, from any goroutine: each
// peer sees ECONNRESET, not a clean end.
func (c *tcpConn) abort() {
	c.loop.post(func(l *loop) { l.end(c, true) })
}

// carry hands c to loop l. It reports false when l has stopped.
func (c *tcpConn) carry(l *loop) bool {
	c.loop = l
	return l.add(c, unix.EPOLLIN|unix.EPOLLOUT|unix.EPOLLRDHUP, func(slot, gen int32) { c.slot = slot }, c.fds[:]...)
}
