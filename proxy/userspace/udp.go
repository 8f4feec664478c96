package userspace

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/net/ipv4"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/balancer"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/service"
)

// maxDatagram is the largest UDP payload over IPv4. Upstream read into 4 KiB
// buffers and silently truncated larger datagrams (kubernetes#47659).
const maxDatagram = 64 * 1024

// udpListener serves one UDP service port. UDP has no connections, so the
// proxy makes sessions: the first datagram from a client ip:port picks an
// endpoint and opens a socket connected to it; later datagrams from that
// client go the same way, and the endpoint's replies are sent back to the
// client from the service socket. A session ends after Config.UDPTimeout
// without traffic either way, or when its endpoint goes away.
type udpListener struct {
	set  *Listeners
	name service.PortName
	pc   *net.UDPConn
	bal  balancer.Balancer
	log  logrus.FieldLogger

	mu       sync.Mutex
	sessions map[netip.AddrPort]*udpSession
	closed   bool
}

// udpSession is one client's flow through the service port.
type udpSession struct {
	client   netip.AddrPort
	local    netip.Addr // the address the client sent to: replies come from it
	oob      []byte     // the IP_PKTINFO control message that says so
	endpoint netip.AddrPort
	backend  *net.UDPConn // connected to endpoint
	last     atomic.Int64 // unix nanoseconds of the last datagram either way
}

func (s *udpSession) touch() { s.last.Store(time.Now().UnixNano()) }

func (ls *Listeners) openUDP(p *service.Port) (listener, error) {
	bind := ls.cfg.bindAddress()
	var pc *net.UDPConn
	_, err := ls.cfg.Ports.Allocate(func(port int) (int, error) {
		var err error
		pc, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(bind, uint16(port))))
		if err != nil {
			return 0, err
		}
		return pc.LocalAddr().(*net.UDPAddr).Port, nil
	})
	if err != nil {
		return nil, err
	}
	// Ask the kernel for each datagram's destination address (IP_PKTINFO),
	// so that replies leave from the very address the client sent to. This is
	// what makes REDIRECT right for UDP from the node itself: a redirected
	// datagram arrives addressed to 127.0.0.1, and a reply from any other
	// source would not match the connection-tracking entry, so the kernel
	// could not rewrite it back to the ClusterIP and the client would drop
	// it. (Upstream worked around this with DNAT to a node IP.)
	if err := ipv4.NewPacketConn(pc).SetControlMessage(ipv4.FlagDst, true); err != nil {
		pc.Close()
		return nil, err
	}
	l := &udpListener{
		set:      ls,
		name:     p.Name,
		pc:       pc,
		log:      ls.log.WithField("service", p.Name.String()),
		sessions: make(map[netip.AddrPort]*udpSession),
	}
	ls.goroutine(l.serve)
	return l, nil
}

func (l *udpListener) port() int                    { return l.pc.LocalAddr().(*net.UDPAddr).Port }
func (l *udpListener) balancer() *balancer.Balancer { return &l.bal }

// update takes the new endpoints, and ends the sessions of endpoints that are
// gone, so that the client's next datagram picks a live one instead of being
// sent to a pod that no longer exists.
func (l *udpListener) update(p *service.Port) {
	l.bal.Update(p.Endpoints, p.Affinity)
	l.mu.Lock()
	defer l.mu.Unlock()
	for client, s := range l.sessions {
		if !l.bal.Has(s.endpoint) {
			s.backend.Close() // its reader sees the error and cleans up
			delete(l.sessions, client)
		}
	}
}

// close closes the service socket and every session: without the service
// socket no reply could reach a client anyway.
func (l *udpListener) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = true
	l.pc.Close()
	for client, s := range l.sessions {
		s.backend.Close()
		delete(l.sessions, client)
	}
}

// Sessions is the number of live UDP sessions.
func (l *udpListener) Sessions() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.sessions)
}

// serve reads client datagrams and forwards each through its session. A read
// error other than the socket being closed is logged and retried with a
// backoff: it never silently ends the service (kubernetes#13709).
func (l *udpListener) serve() {
	buf := make([]byte, maxDatagram)
	oob := ipv4.NewControlMessage(ipv4.FlagDst)
	var cm ipv4.ControlMessage
	failures := 0
	for {
		n, oobn, _, client, err := l.pc.ReadMsgUDPAddrPort(buf, oob)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			l.log.WithError(err).Warn("UDP read failed; backing off")
			time.Sleep(acceptBackoff(failures))
			failures++
			continue
		}
		failures = 0
		client = netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
		var local netip.Addr
		if cm.Parse(oob[:oobn]) == nil {
			local, _ = netip.AddrFromSlice(cm.Dst.To4())
		}
		l.forward(client, local, buf[:n])
	}
}

// forward sends one client datagram to the client's session, making the
// session first if there is none or the old one has failed.
func (l *udpListener) forward(client netip.AddrPort, local netip.Addr, b []byte) {
	for range 2 {
		s := l.session(client, local)
		if s == nil {
			return // no endpoint: the datagram is dropped, as upstream did
		}
		s.touch()
		if _, err := s.backend.Write(b); err == nil {
			return
		}
		l.end(s) // a broken session; the second round makes a new one
	}
}

// session returns client's session, making it if needed. Making one dials
// no one: connecting a UDP socket only records the peer address, so it is
// quick and safe to do in the read loop.
func (l *udpListener) session(client netip.AddrPort, local netip.Addr) *udpSession {
	l.mu.Lock()
	s, ok := l.sessions[client]
	closed := l.closed
	l.mu.Unlock()
	if ok || closed {
		return s
	}
	choice := l.bal.Pick(client.Addr())
	if choice.Len() == 0 {
		return nil
	}
	var backend *net.UDPConn
	var ep netip.AddrPort
	for attempt := range choice.Len() {
		ep = choice.Endpoint(attempt)
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(ep))
		if err == nil {
			backend = c
			break
		}
		l.log.WithError(err).WithField("endpoint", ep).Debug("UDP connect failed; trying the next endpoint")
	}
	if backend == nil {
		return nil
	}
	if ep != choice.Endpoint(0) {
		l.bal.Connected(client.Addr(), ep)
	}
	s = &udpSession{client: client, local: local, endpoint: ep, backend: backend}
	if local.IsValid() {
		s.oob = (&ipv4.ControlMessage{Src: local.AsSlice()}).Marshal()
	}
	s.touch()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		backend.Close()
		return nil
	}
	l.sessions[client] = s
	l.set.goroutine(func() { l.replies(s) })
	return s
}

// end removes s if it is still client's session, and closes it.
func (l *udpListener) end(s *udpSession) {
	l.mu.Lock()
	if l.sessions[s.client] == s {
		delete(l.sessions, s.client)
	}
	l.mu.Unlock()
	s.backend.Close()
}

// replies carries the endpoint's datagrams back to the client until the
// session has been idle for the UDP timeout or its socket is closed.
func (l *udpListener) replies(s *udpSession) {
	defer l.end(s)
	timeout := l.set.cfg.udpTimeout()
	buf := make([]byte, maxDatagram)
	// The read deadline is moved only when it fires, not for every
	// datagram: it costs a timer update, and most sessions are busy.
	s.backend.SetReadDeadline(time.Unix(0, s.last.Load()).Add(timeout))
	for {
		n, err := s.backend.Read(buf)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			last := time.Unix(0, s.last.Load())
			if time.Since(last) < timeout {
				s.backend.SetReadDeadline(last.Add(timeout))
				continue // the client sent something meanwhile
			}
			return
		}
		if err != nil {
			// Closed by update or close, or ECONNREFUSED: the endpoint
			// answered with ICMP port unreachable. Either way the next
			// datagram from the client starts a new session.
			return
		}
		s.touch()
		if _, _, err := l.pc.WriteMsgUDPAddrPort(buf[:n], s.oob, s.client); err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			l.log.WithError(err).WithField("client", s.client).Debug("UDP reply not delivered")
		}
	}
}
