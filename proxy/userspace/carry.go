package userspace

import (
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// Listening sockets that outlive a process. A proxy that restarts must not
// make clients wait, or refuse them, while it opens its listeners again:
// the iptables rules still send every Service's traffic to the ports of
// the listeners before. So the listening sockets themselves are carried
// over (package handoff passes them from the old process to the new one
// on an upgrade), or, after a crash, opened again at once on the ports the
// rules point at (Reopen), and the first Sync adopts them instead of
// opening new ones on other ports. Connections that arrive meanwhile wait
// in the socket's accept queue, and are accepted as soon as the listener
// knows its endpoints.

// CarriedPrefix begins every CarriedName: the other sockets a process
// carries over (health, metrics, the DNS stub's) are named otherwise.
const CarriedPrefix = "svc "

// CarriedName names a listening socket from one process to the next: its
// service port and the address it was asked for (port 0: a port of the
// proxy port range, in redirect mode).
func CarriedName(k service.Key, want netip.AddrPort) string {
	return CarriedPrefix + k.String() + " " + want.String()
}

// Carry lists every listening socket of the set by its CarriedName, for a
// process that takes over: each a descriptor of its own (a dup of the same
// socket), which the caller closes.
func (ls *Listeners) Carry() map[string]int {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	out := map[string]int{}
	for k, l := range ls.active {
		for want, sock := range l.sockets {
			// F_DUPFD_CLOEXEC, as the fds of Go's net package: no
			// child process inherits it.
			if dup, err := unix.FcntlInt(uintptr(sock.descriptor()), unix.F_DUPFD_CLOEXEC, 0); err == nil {
				out[CarriedName(k, want)] = dup
			}
		}
	}
	return out
}

// Adopt gives the set listening sockets of a process before this one, by
// their CarriedName. The next Sync uses them instead of opening sockets
// for the same service port and address; CloseUnused closes those it did
// not use. The set owns the descriptors from now on.
func (ls *Listeners) Adopt(fds map[string]int) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if ls.adopted == nil {
		ls.adopted = map[string]int{}
	}
	for name, fd := range fds {
		if old, ok := ls.adopted[name]; ok {
			unix.Close(old)
		}
		ls.adopted[name] = fd
	}
}

// adopt serves an adopted socket for service port k at want, if there is
// one. ls.mu is held.
func (ls *Listeners) adopt(l *portListener, k service.Key, want netip.AddrPort) (socket, bool, error) {
	name := CarriedName(k, want)
	fd, ok := ls.adopted[name]
	if !ok {
		return nil, false, nil
	}
	delete(ls.adopted, name)
	bound, err := boundAddr(fd, l.proto)
	if err != nil {
		unix.Close(fd)
		return nil, true, fmt.Errorf("adopted socket %s: %w", name, err)
	}
	if want.Port() == 0 {
		ls.cfg.Ports.Reserve(int(bound.Port()))
	}
	var sock socket
	if l.proto == service.TCP {
		sock, err = l.serveTCP(fd, bound)
	} else {
		sock, err = l.serveUDP(fd, bound)
	}
	if err != nil {
		ls.cfg.Ports.Release(int(bound.Port()))
	}
	return sock, true, err
}

// closeAdopted closes the adopted sockets no Sync took: their Services are
// gone. ls.mu is held.
func (ls *Listeners) closeAdopted() {
	for name, fd := range ls.adopted {
		unix.Close(fd)
		delete(ls.adopted, name)
	}
}

// boundAddr checks that fd is a listening socket of proto (a carried
// descriptor comes from another process) and returns its address.
func boundAddr(fd int, proto service.Protocol) (netip.AddrPort, error) {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return netip.AddrPort{}, err
	}
	wantType := unix.SOCK_STREAM
	if proto == service.UDP {
		wantType = unix.SOCK_DGRAM
	}
	if typ != wantType {
		return netip.AddrPort{}, fmt.Errorf("socket type %d, want %d for %s", typ, wantType, proto)
	}
	if proto == service.TCP {
		if on, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || on != 1 {
			return netip.AddrPort{}, errors.New("not a listening socket")
		}
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return netip.AddrPort{}, err
	}
	return addrPortOf(sa), nil
}

// Reopen opens a listening socket for proto at addr, as a Sync would, but
// serves nothing on it yet: after a crash, the proxy reopens the ports its
// rules still point at before it knows any Service, so that connections
// wait in the socket's queue instead of being refused, and passes them to
// Adopt under the CarriedName of the service port the rule names.
func Reopen(proto service.Protocol, addr netip.AddrPort) (int, error) {
	var fd int
	var err error
	if proto == service.TCP {
		fd, _, err = openTCP(addr)
	} else {
		fd, _, err = openUDP(addr)
	}
	return fd, err
}
