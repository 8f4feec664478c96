package userspace

import (
	"encoding/binary"
	"net"
	"net/netip"

	proxyproto "github.com/pires/go-proxyproto"
	"golang.org/x/sys/unix"
)

// PROXY protocol v2 towards endpoints (service.AnnotationProxyProtocol).
//
// Where the client's address cannot be kept on the packets (a client that
// is not a pod of this node, bind mode), an endpoint that speaks the PROXY
// protocol can still learn it: the first bytes on the connection we open to
// it are a binary header naming the client's address and port and the
// address the client connected to. The endpoint must expect it: one that
// does not would take the header for the start of the request, which is
// why it is asked for per Service.

// ip6tSOOriginalDst is IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/
// ip6_tables.h), which x/sys/unix does not name; the IPv4 one is 80 too.
const ip6tSOOriginalDst = 80

// proxyHeader is the PROXY v2 header for the client connection on socket
// fd, from client.
func proxyHeader(fd int, client netip.AddrPort) []byte {
	h := proxyproto.HeaderProxyFromAddrs(2, net.TCPAddrFromAddrPort(client), net.TCPAddrFromAddrPort(originalDestination(fd)))
	b, err := h.Format()
	if err != nil {
		return nil // cannot happen for TCP addresses
	}
	return b
}

// originalDestination is the address the client on socket fd connected to
// before our rule redirected it (the ClusterIP, the node's address and
// NodePort, ...), as conntrack kept it (SO_ORIGINAL_DST). Without a
// redirect (bind mode) the socket's own local address is that address.
func originalDestination(fd int) netip.AddrPort {
	var local netip.AddrPort
	if sa, err := unix.Getsockname(fd); err == nil {
		local = addrPortOf(sa)
	}
	if local.Addr().Is4() {
		// struct sockaddr_in, read through a type of its size or more.
		m, err := unix.GetsockoptIPv6Mreq(fd, unix.IPPROTO_IP, unix.SO_ORIGINAL_DST)
		if err == nil {
			port := binary.BigEndian.Uint16(m.Multiaddr[2:4])
			return netip.AddrPortFrom(netip.AddrFrom4([4]byte(m.Multiaddr[4:8])), port)
		}
		return local
	}
	// struct sockaddr_in6, likewise.
	info, err := unix.GetsockoptIPv6MTUInfo(fd, unix.IPPROTO_IPV6, ip6tSOOriginalDst)
	if err == nil {
		// The port is in network order in memory.
		var b [2]byte
		binary.NativeEndian.PutUint16(b[:], info.Addr.Port)
		port := binary.BigEndian.Uint16(b[:])
		return netip.AddrPortFrom(netip.AddrFrom16(info.Addr.Addr), port)
	}
	return local
}
