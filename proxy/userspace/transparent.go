package userspace

import (
	"errors"
	"net/netip"
	"slices"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// Keeping the client's address (--preserve-source-ip).
//
// A userspace proxy ends the client's connection and opens its own to the
// endpoint, so by default the pod behind a Service sees the node as its
// peer. For a client that is a pod of this node, the proxy can instead open
// the endpoint connection from the client's own address and port: a socket
// with IP_TRANSPARENT may bind an address the node does not have. The
// endpoint then answers the client's address. That address is routed to
// this node (the client lives here), where the reply would be forwarded on
// to the client pod, which knows no such connection; instead a mangle rule
// marks every packet that belongs to one of our transparent sockets
// (`-m socket --transparent`) and a policy route delivers marked packets
// locally (`ip rule fwmark ... lookup T`, `local default dev lo table T`),
// so the reply reaches our socket. docs/source-ip.md walks the packets.
//
// It cannot work for a client outside the node: a reply from an endpoint
// on another node would go to the client directly, never through us. Such
// clients, and the node's own connections, are dialed from the node as
// before, and counted.

// Results of choosing the source of an endpoint connection, the
// source_ip_total metric's labels.
const (
	sourcePreserved   = "preserved"
	sourceOtherPort   = "preserved_other_port"
	sourceNotLocalPod = "not_local_pod"
	sourceSamePod     = "same_pod"
	sourceFailed      = "failed"
)

// DropSourcePreservation turns --preserve-source-ip off, for a frontend
// that cannot route the replies back (bind mode has no mangle table).
func (ls *Listeners) DropSourcePreservation() {
	ls.localPods.Store(nil)
}

// SetLocalPodCIDRs sets the prefixes of this node's pods, whose clients
// keep their address, when they change (the Node's spec.podCIDRs). It does
// nothing while source preservation is off.
func (ls *Listeners) SetLocalPodCIDRs(prefixes []netip.Prefix) {
	if ls.localPods.Load() != nil {
		p := slices.Clone(prefixes)
		ls.localPods.Store(&p)
	}
}

// transparentSource is the address to dial endpoint from for client: the
// client's own when it is a pod of this node and not the endpoint itself,
// else none (the node's). why is the reason for the metric; it is empty
// when the feature is off.
func (ls *Listeners) transparentSource(client, endpoint netip.AddrPort) (src netip.AddrPort, why string) {
	prefixes := ls.localPods.Load()
	if prefixes == nil {
		return netip.AddrPort{}, ""
	}
	ip := client.Addr().Unmap()
	if ip == endpoint.Addr().Unmap() {
		// A pod that reaches itself through its Service: a packet from
		// its own address would be dropped by its kernel as a martian.
		return netip.AddrPort{}, sourceSamePod
	}
	for _, p := range *prefixes {
		if p.Contains(ip) {
			return netip.AddrPortFrom(ip, client.Port()), sourcePreserved
		}
	}
	return netip.AddrPort{}, sourceNotLocalPod
}

// connectFrom opens a socket of ours to endpoint, for proto (service.TCP
// or service.UDP), from the client's address when transparentSource says
// so, else from the node. A transparent socket whose port is taken is
// tried again on a port of the kernel's choosing; one the kernel refuses
// altogether (no CAP_NET_ADMIN) falls back to the node's address. Every
// outcome is counted. A TCP socket is left connecting (its loop sees the
// connect finish or fail); a UDP one is connected at once, which only
// records the peer.
func (ls *Listeners) connectFrom(log logrus.FieldLogger, proto service.Protocol, client, endpoint netip.AddrPort) (int, error) {
	src, why := ls.transparentSource(client, endpoint)
	if src.IsValid() {
		fd, err := connectSocket(proto, endpoint, src)
		if isPortTaken(err) {
			why = sourceOtherPort
			fd, err = connectSocket(proto, endpoint, netip.AddrPortFrom(src.Addr(), 0))
		}
		if err == nil || !isBindRefused(err) {
			ls.cfg.Metrics.sourceIP.WithLabelValues(string(proto), why).Inc()
			return fd, err
		}
		why = sourceFailed
		ls.logDropped.Log(log.WithError(err), func(e *logrus.Entry) {
			e.Warn("Could not dial an endpoint from the client's address (--preserve-source-ip needs CAP_NET_ADMIN); dialing from the node")
		})
	}
	if why != "" {
		ls.cfg.Metrics.sourceIP.WithLabelValues(string(proto), why).Inc()
	}
	return connectSocket(proto, endpoint, netip.AddrPort{})
}

// connectSocket makes a non-blocking socket for proto and connects it to
// endpoint, from src if it is valid: with IP_TRANSPARENT (IPV6_TRANSPARENT),
// which needs CAP_NET_ADMIN, and SO_REUSEADDR, which lets several of our
// sockets share one client address and port towards different endpoints
// (the kernel still refuses two with the same four-tuple).
func connectSocket(proto service.Protocol, endpoint, src netip.AddrPort) (int, error) {
	family, sotype := unix.AF_INET, unix.SOCK_STREAM
	if endpoint.Addr().Is6() {
		family = unix.AF_INET6
	}
	if proto == service.UDP {
		sotype = unix.SOCK_DGRAM
	}
	fd, err := unix.Socket(family, sotype|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	if src.IsValid() {
		level, opt := unix.IPPROTO_IP, unix.IP_TRANSPARENT
		if src.Addr().Is6() {
			level, opt = unix.IPPROTO_IPV6, unix.IPV6_TRANSPARENT
		}
		err = unix.SetsockoptInt(fd, level, opt, 1)
		if err == nil {
			err = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
		}
		if err == nil {
			err = unix.Bind(fd, sockaddrOf(src))
		}
		if err != nil {
			unix.Close(fd)
			return -1, err
		}
	}
	if err := unix.Connect(fd, sockaddrOf(endpoint)); err != nil && err != unix.EINPROGRESS {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// sockaddrOf is the socket address of ap.
func sockaddrOf(ap netip.AddrPort) unix.Sockaddr {
	if ap.Addr().Is4() {
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	}
	return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
}

// isPortTaken: the client's port is in use towards that endpoint already.
func isPortTaken(err error) bool {
	return errors.Is(err, unix.EADDRINUSE) || errors.Is(err, unix.EADDRNOTAVAIL)
}

// isBindRefused: the kernel would not make the transparent socket.
func isBindRefused(err error) bool {
	return errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) || isPortTaken(err)
}
