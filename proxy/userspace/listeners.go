// Package userspace is where Service traffic is carried: one listener per
// service port on the node, round robin over the endpoints, and the bytes
// copied between the client's connection and a new connection to the chosen
// pod. This is the "userspace" in the legacy kube-proxy mode of that name
// (pkg/proxy/userspace): the kernel only redirects packets to our listeners
// (see package iptables); everything after that happens here, in user space.
//
// The life of one connection is told in docs/life-of-a-connection.md.
package userspace

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/logthrottle"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/balancer"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/portalloc"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// Config says how listeners are opened and how traffic is carried. Zero
// fields take the defaults their comments give.
type Config struct {
	// BindAddress is the node address listeners bind to (--bind-address).
	// The zero value means 0.0.0.0, every IPv4 address of the node.
	BindAddress netip.Addr
	// Ports hands out listener ports (--proxy-port-range); nil lets the
	// kernel choose.
	Ports *portalloc.Range
	// UDPTimeout ends a UDP session after this long without a datagram in
	// either direction (--udp-timeout). Zero means 250ms, upstream's default.
	UDPTimeout time.Duration
	// HalfCloseTimeout ends a TCP connection whose one direction has
	// finished (a FIN was forwarded) and whose other direction has then
	// moved no byte for this long: the guard against half-open
	// connections piling up (kubernetes#18354). A reply that keeps
	// flowing is never cut. Zero means one minute, like Linux's
	// tcp_fin_timeout.
	HalfCloseTimeout time.Duration
	// UDPMaxSessions bounds the UDP sessions of the whole node
	// (--udp-max-sessions); UDPMaxSessionsPerPort those of one service
	// port (--udp-max-sessions-per-service-port). Each session holds a
	// socket, and UDP sources can be spoofed, so without a bound one
	// client could make the proxy hold any number. When a port is full,
	// its least recently used session is evicted to make room; when the
	// node is full, a port with no session of its own to give up drops
	// the new client's datagram. Zero means DefaultUDPMaxSessions and
	// DefaultUDPMaxSessionsPerPort.
	UDPMaxSessions, UDPMaxSessionsPerPort int
	// TCPMaxConnections bounds the proxied TCP connections of the node,
	// those being dialed included (--tcp-max-connections). Beyond it a new
	// connection is reset at once and counted, so that a flood cannot
	// take the descriptors every other part needs (see FDBudget). Zero
	// means no bound; the command always sets one.
	TCPMaxConnections int
	// TCPMaxConnectionsPerPort bounds those of one service port
	// (--tcp-max-connections-per-service-port), so that a flood of one
	// Service (a NodePort open to the world) leaves room for the others.
	// Zero means half of TCPMaxConnections.
	TCPMaxConnectionsPerPort int
	// TCPIdleTimeout ends a proxied TCP connection that has moved no byte
	// either way for this long (--tcp-idle-timeout), with a reset to both
	// peers. Zero means never; the flag's default is DefaultTCPIdleTimeout.
	TCPIdleTimeout time.Duration
	// MaxPipes bounds the kernel pipes that bulk TCP transfers are
	// spliced through, lent to a connection while it moves bulk (see
	// loop.go). Zero means DefaultMaxPipes; the command sets FDBudget.Pipes.
	MaxPipes int
	// Loops is how many event loops carry established TCP connections
	// (loop.go). Zero means one per two cores (see Config.loops).
	Loops int
	// DialTimeouts are the timeouts of successive attempts to reach an
	// endpoint for one connection, each attempt going to the next endpoint.
	// Nil means upstream's 250ms, 500ms, 1s, 2s.
	DialTimeouts []time.Duration
	// PreserveSource makes the endpoint see the client's own address and
	// port for clients inside PreserveSourceFrom, the pods of this node
	// (--preserve-source-ip, --local-pod-cidrs, or the Node's
	// spec.podCIDRs through SetLocalPodCIDRs):
	// the connection to the endpoint is made from that address with
	// IP_TRANSPARENT, and the endpoint's replies, which are sent to the
	// client's address and so reach this node, are routed to our socket
	// by package replyroute and the mangle rules of package iptables.
	// Other clients are dialed from the node as before. See
	// transparent.go.
	PreserveSource     bool
	PreserveSourceFrom []netip.Prefix
	// Log receives what cannot be returned: per-connection failures.
	// Nil discards it.
	Log logrus.FieldLogger
	// Metrics counts connections, bytes and sockets. Nil counts into
	// metrics registered nowhere.
	Metrics *Metrics
}

// DefaultUDPTimeout is upstream's --udp-timeout default.
const DefaultUDPTimeout = 250 * time.Millisecond

// Defaults of the UDP session bounds: see Config.UDPMaxSessions.
const (
	DefaultUDPMaxSessions        = 16384
	DefaultUDPMaxSessionsPerPort = 4096
)

func (c *Config) udpMaxSessions() int {
	if c.UDPMaxSessions > 0 {
		return c.UDPMaxSessions
	}
	return DefaultUDPMaxSessions
}

func (c *Config) udpMaxSessionsPerPort() int {
	if c.UDPMaxSessionsPerPort > 0 {
		return c.UDPMaxSessionsPerPort
	}
	return DefaultUDPMaxSessionsPerPort
}

// throttleInterval is the least time between two log lines of one kind of
// failure that peers can cause (see package logthrottle).
const throttleInterval = 5 * time.Second

// DefaultTCPIdleTimeout is --tcp-idle-timeout's default: kube-proxy's
// conntrack timeout for established TCP (--conntrack-tcp-timeout-established),
// after which the kernel itself forgets an idle connection.
const DefaultTCPIdleTimeout = 24 * time.Hour

var defaultDialTimeouts = []time.Duration{250 * time.Millisecond, 500 * time.Millisecond, time.Second, 2 * time.Second}

func (c *Config) bindAddress() netip.Addr {
	if c.BindAddress.IsValid() {
		return c.BindAddress
	}
	return netip.IPv4Unspecified()
}

func (c *Config) udpTimeout() time.Duration {
	if c.UDPTimeout > 0 {
		return c.UDPTimeout
	}
	return DefaultUDPTimeout
}

func (c *Config) halfCloseTimeout() time.Duration {
	if c.HalfCloseTimeout > 0 {
		return c.HalfCloseTimeout
	}
	return time.Minute
}

// loops is how many connection loops carry the proxied TCP connections:
// Config.Loops, or one per two cores the Go runtime uses (GOMAXPROCS).
// A loop waiting in epoll_wait holds its P in a system call; while other
// Ps are idle, the runtime's monitor lets it be, but once every P is held
// it takes them back every 20us, waking threads for nothing. Half the Ps
// leave room for the accept and dial goroutines and keep the monitor
// asleep (docs/performance.md has the numbers).
func (c *Config) loops() int {
	if c.Loops > 0 {
		return c.Loops
	}
	return max(1, runtime.GOMAXPROCS(0)/2)
}

// loopTick is how often a loop looks for idle connections and sessions: an
// eighth of the shortest timeout, between 5ms and 1s.
func (c *Config) loopTick() time.Duration {
	shortest := min(c.halfCloseTimeout(), c.udpTimeout())
	if c.TCPIdleTimeout > 0 {
		shortest = min(shortest, c.TCPIdleTimeout)
	}
	return min(max(shortest/8, 5*time.Millisecond), time.Second)
}

func (c *Config) maxPipes() int {
	if c.MaxPipes > 0 {
		return c.MaxPipes
	}
	return DefaultMaxPipes
}

func (c *Config) dialTimeouts() []time.Duration {
	if len(c.DialTimeouts) > 0 {
		return c.DialTimeouts
	}
	return defaultDialTimeouts
}

func (c *Config) log() logrus.FieldLogger {
	if c.Log != nil {
		return c.Log
	}
	l := logrus.New()
	l.Out = io.Discard
	return l
}

// ErrLoopbackBind is returned for a loopback --bind-address: iptables REDIRECT
// and DNAT cannot deliver pod traffic to a loopback address.
var ErrLoopbackBind = errors.New("cannot proxy on a loopback --bind-address or config bindAddress (use 0.0.0.0 or a node address)")

// traceOn reports whether log writes trace lines.
func traceOn(log logrus.FieldLogger) bool {
	switch l := log.(type) {
	case *logrus.Logger:
		return l.IsLevelEnabled(logrus.TraceLevel)
	case *logrus.Entry:
		return l.Logger.IsLevelEnabled(logrus.TraceLevel)
	default:
		return false
	}
}

// Validate reports every setting of c that New cannot take, each named by
// its flag.
func (c *Config) Validate() error {
	var errs []error
	switch a := c.BindAddress; {
	case !a.IsValid():
	case a.IsLoopback():
		errs = append(errs, fmt.Errorf("--bind-address %s: %w", a, ErrLoopbackBind))
	case !a.Is4():
		errs = append(errs, fmt.Errorf("--bind-address %s: only IPv4 is supported so far (want a node IPv4 address, or 0.0.0.0)", a))
	}
	if c.UDPTimeout < 0 {
		errs = append(errs, fmt.Errorf("--udp-timeout %s: must be greater than 0 (0 means the default, %s)", c.UDPTimeout, DefaultUDPTimeout))
	}
	if c.TCPIdleTimeout < 0 {
		errs = append(errs, fmt.Errorf("--tcp-idle-timeout %s: must be 0 (never) or more", c.TCPIdleTimeout))
	}
	if c.HalfCloseTimeout < 0 {
		errs = append(errs, fmt.Errorf("half-close timeout %s: must be 0 (the default) or more", c.HalfCloseTimeout))
	}
	if c.TCPMaxConnectionsPerPort < 0 {
		errs = append(errs, fmt.Errorf("--tcp-max-connections-per-service-port %d: want 0 (half of --tcp-max-connections) or more", c.TCPMaxConnectionsPerPort))
	}
	if c.TCPMaxConnections < 0 || c.UDPMaxSessions < 0 || c.UDPMaxSessionsPerPort < 0 {
		errs = append(errs, fmt.Errorf("--tcp-max-connections %d, --udp-max-sessions %d, --udp-max-sessions-per-service-port %d: want 0 (the default) or more", c.TCPMaxConnections, c.UDPMaxSessions, c.UDPMaxSessionsPerPort))
	}
	if c.MaxPipes < 0 || c.Loops < 0 {
		errs = append(errs, fmt.Errorf("%d pipes, %d loops: want 0 (the default) or more", c.MaxPipes, c.Loops))
	}
	if !c.PreserveSource && len(c.PreserveSourceFrom) > 0 {
		errs = append(errs, errors.New("--local-pod-cidrs is used by --preserve-source-ip only: add that flag, or drop this one"))
	}
	return errors.Join(errs...)
}

// Listeners is the set of listeners of the node, one per service port, each
// with one or more sockets. Sync opens and updates them from a Snapshot;
// CloseUnused closes what the last Sync no longer wanted; Close stops
// everything. Established connections belong to the set, not to one
// listener, so they outlive their listener.
type Listeners struct {
	cfg Config
	log logrus.FieldLogger

	mu     sync.Mutex
	active map[service.Key]*portListener
	closed bool
	wg     sync.WaitGroup // every goroutine the set started

	// The proxied TCP connections, carried by the loops (loop.go).
	loops    []*loop
	nextLoop atomic.Uint32
	pipes    *pipePool // lent to connections while they splice
	connMu   sync.Mutex
	conns    map[*tcpConn]struct{}
	noConns  bool // the set is closing: no more connections
	// drained is closed when the last proxied connection ends during a
	// Shutdown; nil otherwise.
	drained chan struct{}

	wantedBinds map[service.Key]map[netip.AddrPort]bool // the sockets the last Sync named
	// adopted are listening sockets of the process before this one, by
	// CarriedName, until a Sync serves them (carry.go).
	adopted map[string]int

	// Failure paths a peer can trigger at will log through these, at
	// most a line per throttleInterval each.
	logDropped, logListenErr *logthrottle.Throttle

	udpSessions atomic.Int64 // UDP sessions of every socket, against Config.UDPMaxSessions
	trace       bool         // log a line per connection (the logger is at trace level)
	tcpConns    atomic.Int64 // TCP connections accepted and not yet ended, against Config.TCPMaxConnections

	// localPods are the prefixes whose clients keep their address; nil
	// while Config.PreserveSource is off (see transparent.go).
	localPods atomic.Pointer[[]netip.Prefix]
}

// admitTCP takes a place for one more proxied TCP connection of l, in l's
// share and the node's, or reports that none is left. A place taken is
// given back with releaseTCP.
func (ls *Listeners) admitTCP(l *portListener) bool {
	nodeMax := int64(ls.cfg.TCPMaxConnections)
	portMax := int64(ls.cfg.TCPMaxConnectionsPerPort)
	if portMax <= 0 {
		portMax = nodeMax / 2
	}
	if n := l.conns.Add(1); portMax > 0 && n > portMax {
		l.conns.Add(-1)
		return false
	}
	if n := ls.tcpConns.Add(1); nodeMax > 0 && n > nodeMax {
		ls.tcpConns.Add(-1)
		l.conns.Add(-1)
		return false
	}
	return true
}

func (ls *Listeners) releaseTCP(l *portListener) {
	ls.tcpConns.Add(-1)
	l.conns.Add(-1)
}

// Binds says where the sockets of a service port's listener go. An address
// with port 0 means "this IP, on a port from Config.Ports": the redirect
// frontend binds one such socket and points rules at it; the bind frontend
// binds the Service's own addresses and ports.
type Binds func(p *service.Port) []netip.AddrPort

// portListener is one service port's listener: a balancer and the sockets
// that feed it.
type portListener struct {
	set     *Listeners
	name    service.PortName
	proto   service.Protocol
	bal     balancer.Balancer
	log     logrus.FieldLogger
	m       *protoMetrics
	sockets map[netip.AddrPort]socket // by the address asked for
	conns   atomic.Int64              // TCP connections accepted and not yet ended
	// proxyProtocol: each endpoint connection starts with a PROXY v2
	// header (service.Port.ProxyProtocol), as of the last Sync.
	proxyProtocol atomic.Bool
}

// socket is one bound socket of a listener, TCP or UDP.
type socket interface {
	// addr is the address the socket is bound to.
	addr() netip.AddrPort
	// descriptor is the bound socket's, for a process that takes it over
	// (carry.go).
	descriptor() int
	// close stops accepting; TCP connections already proxied keep running.
	close()
	// endpointsChanged is called after the balancer's endpoints changed.
	endpointsChanged()
}

// New returns an empty set of listeners.
func New(cfg Config) (*Listeners, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Metrics == nil {
		cfg.Metrics, _ = NewMetrics(nil) // registers nothing: cannot fail
	}
	ls := &Listeners{
		cfg:    cfg,
		log:    cfg.log(),
		trace:  traceOn(cfg.log()),
		active: make(map[service.Key]*portListener),
		conns:  make(map[*tcpConn]struct{}),
		pipes:  newPipePool(cfg.maxPipes(), maxIdlePipes),

		logDropped:   logthrottle.New(throttleInterval),
		logListenErr: logthrottle.New(throttleInterval),
	}
	if cfg.PreserveSource {
		p := slices.Clone(cfg.PreserveSourceFrom)
		ls.localPods.Store(&p)
	}
	for range cfg.loops() {
		l, err := newLoop(ls.pipes, cfg.loopTick())
		if err != nil {
			ls.Close()
			return nil, fmt.Errorf("start a connection loop: %w", err)
		}
		ls.loops = append(ls.loops, l)
		ls.goroutine(l.run)
	}
	return ls, nil
}

// RedirectBinds is where listeners go when iptables redirects to them: one
// socket per service port, on a port from Config.Ports, at
// Config.BindAddress for IPv4 and at [::] for the IPv6 half of a dual-stack
// service port (REDIRECT sends it to the address it arrived on). A nil p
// means an IPv4 socket.
func (ls *Listeners) RedirectBinds(p *service.Port) []netip.AddrPort {
	if p != nil && p.ClusterIP.Is6() {
		return []netip.AddrPort{netip.AddrPortFrom(netip.IPv6Unspecified(), 0)}
	}
	return []netip.AddrPort{netip.AddrPortFrom(ls.cfg.bindAddress(), 0)}
}

// Sync makes every port of s listen where binds says, opening the sockets
// that are missing, and gives each listener its current endpoints. It
// returns the addresses every service port's sockets are bound to. A socket
// that could not be opened is left out and named in the returned error;
// everything else is served all the same. Sockets and listeners that binds
// no longer names keep running until CloseUnused.
func (ls *Listeners) Sync(s service.Snapshot, binds Binds) (map[service.Key][]netip.AddrPort, error) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if ls.closed {
		return nil, errors.New("listeners are closed")
	}
	ls.wantedBinds = make(map[service.Key]map[netip.AddrPort]bool, len(s.Ports))
	bound := make(map[service.Key][]netip.AddrPort, len(s.Ports))
	var errs []error
	// First where every port's sockets go, then the sockets.
	type plan struct {
		p     *service.Port
		binds []netip.AddrPort
	}
	var plans []plan
	for i := range s.Ports {
		p := &s.Ports[i]
		if p.Protocol != service.TCP && p.Protocol != service.UDP {
			errs = append(errs, fmt.Errorf("%s: protocol %q is not supported by a userspace proxy", p.Key(), p.Protocol))
			continue
		}
		pl := plan{p, binds(p)}
		plans = append(plans, pl)
		wanted := map[netip.AddrPort]bool{}
		for _, want := range pl.binds {
			wanted[want] = true
		}
		ls.wantedBinds[p.Key()] = wanted
	}
	ls.handOver()
	for _, pl := range plans {
		p := pl.p
		l, ok := ls.active[p.Key()]
		if !ok {
			l = &portListener{set: ls, name: p.Name, proto: p.Protocol, log: ls.log.WithField("service", p.Name.String()),
				m: ls.cfg.Metrics.forProtocol(p.Protocol), sockets: map[netip.AddrPort]socket{}}
			ls.active[p.Key()] = l
		}
		// Only a changed endpoint set can strand UDP sessions; an
		// unchanged one (every periodic sync) costs nothing more.
		if l.bal.Update(p.Endpoints, p.Affinity) {
			for _, sock := range l.sockets {
				sock.endpointsChanged()
			}
		}
		l.bal.ExpirePins()
		l.proxyProtocol.Store(p.ProxyProtocol)
		for _, want := range pl.binds {
			sock, ok := l.sockets[want]
			if !ok {
				var err error
				var adopted bool
				if sock, adopted, err = ls.adopt(l, p.Key(), want); !adopted {
					sock, err = l.open(want)
				}
				if err != nil {
					errs = append(errs, ls.listenFailed(p, want, err))
					continue
				}
				l.sockets[want] = sock
				l.m.sockets.Inc()
			}
			bound[p.Key()] = append(bound[p.Key()], sock.addr())
		}
	}
	return bound, errors.Join(errs...)
}

// handOver closes, ahead of CloseUnused, each socket that the new
// wantedBinds take from its listener and give to another: in bind mode a
// NodePort, or a Service IP and port, can pass from a Service that one edit
// removes to one it adds, and the new socket cannot be bound while the
// old one holds the address. The old Service is going away in this very
// sync, so its socket closing a moment early loses nothing; waiting for
// CloseUnused would leave the new Service unserved until the next sync.
// Ports from the proxy port range (redirect mode) are never shared, so
// this finds nothing there. ls.mu is held.
func (ls *Listeners) handOver() {
	type claim struct {
		proto service.Protocol
		addr  netip.AddrPort
	}
	claimed := map[claim]service.Key{}
	for k, wanted := range ls.wantedBinds {
		for a := range wanted {
			if a.Port() != 0 {
				claimed[claim{k.Protocol, a}] = k
			}
		}
	}
	for k, l := range ls.active {
		for want, sock := range l.sockets {
			newOwner, ok := claimed[claim{l.proto, want}]
			if !ok || newOwner == k || ls.wantedBinds[k][want] {
				continue
			}
			l.log.WithFields(logrus.Fields{"address": want.String(), "to": newOwner.String()}).Info("Handing a listening address over to another service port")
			ls.closeSocket(want, sock)
			l.m.sockets.Dec()
			delete(l.sockets, want)
		}
	}
}

// listenFailed counts and explains a socket of p that could not be
// opened at want.
func (ls *Listeners) listenFailed(p *service.Port, want netip.AddrPort, err error) error {
	reason := "other"
	if errors.Is(err, syscall.EADDRINUSE) && want.Port() != 0 {
		// Bind mode: the Service's own address and port, and something
		// on the node (sshd on 22, a hostNetwork ingress on 80, our own
		// health port) listens on that port of every address.
		reason = "port_in_use"
		err = fmt.Errorf("%w: a socket on the node already holds port %d/%s on every address (sshd, a hostNetwork server, our own health or metrics port?); "+
			"in bind mode a Service's address is local to the node, so its port must be free there: use redirect mode or another port", err, want.Port(), p.Protocol)
	}
	ls.cfg.Metrics.listenFailures.WithLabelValues(string(p.Protocol), reason).Inc()
	return fmt.Errorf("listen for %s on %s: %w", p.Key(), want, err)
}

// CloseUnused closes the sockets, and the whole listeners, that the last
// Sync did not name. Call it only after no rule or address leads to them.
func (ls *Listeners) CloseUnused() {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	ls.closeAdopted()
	for k, l := range ls.active {
		wanted := ls.wantedBinds[k] // nil: the whole listener goes
		for want, sock := range l.sockets {
			if !wanted[want] {
				ls.closeSocket(want, sock)
				l.m.sockets.Dec()
				delete(l.sockets, want)
			}
		}
		if wanted == nil {
			delete(ls.active, k)
		}
	}
}

// Shutdown stops the set gracefully, as a proxy being stopped should: every
// listening socket is closed at once, so the kernel refuses new connections
// (and UDP sessions end, their replies having no socket to leave from);
// established TCP connections then have until grace to finish on their own;
// whatever is left after that is reset, never closed cleanly, so that no
// client takes a cut transfer for a complete one. It returns the number of
// connections that had to be reset.
func (ls *Listeners) Shutdown(grace time.Duration) int {
	ls.StopAccepting()
	ls.connMu.Lock()
	var drained chan struct{}
	if len(ls.conns) > 0 {
		drained = make(chan struct{})
		ls.drained = drained
	}
	ls.connMu.Unlock()
	if drained != nil {
		t := time.NewTimer(grace)
		select {
		case <-drained:
		case <-t.C:
		}
		t.Stop()
	}
	left := ls.ActiveConnections()
	ls.Close()
	return left
}

// StopAccepting closes every listening socket, so that the kernel refuses
// new connections, and returns the number of proxied connections still
// open: the first step of Shutdown.
func (ls *Listeners) StopAccepting() int {
	ls.mu.Lock()
	ls.closeListeners()
	ls.mu.Unlock()
	return ls.ActiveConnections()
}

// closeListeners closes every socket of every listener. ls.mu is held.
func (ls *Listeners) closeListeners() {
	for k, l := range ls.active {
		for want, sock := range l.sockets {
			ls.closeSocket(want, sock)
			l.m.sockets.Dec()
		}
		delete(ls.active, k)
	}
}

func (ls *Listeners) closeSocket(want netip.AddrPort, sock socket) {
	sock.close()
	if want.Port() == 0 {
		ls.cfg.Ports.Release(int(sock.addr().Port()))
	}
}

// Close closes every listener and resets every proxied connection, and
// waits for all the goroutines of the set to return.
func (ls *Listeners) Close() {
	ls.mu.Lock()
	ls.closed = true
	ls.closeListeners()
	ls.closeAdopted()
	ls.mu.Unlock()
	ls.connMu.Lock()
	ls.noConns = true
	for c := range ls.conns {
		c.abort()
	}
	ls.connMu.Unlock()
	for _, l := range ls.loops {
		l.stop() // after the resets just asked for
	}
	ls.wg.Wait()
	ls.pipes.close()
}

// open binds a socket of l at want. A port of 0 takes a port from
// Config.Ports. The socket may bind an address the node does not have yet
// (IP_FREEBIND): the bind frontend adds a Service's address only after its
// listener is ready, so no packet ever arrives at an address where nothing
// listens.
func (l *portListener) open(want netip.AddrPort) (socket, error) {
	var sock socket
	bind := func(port int) (int, error) {
		var err error
		addr := netip.AddrPortFrom(want.Addr(), uint16(port))
		if l.proto == service.TCP {
			sock, err = l.listenTCP(addr)
		} else {
			sock, err = l.listenUDP(addr)
		}
		if err != nil {
			return 0, err
		}
		return int(sock.addr().Port()), nil
	}
	var err error
	if want.Port() == 0 {
		_, err = l.set.cfg.Ports.Allocate(bind)
	} else {
		_, err = bind(int(want.Port()))
	}
	return sock, err
}

// ListenConfig makes the proxy's sockets: they may bind addresses the node
// does not have yet (IP_FREEBIND, IPV6_FREEBIND), with keep-alive at the
// kernel's timings.
var ListenConfig = net.ListenConfig{
	KeepAliveConfig: keepAlive,
	Control: func(network, _ string, c syscall.RawConn) error {
		level, opt := unix.IPPROTO_IP, unix.IP_FREEBIND
		if strings.HasSuffix(network, "6") {
			level, opt = unix.IPPROTO_IPV6, unix.IPV6_FREEBIND
		}
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), level, opt, 1)
		})
		return errors.Join(err, serr)
	},
}

// network is "tcp4" or "tcp6" (proto "tcp"), "udp4" or "udp6" (proto
// "udp") for a socket at ip. An IPv6 socket of ours is IPv6 only
// (IPV6_V6ONLY, which Go sets for "tcp6"): the IPv4 half of a service
// port has a socket of its own.
func network(proto string, ip netip.Addr) string {
	if ip.Is6() {
		return proto + "6"
	}
	return proto + "4"
}

// goroutine starts f as a goroutine owned by the set: Close waits for it.
func (ls *Listeners) goroutine(f func()) {
	ls.wg.Add(1)
	go func() {
		defer ls.wg.Done()
		f()
	}()
}

// track hands a proxied TCP connection to loop l (its listener's), and
// records it, so that Close can end it. It reports false when the set is
// closing.
func (ls *Listeners) track(c *tcpConn, l *loop) bool {
	ls.connMu.Lock()
	defer ls.connMu.Unlock()
	if ls.noConns {
		return false
	}
	if !c.carry(l) {
		return false
	}
	ls.conns[c] = struct{}{}
	return true
}

// loop is the loop the next connection or socket goes to.
func (ls *Listeners) loop() *loop {
	return ls.loops[int(ls.nextLoop.Add(1))%len(ls.loops)]
}

// untrack forgets c, which has ended; called by its loop.
func (ls *Listeners) untrack(c *tcpConn) {
	ls.connMu.Lock()
	defer ls.connMu.Unlock()
	delete(ls.conns, c)
	if ls.drained != nil && len(ls.conns) == 0 {
		close(ls.drained)
		ls.drained = nil
	}
}

// ActiveConnections is the number of proxied TCP connections.
func (ls *Listeners) ActiveConnections() int {
	ls.connMu.Lock()
	defer ls.connMu.Unlock()
	return len(ls.conns)
}
