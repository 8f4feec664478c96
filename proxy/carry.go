package proxy

import (
	"context"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/handoff"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/userspace"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// A restart that drops nothing. The legacy userspace proxy lost every
// connection when it restarted: its listeners closed, and until the new
// process had opened new ones on new ports and rewritten every rule,
// clients were refused. This proxy carries its listening sockets over
// instead:
//
//   - planned (an upgrade, --handoff-socket): the new process takes every
//     listening socket from the running one over a unix socket (package
//     handoff) before it opens anything. Both accept from the same queues
//     for a moment; the old one then writes no more rules, closes its
//     health and metrics servers, and on SIGTERM closes its copies and
//     lets its connections finish. No port changes, no rule changes, no
//     connection waits.
//   - crash (no process to take from): in redirect mode the new process
//     reads the rules the old one left and reopens a listening socket on
//     every port they point at, before it knows any Service. Connections
//     wait in those queues until the first sync gives the listeners their
//     endpoints, instead of being refused until the rules are rewritten.
//
// Either way the first Sync adopts the sockets (userspace.Listeners.Adopt).

// carrier holds what this process took over, and hands its own sockets to
// the process after it.
type carrier struct {
	log  logrus.FieldLogger
	path string // --handoff-socket; empty: no hand-over

	took  bool // sockets were taken over from a running proxy
	mu    sync.Mutex
	taken map[string]int // taken over and not used yet, by name
	own   map[string]int // dups of the health, metrics and DNS sockets, by name

	retireOnce sync.Once
	retired    chan struct{} // closed once a successor took the sockets
}

// takeTimeout bounds the exchange with the process before.
const takeTimeout = 10 * time.Second

// newCarrier takes the sockets of the proxy serving at path, if any. A
// failed exchange is logged and the proxy starts afresh: a restart must
// never be stopped by its predecessor.
func newCarrier(log logrus.FieldLogger, path string) *carrier {
	c := &carrier{log: log, path: path, taken: map[string]int{}, own: map[string]int{}, retired: make(chan struct{})}
	if path == "" {
		return c
	}
	socks, err := handoff.Take(path, takeTimeout)
	if err != nil {
		log.WithError(err).Warn("Could not take the listening sockets over from the running proxy; opening new ones")
		return c
	}
	for _, s := range socks {
		c.taken[s.Name] = s.FD
	}
	c.took = len(socks) > 0
	if c.took {
		log.WithFields(logrus.Fields{"sockets": len(socks), "from": path}).Info("Took the listening sockets over from the running proxy")
	}
	return c
}

// waitServing holds back a server whose socket may have been taken over
// until this process has applied its first sync: the process before it
// answers on the same socket until it hands over, and a probe or a DNS
// query that the new process answered before it knows any Service would
// be wrong ("not ready" from the proxy that serves, SERVFAIL for a name
// that exists). A process that took nothing serves at once, as
// kube-proxy's health server does. It reports false when ctx ended
// first.
func (c *carrier) waitServing(ctx context.Context, firstApply <-chan struct{}) bool {
	if !c.took {
		return true
	}
	select {
	case <-firstApply:
		return true
	case <-ctx.Done():
		return false
	}
}

// services gives the service ports' sockets taken over, for
// userspace.Listeners.Adopt, and forgets them.
func (c *carrier) services() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]int{}
	for name, fd := range c.taken {
		if strings.HasPrefix(name, userspace.CarriedPrefix) {
			out[name] = fd
			delete(c.taken, name)
		}
	}
	return out
}

// take returns the socket taken over under name, if any, and forgets it.
func (c *carrier) take(name string) (int, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	fd, ok := c.taken[name]
	delete(c.taken, name)
	return fd, ok
}

// listen is net.Listen on addr, or the socket taken over under name.
// Either way the carrier keeps a dup of it to hand over.
func (c *carrier) listen(name, addr string) (net.Listener, error) {
	name += " " + addr
	var ln net.Listener
	var err error
	if fd, ok := c.take(name); ok {
		f := os.NewFile(uintptr(fd), name)
		ln, err = net.FileListener(f) // a dup of its own
		f.Close()
	} else {
		ln, err = net.Listen("tcp", addr)
	}
	if err != nil {
		return nil, err
	}
	c.keep(name, ln.(syscall.Conn))
	return ln, nil
}

// listenWhenFree returns ln, or, when ln is nil because another process
// still held addr at start (a proxy before this one, draining after a
// restart that could not hand over), listens again every second until it
// can, or ctx ends (nil). Services matter more than probes: the proxy
// starts serving them rather than exiting over a port its predecessor
// will free.
func (c *carrier) listenWhenFree(ctx context.Context, ln net.Listener, name, addr, flag string) net.Listener {
	if ln != nil {
		return ln
	}
	c.log.WithField("address", addr).Warn(flag + " is in use, likely by the proxy before this one, still draining: serving it once free")
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		if ln, err := c.listen(name, addr); err == nil {
			c.log.WithField("address", addr).Info(flag + " is free again")
			return ln
		}
	}
}

// keep stores a dup of conn's descriptor under name, to hand over.
func (c *carrier) keep(name string, conn syscall.Conn) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return
	}
	raw.Control(func(fd uintptr) {
		if dup, err := unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0); err == nil {
			c.mu.Lock()
			c.own[name] = dup
			c.mu.Unlock()
		}
	})
}

// list is every socket to hand over: the listeners' and the carrier's
// own, each a dup that handoff.Serve closes.
func (c *carrier) list(listeners *userspace.Listeners) []handoff.Socket {
	var out []handoff.Socket
	for name, fd := range listeners.Carry() {
		out = append(out, handoff.Socket{Name: name, FD: fd})
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for name, fd := range c.own {
		if dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0); err == nil {
			out = append(out, handoff.Socket{Name: name, FD: dup})
		}
	}
	return out
}

// serve hands this process's sockets to each process that asks at c.path,
// from the first successful apply (what it hands over must already serve)
// until ctx ends.
func (c *carrier) serve(ctx context.Context, listeners *userspace.Listeners, ready <-chan struct{}) error {
	if c.path == "" {
		return nil
	}
	select {
	case <-ctx.Done():
		return nil
	case <-ready:
	}
	l, err := handoff.Listen(c.path)
	if err != nil {
		return err
	}
	c.log.WithField("path", c.path).Info("Serving the hand-over socket: a new proxy takes the listeners from here")
	l.Serve(ctx, func() []handoff.Socket { return c.list(listeners) }, func(n int) {
		c.log.WithField("sockets", n).Info("Handed the listening sockets over to a new proxy: writing no more rules, serving what is established")
		c.retireOnce.Do(func() { close(c.retired) })
	})
	return nil
}

// untilRetired is ctx, also ended once a successor took the sockets: the
// health and metrics servers stop accepting then, so that probes reach the
// new process, which shares their sockets.
func (c *carrier) untilRetired(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	go func() { // ends with ctx: cancel is called by the caller, or below
		select {
		case <-c.retired:
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
}

// close closes what the carrier still holds: sockets taken over that
// nothing used, and its dups.
func (c *carrier) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for name, fd := range c.taken {
		unix.Close(fd)
		delete(c.taken, name)
	}
	for name, fd := range c.own {
		unix.Close(fd)
		delete(c.own, name)
	}
}

// ruleTarget reads a rule of our nat chains as iptables -S prints it:
// the protocol, the comment (the service port's name) and the listener
// port it REDIRECTs (or DNATs) to.
var ruleTarget = regexp.MustCompile(`-p (tcp|udp) .*--comment "?([^" ]+)"? .*(?:--to-ports (\d+)|--to-destination \S*:(\d+))`)

// reopenFromRules reopens, after a crash, a listening socket on every
// port the rules left by the proxy before point at, named for the service
// port each rule's comment names, for Adopt. bind is the IPv4 listeners'
// address; IPv6 ones listen on [::].
func (f *redirectFrontend) reopenFromRules() map[string]int {
	out := map[string]int{}
	for _, fam := range []*family{&f.v4, &f.v6} {
		if fam.table == nil {
			continue
		}
		rules, err := fam.table.Redirections()
		if err != nil {
			continue // no chains yet: the first start on this node
		}
		want := f.listeners.RedirectBinds(nil)[0]
		if fam.ipv6 {
			want = netip.AddrPortFrom(netip.IPv6Unspecified(), 0)
		}
		for _, r := range rules {
			m := ruleTarget.FindStringSubmatch(r.Spec)
			if m == nil {
				continue
			}
			port, _ := strconv.Atoi(m[3] + m[4])
			proto := service.Protocol(strings.ToUpper(m[1]))
			if m[2] == dnsRuleComment && !fam.ipv6 {
				// The DNS stub's two sockets, on one port.
				name := dnsSocketName(proto, want)
				if _, done := out[name]; !done {
					if fd, err := userspace.Reopen(proto, netip.AddrPortFrom(want.Addr(), uint16(port))); err == nil {
						out[name] = fd
					}
				}
				continue
			}
			name, ok := parsePortName(m[2])
			if !ok {
				continue // not ours
			}
			key := service.Key{Name: name, Protocol: proto, IPv6: fam.ipv6}
			carried := userspace.CarriedName(key, want)
			if _, done := out[carried]; done {
				continue
			}
			fd, err := userspace.Reopen(proto, netip.AddrPortFrom(want.Addr(), uint16(port)))
			if err != nil {
				f.log.WithError(err).WithField("service", key.String()).Warn("Could not reopen the listener our rules point at")
				continue
			}
			out[carried] = fd
		}
	}
	if len(out) > 0 {
		f.log.WithField("listeners", len(out)).Info("Reopened the listeners the rules of the proxy before still point at: their clients wait for the first sync instead of being refused")
	}
	return out
}

// dnsSocketName names the DNS stub's socket of proto asked for at want.
func dnsSocketName(proto service.Protocol, want netip.AddrPort) string {
	return "dns-" + strings.ToLower(string(proto)) + " " + want.String()
}

// adopt gives the carrier sockets it did not take over from a process but
// reopened itself, after a crash: the service ports' go on to the
// listeners through services, the DNS stub's through take.
func (c *carrier) adopt(fds map[string]int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for name, fd := range fds {
		if old, ok := c.taken[name]; ok {
			unix.Close(old)
		}
		c.taken[name] = fd
	}
}

// parsePortName reads "namespace/name:port" or "namespace/name", a
// service port's name as rule comments carry it.
func parsePortName(s string) (service.PortName, bool) {
	ns, rest, ok := strings.Cut(s, "/")
	if !ok || ns == "" || rest == "" || strings.Contains(rest, "/") {
		return service.PortName{}, false
	}
	name, port, _ := strings.Cut(rest, ":")
	return service.PortName{Namespace: ns, Name: name, Port: port}, name != ""
}
