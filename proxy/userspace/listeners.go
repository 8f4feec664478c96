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
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/balancer"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/portalloc"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/service"
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
	// HalfCloseTimeout bounds how long a TCP connection may keep running in
	// one direction after the other direction has finished: the guard
	// against half-open connections piling up (kubernetes#18354). Zero
	// means one minute, like Linux's tcp_fin_timeout.
	HalfCloseTimeout time.Duration
	// DialTimeouts are the timeouts of successive attempts to reach an
	// endpoint for one connection, each attempt going to the next endpoint.
	// Nil means upstream's 250ms, 500ms, 1s, 2s.
	DialTimeouts []time.Duration
	// Log receives what cannot be returned: per-connection failures.
	// Nil discards it.
	Log logrus.FieldLogger
}

// DefaultUDPTimeout is upstream's --udp-timeout default.
const DefaultUDPTimeout = 250 * time.Millisecond

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
var ErrLoopbackBind = errors.New("cannot proxy on a loopback --bind-address (use 0.0.0.0 or a node address)")

// Listeners is the set of listeners of the node, one per service port. Sync
// opens and updates them from a Snapshot; CloseUnused closes the ones a
// Snapshot no longer has; Close stops everything. Established connections
// belong to the set, not to one listener, so they outlive their listener.
type Listeners struct {
	cfg Config
	log logrus.FieldLogger

	ctx    context.Context // cancelled by Close: stops dials and UDP sessions
	cancel context.CancelFunc

	mu     sync.Mutex
	active map[service.Key]listener
	conns  map[*net.TCPConn]*net.TCPConn // live proxied connections: client -> backend
	closed bool
	wg     sync.WaitGroup // every goroutine the set started
}

// listener is one service port's listener, TCP or UDP.
type listener interface {
	// port is the node port the listener is bound to.
	port() int
	// update gives the listener the service port's new endpoints and
	// affinity. It never reopens the socket.
	update(p *service.Port)
	// close stops accepting; TCP connections already proxied keep running.
	close()
	balancer() *balancer.Balancer
}

// New returns an empty set of listeners.
func New(cfg Config) (*Listeners, error) {
	if cfg.BindAddress.IsValid() && cfg.BindAddress.IsLoopback() {
		return nil, fmt.Errorf("--bind-address %s: %w", cfg.BindAddress, ErrLoopbackBind)
	}
	if a := cfg.BindAddress; a.IsValid() && !a.Is4() {
		return nil, fmt.Errorf("--bind-address %s: only IPv4 bind addresses are supported so far", a)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Listeners{
		cfg:    cfg,
		log:    cfg.log(),
		ctx:    ctx,
		cancel: cancel,
		active: make(map[service.Key]listener),
		conns:  make(map[*net.TCPConn]*net.TCPConn),
	}, nil
}

// Sync makes sure every port of s has a listener and gives each its current
// endpoints. It returns the listener port of every service port that has
// one. A port whose listener could not be opened is left out of the map and
// named in the returned error; the others are served all the same.
func (ls *Listeners) Sync(s service.Snapshot) (map[service.Key]int, error) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if ls.closed {
		return nil, errors.New("listeners are closed")
	}
	ports := make(map[service.Key]int, len(s.Ports))
	var errs []error
	for i := range s.Ports {
		p := &s.Ports[i]
		l, ok := ls.active[p.Key()]
		if !ok {
			var err error
			l, err = ls.open(p)
			if err != nil {
				errs = append(errs, fmt.Errorf("open listener for %s: %w", p.Key(), err))
				continue
			}
			ls.active[p.Key()] = l
		}
		l.update(p)
		l.balancer().ExpirePins()
		ports[p.Key()] = l.port()
	}
	return ports, errors.Join(errs...)
}

// CloseUnused closes the listeners of service ports that s does not have.
// Call it only after no rule points at them any more.
func (ls *Listeners) CloseUnused(s service.Snapshot) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	for k, l := range ls.active {
		if _, ok := s.Lookup(k); !ok {
			l.close()
			ls.cfg.Ports.Release(l.port())
			delete(ls.active, k)
		}
	}
}

// Close closes every listener and every proxied connection, and waits for all
// the goroutines of the set to return.
func (ls *Listeners) Close() {
	ls.mu.Lock()
	ls.closed = true
	for k, l := range ls.active {
		l.close()
		ls.cfg.Ports.Release(l.port())
		delete(ls.active, k)
	}
	for client, backend := range ls.conns {
		client.Close()
		backend.Close()
	}
	ls.mu.Unlock()
	ls.cancel()
	ls.wg.Wait()
}

func (ls *Listeners) open(p *service.Port) (listener, error) {
	switch p.Protocol {
	case service.TCP:
		return ls.openTCP(p)
	case service.UDP:
		return ls.openUDP(p)
	default:
		return nil, fmt.Errorf("protocol %q is not supported by a userspace proxy", p.Protocol)
	}
}

// goroutine starts f as a goroutine owned by the set: Close waits for it.
func (ls *Listeners) goroutine(f func()) {
	ls.wg.Add(1)
	go func() {
		defer ls.wg.Done()
		f()
	}()
}

// track records a proxied TCP connection, its client and backend sockets,
// so that Close can end it. It reports false when the set is already
// closed; the caller then closes both.
func (ls *Listeners) track(client, backend *net.TCPConn) bool {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if ls.closed {
		return false
	}
	ls.conns[client] = backend
	return true
}

func (ls *Listeners) untrack(client *net.TCPConn) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	delete(ls.conns, client)
}

// ActiveConnections is the number of proxied TCP connections.
func (ls *Listeners) ActiveConnections() int {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	return len(ls.conns)
}

// acceptBackoff returns how long to wait after the n-th accept or read error
// in a row: from 5ms doubling up to 1s, so a broken socket never spins and
// never floods the log (kubernetes#4112 wrote 37 GB of logs).
func acceptBackoff(n int) time.Duration {
	d := 5 * time.Millisecond << min(n, 8)
	return min(d, time.Second)
}
