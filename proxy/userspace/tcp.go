package userspace

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"time"

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
			s.l.log.WithError(err).Warn("Accept failed; backing off")
			s.l.m.acceptErrs.Inc()
			time.Sleep(acceptBackoff(failures))
			failures++
			continue
		}
		failures = 0
		s.l.set.goroutine(func() { s.l.handle(c) })
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
	backend, endpoint, err := l.dial(l.set.ctx, choice)
	if err != nil {
		client.SetLinger(0)
		l.m.dialError.Inc()
		l.log.WithError(err).WithField("client", client.RemoteAddr()).Warn("Dropped connection: no endpoint answered")
		return
	}
	defer backend.Close()
	if !l.set.track(client, backend) {
		return // the set is closing
	}
	defer l.set.untrack(client)
	if endpoint != choice.Endpoint(0) {
		l.bal.Connected(clientIP, endpoint)
	}
	l.m.ok.Inc()
	l.m.active.Inc()
	toBackend, fromBackend := splice(client, backend, l.set.cfg.halfCloseTimeout())
	l.m.active.Dec()
	l.m.toBackend.Add(float64(toBackend))
	l.m.fromBackend.Add(float64(fromBackend))
}

// dial tries the endpoints of choice in order, one per timeout of
// Config.DialTimeouts, and returns the first connection that succeeds.
func (l *portListener) dial(ctx context.Context, choice balancer.Choice) (*net.TCPConn, netip.AddrPort, error) {
	var errs []error
	for attempt, timeout := range l.set.cfg.dialTimeouts() {
		ep := choice.Endpoint(attempt)
		d := net.Dialer{Timeout: timeout, KeepAliveConfig: keepAlive}
		c, err := d.DialContext(ctx, "tcp", ep.String())
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

// splice copies bytes both ways between a and b until both directions are
// done. Between two bare *net.TCPConn, io.Copy uses splice(2) on Linux: the
// bytes go from socket to socket through a kernel pipe and never into our
// memory. One direction runs in a goroutine of its own, the other in the
// caller's. It returns the bytes copied from a to b and from b to a.
func splice(a, b *net.TCPConn, halfCloseTimeout time.Duration) (aToB, bToA int64) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		aToB = proxyCopy(b, a, halfCloseTimeout)
	}()
	bToA = proxyCopy(a, b, halfCloseTimeout)
	<-done
	return aToB, bToA
}

// proxyCopy copies one direction, from src to dst, and decides what its end
// means for the connection.
//
// A clean end (EOF) is forwarded as a half-close: dst's write side is shut,
// so a client that sends a request and shuts its write side still receives
// the whole reply. From then on the other direction has halfCloseTimeout to
// finish, so a peer that never closes cannot hold both sockets forever
// (kubernetes#18354). An error closes both connections, which ends the other
// direction too. It returns the bytes copied.
func proxyCopy(dst, src *net.TCPConn, halfCloseTimeout time.Duration) int64 {
	n, err := io.Copy(dst, src)
	if err == nil {
		err = dst.CloseWrite()
	}
	if err != nil {
		src.Close()
		dst.Close()
		return n
	}
	deadline := time.Now().Add(halfCloseTimeout)
	src.SetDeadline(deadline)
	dst.SetDeadline(deadline)
	return n
}
