package userspace

import (
	"container/list"
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/backoff"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/balancer"
)

// maxDatagram is the largest UDP payload over IPv4. Upstream read into 4 KiB
// buffers and silently truncated larger datagrams (kubernetes#47659).
const maxDatagram = 64 * 1024

// replyBuffers lend a maxDatagram buffer to a session for as long as it
// relays a burst of replies, and take it back when its socket is drained:
// an idle session holds no buffer (a buffer each made an idle session cost
// 129 KiB, so that spoofed sources could exhaust the node's memory).
var replyBuffers = sync.Pool{New: func() any { b := make([]byte, maxDatagram); return &b }}

// udpSocket serves one UDP service port at one address. UDP has no
// connections, so the
// proxy makes sessions: the first datagram from a client ip:port picks an
// endpoint and opens a socket connected to it; later datagrams from that
// client go the same way, and the endpoint's replies are sent back to the
// client from the service socket. A session ends after Config.UDPTimeout
// without traffic either way, or when its endpoint goes away.
type udpSocket struct {
	pc  *net.UDPConn
	dst pktinfo // reads and writes the datagrams' local address
	set *Listeners
	bal *balancer.Balancer
	log logrus.FieldLogger
	m   *protoMetrics

	mu       sync.Mutex
	sessions map[netip.AddrPort]*udpSession
	lru      list.List // of *udpSession, the one the client used least recently first
	closed   bool
}

// udpSession is one client's flow through the service port.
type udpSession struct {
	client   netip.AddrPort
	local    netip.Addr // the address the client sent to: replies come from it
	oob      []byte     // the IP_PKTINFO / IPV6_PKTINFO control message that says so
	endpoint netip.AddrPort
	backend  *net.UDPConn  // connected to endpoint
	last     atomic.Int64  // unix nanoseconds of the last datagram either way
	elem     *list.Element // in udpSocket.lru; nil once removed
}

func (s *udpSession) touch() { s.last.Store(time.Now().UnixNano()) }

func (l *portListener) listenUDP(addr netip.AddrPort) (socket, error) {
	c, err := ListenConfig.ListenPacket(context.Background(), network("udp", addr.Addr()), addr.String())
	if err != nil {
		return nil, err
	}
	pc := c.(*net.UDPConn)
	// Ask the kernel for each datagram's destination address (IP_PKTINFO,
	// IPV6_PKTINFO), so that replies leave from the very address the client
	// sent to. This is what makes REDIRECT right for UDP from the node
	// itself: a redirected datagram arrives addressed to 127.0.0.1 (::1),
	// and a reply from any other source would not match the
	// connection-tracking entry, so the kernel could not rewrite it back to
	// the ClusterIP and the client would drop it. (Upstream worked around
	// this with DNAT to a node IP.)
	dst := pktinfoFor(addr.Addr())
	if err := dst.enable(pc); err != nil {
		pc.Close()
		return nil, err
	}
	s := &udpSocket{
		pc:       pc,
		dst:      dst,
		set:      l.set,
		bal:      &l.bal,
		log:      l.log,
		m:        l.m,
		sessions: make(map[netip.AddrPort]*udpSession),
	}
	l.set.goroutine(s.serve)
	return s, nil
}

func (u *udpSocket) addr() netip.AddrPort { return u.pc.LocalAddr().(*net.UDPAddr).AddrPort() }

// endpointsChanged ends the sessions of endpoints that are gone, so that the
// client's next datagram picks a live one instead of being sent to a pod that
// no longer exists.
func (u *udpSocket) endpointsChanged() {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, s := range u.sessions {
		if !u.bal.Has(s.endpoint) {
			u.remove(s) // its reader sees the error and returns
		}
	}
}

// close closes the service socket and every session: without the service
// socket no reply could reach a client anyway.
func (u *udpSocket) close() {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.closed = true
	u.pc.Close()
	for _, s := range u.sessions {
		u.remove(s)
	}
}

// remove takes s out of the socket's sessions, gives back its place in the
// node's budget and closes its backend socket. u.mu is held; s is present.
func (u *udpSocket) remove(s *udpSession) {
	delete(u.sessions, s.client)
	u.lru.Remove(s.elem)
	s.elem = nil
	u.set.udpSessions.Add(-1)
	s.backend.Close()
}

// makeRoom makes room for one more session, within the per-port cap and
// the node-wide one, evicting this port's least recently used session when
// either is reached. It reports false when the node-wide cap is reached
// and this port has no session to give up. u.mu is held.
func (u *udpSocket) makeRoom() bool {
	cfg := &u.set.cfg
	if len(u.sessions) >= cfg.udpMaxSessionsPerPort() {
		u.evictOldest()
	}
	for {
		n := u.set.udpSessions.Load()
		if n < int64(cfg.udpMaxSessions()) {
			if u.set.udpSessions.CompareAndSwap(n, n+1) {
				return true
			}
			continue
		}
		if u.lru.Len() == 0 {
			return false
		}
		u.evictOldest()
	}
}

func (u *udpSocket) evictOldest() {
	u.remove(u.lru.Front().Value.(*udpSession))
	u.m.evicted.Inc()
}

// Sessions is the number of live UDP sessions of the socket.
func (u *udpSocket) Sessions() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.sessions)
}

// serve reads client datagrams and forwards each through its session. A read
// error other than the socket being closed is logged and retried with a
// backoff: it never silently ends the service (kubernetes#13709).
func (u *udpSocket) serve() {
	buf := make([]byte, maxDatagram)
	oob := u.dst.buffer()
	failures := 0
	for {
		n, oobn, _, client, err := u.pc.ReadMsgUDPAddrPort(buf, oob)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			u.set.logListenErr.Log(u.log.WithError(err), func(e *logrus.Entry) { e.Warn("UDP read failed; backing off") })
			u.m.acceptErrs.Inc()
			time.Sleep(backoff.Accept(failures))
			failures++
			continue
		}
		failures = 0
		client = netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
		u.forward(client, u.dst.parse(oob[:oobn]), buf[:n])
	}
}

// forward sends one client datagram to the client's session, making the
// session first if there is none or the old one has failed.
func (u *udpSocket) forward(client netip.AddrPort, local netip.Addr, b []byte) {
	for range 2 {
		s := u.session(client, local)
		if s == nil {
			return // no endpoint: the datagram is dropped, as upstream did
		}
		s.touch()
		if _, err := s.backend.Write(b); err == nil {
			u.m.toBackend.Add(float64(len(b)))
			return
		}
		u.end(s) // a broken session; the second round makes a new one
	}
}

// session returns client's session, making it if needed. Making one dials
// no one: connecting a UDP socket only records the peer address, so it is
// quick and safe to do in the read loop.
func (u *udpSocket) session(client netip.AddrPort, local netip.Addr) *udpSession {
	u.mu.Lock()
	s, ok := u.sessions[client]
	if ok {
		u.lru.MoveToBack(s.elem)
	}
	closed := u.closed
	// A new client needs room first, so that a flood of new sources
	// costs no socket once the node is full.
	room := !ok && !closed && u.makeRoom()
	u.mu.Unlock()
	if ok || closed {
		return s
	}
	if !room {
		u.m.refused.Inc()
		return nil
	}
	made := false
	defer func() {
		if !made {
			u.set.udpSessions.Add(-1) // the room taken goes back
		}
	}()
	choice := u.bal.Pick(client.Addr())
	if choice.Len() == 0 {
		u.m.noEndpoints.Inc()
		return nil
	}
	var backend *net.UDPConn
	var ep netip.AddrPort
	for attempt := range choice.Len() {
		ep = choice.Endpoint(attempt)
		c, err := u.set.dialFrom(u.set.ctx, u.log, "udp", client, ep, 0)
		if attempt > 0 {
			u.m.dialRetries.Inc()
		}
		if err == nil {
			backend = c.(*net.UDPConn)
			break
		}
		u.m.dialErrors.Inc()
		u.log.WithError(err).WithField("endpoint", ep).Debug("UDP connect failed; trying the next endpoint")
	}
	if backend == nil {
		u.m.dialError.Inc()
		return nil
	}
	if ep != choice.Endpoint(0) {
		u.bal.Connected(client.Addr(), ep)
	}
	s = &udpSession{client: client, local: local, endpoint: ep, backend: backend}
	if local.IsValid() {
		s.oob = u.dst.source(local)
	}
	s.touch()
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		backend.Close()
		return nil
	}
	made = true
	u.sessions[client] = s
	s.elem = u.lru.PushBack(s)
	u.m.ok.Inc()
	u.m.active.Inc()
	u.set.goroutine(func() {
		defer u.m.active.Dec()
		u.replies(s)
	})
	return s
}

// end removes s if it is still client's session, and closes it.
func (u *udpSocket) end(s *udpSession) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if s.elem != nil {
		u.remove(s)
	}
}

// replies carries the endpoint's datagrams back to the client until the
// session has been idle for the UDP timeout or its socket is closed. While
// it waits it holds no buffer: it parks in the runtime's poller until the
// socket is readable, and only then borrows one (see relay).
func (u *udpSocket) replies(s *udpSession) {
	defer u.end(s)
	timeout := u.set.cfg.udpTimeout()
	rc, err := s.backend.SyscallConn()
	if err != nil {
		return
	}
	// The read deadline is moved only when it fires, not for every
	// datagram: it costs a timer update, and most sessions are busy.
	s.backend.SetReadDeadline(time.Unix(0, s.last.Load()).Add(timeout))
	for {
		var relayErr error
		err := rc.Read(func(fd uintptr) bool {
			relayErr = u.relay(s, int(fd))
			return relayErr != nil // nil: drained, wait for more
		})
		if errors.Is(err, os.ErrDeadlineExceeded) {
			last := time.Unix(0, s.last.Load())
			if time.Since(last) < timeout {
				s.backend.SetReadDeadline(last.Add(timeout))
				continue // the client sent something meanwhile
			}
			u.m.expired.Inc()
			return
		}
		if err != nil || relayErr != nil {
			// Closed by an update, an eviction or close, or
			// ECONNREFUSED: the endpoint answered with ICMP port
			// unreachable. Either way the next datagram from the
			// client starts a new session.
			return
		}
	}
}

// relay sends every datagram waiting on the session's socket fd to the
// client, through one pooled buffer, and returns nil once the socket is
// drained, or the error that ends the session.
func (u *udpSocket) relay(s *udpSession, fd int) error {
	bp := replyBuffers.Get().(*[]byte)
	defer replyBuffers.Put(bp)
	buf := *bp
	for {
		n, err := unix.Read(fd, buf)
		switch {
		case err == unix.EAGAIN:
			return nil
		case err == unix.EINTR:
			continue
		case err != nil:
			return err
		}
		s.touch()
		u.m.fromBackend.Add(float64(n))
		if _, _, err := u.pc.WriteMsgUDPAddrPort(buf[:n], s.oob, s.client); err != nil {
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			u.log.WithError(err).WithField("client", s.client).Debug("UDP reply not delivered")
		}
	}
}
