package userspace

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/balancer"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/service"
)

// tcpListener accepts the connections that iptables redirects to one TCP
// service port.
type tcpListener struct {
	set  *Listeners
	name service.PortName
	ln   *net.TCPListener
	bal  balancer.Balancer
	log  logrus.FieldLogger
}

func (ls *Listeners) openTCP(p *service.Port) (listener, error) {
	bind := ls.cfg.bindAddress()
	var ln *net.TCPListener
	_, err := ls.cfg.Ports.Allocate(func(port int) (int, error) {
		var err error
		ln, err = net.ListenTCP("tcp4", net.TCPAddrFromAddrPort(netip.AddrPortFrom(bind, uint16(port))))
		if err != nil {
			return 0, err
		}
		return ln.Addr().(*net.TCPAddr).Port, nil
	})
	if err != nil {
		return nil, err
	}
	l := &tcpListener{set: ls, name: p.Name, ln: ln, log: ls.log.WithField("service", p.Name.String())}
	ls.goroutine(l.serve)
	return l, nil
}

func (l *tcpListener) port() int                    { return l.ln.Addr().(*net.TCPAddr).Port }
func (l *tcpListener) balancer() *balancer.Balancer { return &l.bal }
func (l *tcpListener) update(p *service.Port)       { l.bal.Update(p.Endpoints, p.Affinity) }
func (l *tcpListener) close()                       { l.ln.Close() }

// serve is the accept loop. It never waits for a dial: each connection gets
// a goroutine of its own at once (the legacy proxier dialed in this loop, so
// one dead pod stalled every client of the Service for up to 3.75s).
func (l *tcpListener) serve() {
	failures := 0
	for {
		c, err := l.ln.AcceptTCP()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			// EMFILE and friends: back off and try again instead of
			// crashing the node's Service traffic as upstream did.
			l.log.WithError(err).Warn("Accept failed; backing off")
			time.Sleep(acceptBackoff(failures))
			failures++
			continue
		}
		failures = 0
		if !l.set.track(c) {
			c.Close()
			return
		}
		l.set.goroutine(func() { l.handle(c) })
	}
}

// handle proxies one accepted client connection: choose an endpoint, dial it
// (the next endpoint on failure), then copy bytes both ways.
func (l *tcpListener) handle(client *net.TCPConn) {
	defer l.set.untrack(client)
	defer client.Close()

	clientIP := client.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
	choice := l.bal.Pick(clientIP)
	if choice.Len() == 0 {
		// No endpoint: refuse at once. A zero linger makes Close send a
		// RST, so the client sees "connection reset" before any data
		// instead of waiting on a connection that will never answer.
		client.SetLinger(0)
		l.log.WithField("client", client.RemoteAddr()).Debug("Refused connection: service has no endpoints")
		return
	}
	backend, endpoint, err := l.dial(l.set.ctx, choice)
	if err != nil {
		client.SetLinger(0)
		l.log.WithError(err).WithField("client", client.RemoteAddr()).Warn("Dropped connection: no endpoint answered")
		return
	}
	defer l.set.untrack(backend)
	defer backend.Close()
	if !l.set.track(backend) {
		return
	}
	if endpoint != choice.Endpoint(0) {
		l.bal.Connected(clientIP, endpoint)
	}
	l.log.WithFields(logrus.Fields{"client": client.RemoteAddr(), "endpoint": endpoint}).Trace("Proxying connection")
	splice(client, backend, l.set.cfg.halfCloseTimeout())
}

// dial tries the endpoints of choice in order, one per timeout of
// Config.DialTimeouts, and returns the first connection that succeeds.
func (l *tcpListener) dial(ctx context.Context, choice balancer.Choice) (*net.TCPConn, netip.AddrPort, error) {
	var errs []error
	for attempt, timeout := range l.set.cfg.dialTimeouts() {
		ep := choice.Endpoint(attempt)
		d := net.Dialer{Timeout: timeout}
		c, err := d.DialContext(ctx, "tcp", ep.String())
		if err == nil {
			return c.(*net.TCPConn), ep, nil
		}
		errs = append(errs, err)
		l.log.WithError(err).WithField("endpoint", ep).Debug("Dial failed; trying the next endpoint")
		if ctx.Err() != nil {
			break
		}
	}
	return nil, netip.AddrPort{}, errors.Join(errs...)
}

// splice copies bytes both ways between a and b until both directions are
// done, then closes both. Between two bare *net.TCPConn, io.Copy uses
// splice(2) on Linux: the bytes go from socket to socket through a kernel
// pipe and never into our memory.
//
// A direction that ends cleanly (EOF) forwards the half-close: the other
// side's write half is shut, so a client that sends a request and shuts its
// write side still receives the whole reply. From then on the remaining
// direction has halfCloseTimeout to finish, so a peer that never closes
// cannot leak both sockets forever. An error in either direction closes both.
func splice(a, b *net.TCPConn, halfCloseTimeout time.Duration) {
	errc := make(chan error, 2)
	go proxyCopy(errc, b, a)
	go proxyCopy(errc, a, b)
	if err := <-errc; err != nil {
		a.Close()
		b.Close()
	} else {
		deadline := time.Now().Add(halfCloseTimeout)
		a.SetDeadline(deadline)
		b.SetDeadline(deadline)
	}
	<-errc
}

// proxyCopy copies from src to dst and reports how it ended. It is a named
// function, not a closure, so that goroutine dumps say what it is.
func proxyCopy(errc chan<- error, dst, src *net.TCPConn) {
	_, err := io.Copy(dst, src)
	if err == nil {
		err = dst.CloseWrite()
	}
	errc <- err
}
