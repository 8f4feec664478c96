package userspace

import (
	"container/list"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/balancer"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// udpSocket serves one UDP service port at one address. UDP has no
// connections, so the proxy makes sessions: the first datagram from a
// client ip:port picks an endpoint and opens a socket connected to it;
// later datagrams from that client go the same way, and the endpoint's
// replies are sent back to the client from the service socket. A session
// ends after Config.UDPTimeout without traffic either way, or when its
// endpoint goes away.
//
// The service socket and all its sessions' sockets are carried by one loop
// (loop.go), which alone reads and writes them: datagrams are read in
// batches (recvmmsg) into the loop's buffers, and forwarded with raw,
// non-blocking system calls; an idle session holds its socket and this
// struct, no goroutine and no buffer.
type udpSocket struct {
	fd    int // the service socket
	bound netip.AddrPort
	dst   pktinfo // reads and writes the datagrams' local address
	set   *Listeners
	bal   *balancer.Balancer
	log   logrus.FieldLogger
	m     *protoMetrics
	loop  *loop
	slot  int32
	ended bool // closed, on the loop

	queued bool // on the loop's again list

	mu       sync.Mutex // guards sessions and lru for Sessions; all changes are made on the loop
	sessions map[netip.AddrPort]*udpSession
	lru      list.List // of *udpSession, the one the client used least recently first
}

// udpSession is one client's flow through the service port.
type udpSession struct {
	u        *udpSocket
	client   netip.AddrPort
	local    netip.Addr // the address the client sent to: replies come from it
	endpoint netip.AddrPort
	fd       int           // connected to endpoint
	last     time.Time     // of the last datagram either way
	elem     *list.Element // in udpSocket.lru; nil once removed
	slot     int32
	// reply is the sendmsg header of a reply to the client: its address,
	// and the IP_PKTINFO / IPV6_PKTINFO control message that sends it
	// from local.
	reply  unix.Msghdr
	iov    unix.Iovec // the payload of reply: the loop's buffer
	to     unix.RawSockaddrAny
	oob    []byte
	queued bool
}

func (l *portListener) listenUDP(addr netip.AddrPort) (socket, error) {
	fd, bound, err := openUDP(addr)
	if err != nil {
		return nil, err
	}
	return l.serveUDP(fd, bound)
}

// openUDP opens a service port's UDP socket at addr, ready for a loop: its
// descriptor, detached from Go's poller, and the address it got.
func openUDP(addr netip.AddrPort) (int, netip.AddrPort, error) {
	c, err := ListenConfig.ListenPacket(context.Background(), network("udp", addr.Addr()), addr.String())
	if err != nil {
		return -1, netip.AddrPort{}, err
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
	if err := pktinfoFor(addr.Addr()).enable(pc); err != nil {
		pc.Close()
		return -1, netip.AddrPort{}, err
	}
	bound := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	fd, err := detachFD(pc)
	if err != nil {
		return -1, netip.AddrPort{}, err
	}
	return fd, bound, nil
}

// serveUDP has a loop read the service socket fd, bound at bound: one just
// opened, or one a previous process served (carry.go); either way the
// kernel already attaches each datagram's destination (IP_PKTINFO), an
// option of the socket.
func (l *portListener) serveUDP(fd int, bound netip.AddrPort) (socket, error) {
	u := &udpSocket{
		fd:       fd,
		bound:    bound,
		dst:      pktinfoFor(bound.Addr()),
		set:      l.set,
		bal:      &l.bal,
		log:      l.log,
		m:        l.m,
		sessions: make(map[netip.AddrPort]*udpSession),
	}
	u.loop = l.set.loop()
	if !u.loop.add(u, unix.EPOLLIN, func(slot, _ int32) { u.slot = slot }, fd) {
		unix.Close(fd)
		return nil, errors.New("listeners are closed, or epoll refused the socket")
	}
	return u, nil
}

func (u *udpSocket) addr() netip.AddrPort { return u.bound }
func (u *udpSocket) descriptor() int      { return u.fd }

// endpointsChanged ends the sessions of endpoints that are gone, so that the
// client's next datagram picks a live one instead of being sent to a pod that
// no longer exists.
func (u *udpSocket) endpointsChanged() {
	u.loop.do(func(l *loop) {
		for _, s := range u.sessions {
			if !u.bal.Has(s.endpoint) {
				u.remove(l, s)
			}
		}
	})
}

// close closes the service socket and every session: without the service
// socket no reply could reach a client anyway. It returns once the socket
// is closed, so that its address can be bound again at once.
func (u *udpSocket) close() {
	u.loop.do(func(l *loop) { u.stop(l) })
}

func (u *udpSocket) stop(l *loop) {
	if u.ended {
		return
	}
	u.ended = true
	for _, s := range u.sessions {
		u.remove(l, s)
	}
	unix.Close(u.fd)
	l.remove(u.slot)
}

// remove ends session s: it gives back its place in the node's budget and
// closes its socket. On the loop; s is present.
func (u *udpSocket) remove(l *loop, s *udpSession) {
	u.mu.Lock()
	delete(u.sessions, s.client)
	u.lru.Remove(s.elem)
	u.mu.Unlock()
	s.elem = nil
	u.set.udpSessions.Add(-1)
	u.m.active.Dec()
	unix.Close(s.fd)
	l.remove(s.slot)
}

// makeRoom makes room for one more session, within the per-port cap and
// the node-wide one, evicting this port's least recently used session when
// either is reached. It reports false when the node-wide cap is reached
// and this port has no session to give up.
func (u *udpSocket) makeRoom(l *loop) bool {
	cfg := &u.set.cfg
	if len(u.sessions) >= cfg.udpMaxSessionsPerPort() {
		u.evictOldest(l)
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
		u.evictOldest(l)
	}
}

func (u *udpSocket) evictOldest(l *loop) {
	u.remove(l, u.lru.Front().Value.(*udpSession))
	u.m.evicted.Inc()
}

// Sessions is the number of live UDP sessions of the socket.
func (u *udpSocket) Sessions() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.sessions)
}

// event: client datagrams are waiting on the service socket.
func (u *udpSocket) event(l *loop, _ int, _ uint32) { u.read(l) }

func (u *udpSocket) resume(l *loop) {
	u.queued = false
	u.read(l)
}

func (u *udpSocket) tick(*loop) {} // its sessions tick on their own

// read reads the client datagrams waiting on the service socket, a batch
// at a time, and forwards each through its session. A read error other
// than an empty socket is logged and counted; the next datagram wakes the
// loop again (kubernetes#13709: an error never silently ends the service).
func (u *udpSocket) read(l *loop) {
	for range fairShare {
		if u.ended {
			return
		}
		n, err := l.udp.recv(u.fd)
		if err == unix.EAGAIN {
			return
		}
		if err != nil {
			u.set.logListenErr.Log(u.log.WithError(err), func(e *logrus.Entry) { e.Warn("UDP read failed") })
			u.m.acceptErrs.Inc()
			return
		}
		for i := range n {
			client, local, b := l.udp.datagram(i, u.dst)
			u.forward(l, client, local, b)
		}
		if n < len(l.udp.msgs) {
			return // the batch was not full: the socket is empty
		}
	}
	l.queue(u, &u.queued)
}

// forward sends one client datagram to the client's session, making the
// session first if there is none or the old one has failed.
func (u *udpSocket) forward(l *loop, client netip.AddrPort, local netip.Addr, b []byte) {
	for range 2 {
		s := u.session(l, client, local)
		if s == nil {
			return // no endpoint: the datagram is dropped, as upstream did
		}
		s.last = l.now
		if _, err := rawRW(unix.SYS_WRITE, s.fd, b); err == nil || err == unix.EAGAIN {
			// EAGAIN: the socket's send buffer is full, and UDP may
			// drop: so would the network.
			u.m.toBackend.Add(float64(len(b)))
			return
		}
		u.remove(l, s) // a broken session (ECONNREFUSED); the second round makes a new one
	}
}

// session returns client's session, making it if needed. Making one dials
// no one: connecting a UDP socket only records the peer address, so it is
// quick and safe to do in the loop.
func (u *udpSocket) session(l *loop, client netip.AddrPort, local netip.Addr) *udpSession {
	if s, ok := u.sessions[client]; ok {
		u.mu.Lock()
		u.lru.MoveToBack(s.elem)
		u.mu.Unlock()
		return s
	}
	// A new client needs room first, so that a flood of new sources
	// costs no socket once the node is full.
	if !u.makeRoom(l) {
		u.m.refused.Inc()
		return nil
	}
	s := u.dialSession(client, local)
	if s == nil {
		u.set.udpSessions.Add(-1) // the room taken goes back
		return nil
	}
	if !l.add(s, unix.EPOLLIN, func(slot, _ int32) { s.slot = slot }, s.fd) {
		unix.Close(s.fd)
		u.set.udpSessions.Add(-1)
		return nil
	}
	s.last = l.now
	u.mu.Lock()
	u.sessions[client] = s
	s.elem = u.lru.PushBack(s)
	u.mu.Unlock()
	u.m.ok.Inc()
	u.m.active.Inc()
	return s
}

// dialSession opens the socket of a new session to an endpoint, the next
// one if that fails, or returns nil.
func (u *udpSocket) dialSession(client netip.AddrPort, local netip.Addr) *udpSession {
	choice := u.bal.Pick(client.Addr())
	if choice.Len() == 0 {
		u.m.noEndpoints.Inc()
		return nil
	}
	for attempt := range choice.Len() {
		ep := choice.Endpoint(attempt)
		fd, err := u.set.connectFrom(u.log, service.UDP, client, ep)
		if attempt > 0 {
			u.m.dialRetries.Inc()
		}
		if err != nil {
			u.m.dialErrors.Inc()
			u.log.WithError(err).WithField("endpoint", ep).Debug("UDP connect failed; trying the next endpoint")
			continue
		}
		if ep != choice.Endpoint(0) {
			u.bal.Connected(client.Addr(), ep)
		}
		s := &udpSession{u: u, client: client, local: local, endpoint: ep, fd: fd}
		if local.IsValid() {
			s.oob = u.dst.source(local)
		}
		s.prepareReply()
		return s
	}
	u.m.dialError.Inc()
	return nil
}

// prepareReply builds the sendmsg header every reply of the session uses.
func (s *udpSession) prepareReply() {
	ip := s.client.Addr()
	if ip.Is4() && !s.u.bound.Addr().Is6() {
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(&s.to))
		sa.Family = unix.AF_INET
		sa.Addr = ip.As4()
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:], s.client.Port())
		s.reply.Namelen = unix.SizeofSockaddrInet4
	} else {
		sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(&s.to))
		sa.Family = unix.AF_INET6
		sa.Addr = netip.AddrFrom16(ip.As16()).As16()
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:], s.client.Port())
		s.reply.Namelen = unix.SizeofSockaddrInet6
	}
	s.reply.Name = (*byte)(unsafe.Pointer(&s.to))
	if len(s.oob) > 0 {
		s.reply.Control = &s.oob[0]
		s.reply.SetControllen(len(s.oob))
	}
}

// event: the endpoint's replies are waiting on the session's socket.
func (s *udpSession) event(l *loop, _ int, _ uint32) { s.relay(l) }

func (s *udpSession) resume(l *loop) {
	s.queued = false
	s.relay(l)
}

// tick ends the session once it has been idle for the UDP timeout.
func (s *udpSession) tick(l *loop) {
	if s.elem != nil && l.now.Sub(s.last) >= s.u.set.cfg.udpTimeout() {
		s.u.m.expired.Inc()
		s.u.remove(l, s)
	}
}

func (s *udpSession) stop(l *loop) {
	if s.elem != nil {
		s.u.remove(l, s)
	}
}

// relay sends the datagrams waiting on the session's socket to the client,
// from the service socket. An error reading (ECONNREFUSED: the endpoint
// answered with ICMP port unreachable) ends the session; the next datagram
// from the client starts a new one.
func (s *udpSession) relay(l *loop) {
	buf := l.udp.buffer(0)
	s.iov.Base = &buf[0]
	s.reply.Iov = &s.iov
	s.reply.SetIovlen(1)
	for range fairShare {
		if s.elem == nil {
			return
		}
		n, err := rawRW(unix.SYS_READ, s.fd, buf)
		switch {
		case err == unix.EAGAIN:
			return
		case err != nil:
			s.u.remove(l, s)
			return
		}
		s.last = l.now
		s.u.m.fromBackend.Add(float64(n))
		s.iov.SetLen(n)
		if err := rawSendmsg(s.u.fd, &s.reply); err != nil && err != unix.EAGAIN {
			s.u.log.WithError(err).WithField("client", s.client).Debug("UDP reply not delivered")
		}
	}
	l.queue(s, &s.queued)
}

// detachFD returns a descriptor of c's socket that the Go runtime does
// not know, and closes c: closing takes the original out of the runtime's
// poller, so that it never wakes for this socket again.
func detachFD(c syscall.Conn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd, derr := -1, error(nil)
	if err := rc.Control(func(s uintptr) { fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, fmt.Errorf("duplicate a socket: %w", derr)
	}
	c.(io.Closer).Close() // the socket stays open through fd
	return fd, nil
}
