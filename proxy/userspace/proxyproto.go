package userspace

import (
	"encoding/binary"
	"fmt"
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

// sendProxyHeader writes the PROXY v2 header for client's connection to
// backend.
func sendProxyHeader(client, backend *net.TCPConn) error {
	dst := originalDestination(client)
	h := proxyproto.HeaderProxyFromAddrs(2, client.RemoteAddr(), net.TCPAddrFromAddrPort(dst))
	if _, err := h.WriteTo(backend); err != nil {
		return fmt.Errorf("send the PROXY protocol header: %w", err)
	}
	return nil
}

// originalDestination is the address client connected to before our rule
// redirected it (the ClusterIP, the node's address and NodePort, ...), as
// conntrack kept it (SO_ORIGINAL_DST). Without a redirect (bind mode) the
// connection's own local address is that address.
func originalDestination(c *net.TCPConn) netip.AddrPort {
	local := c.LocalAddr().(*net.TCPAddr).AddrPort()
	raw, err := c.SyscallConn()
	if err != nil {
		return local
	}
	var dst netip.AddrPort
	raw.Control(func(fd uintptr) {
		if local.Addr().Unmap().Is4() {
			// struct sockaddr_in, read through a type of its size or more.
			m, err := unix.GetsockoptIPv6Mreq(int(fd), unix.IPPROTO_IP, unix.SO_ORIGINAL_DST)
			if err == nil {
				port := binary.BigEndian.Uint16(m.Multiaddr[2:4])
				dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(m.Multiaddr[4:8])), port)
			}
			return
		}
		// struct sockaddr_in6, likewise.
		info, err := unix.GetsockoptIPv6MTUInfo(int(fd), unix.IPPROTO_IPV6, ip6tSOOriginalDst)
		if err == nil {
			// The port is in network order in memory.
			var b [2]byte
			binary.NativeEndian.PutUint16(b[:], info.Addr.Port)
			port := binary.BigEndian.Uint16(b[:])
			dst = netip.AddrPortFrom(netip.AddrFrom16(info.Addr.Addr), port)
		}
	})
	if !dst.IsValid() {
		return local
	}
	return dst
}
