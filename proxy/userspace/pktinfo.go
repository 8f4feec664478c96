package userspace

import (
	"net"
	"net/netip"

	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// pktinfo reads the destination address of each datagram a UDP socket
// receives, and sets the source address of a reply, through the control
// messages of recvmsg and sendmsg: IP_PKTINFO for IPv4 sockets,
// IPV6_PKTINFO for IPv6 ones. One value serves one socket, from its read
// loop only.
type pktinfo interface {
	// enable asks the kernel to attach the destination to every datagram.
	enable(*net.UDPConn) error
	// buffer is a control-message buffer big enough for one datagram.
	buffer() []byte
	// parse returns the destination in a received control message, or
	// the zero Addr.
	parse(oob []byte) netip.Addr
	// source is the control message that sends a reply from local.
	source(local netip.Addr) []byte
}

func pktinfoFor(ip netip.Addr) pktinfo {
	if ip.Is6() {
		return &pktinfo6{}
	}
	return &pktinfo4{}
}

type pktinfo4 struct{ cm ipv4.ControlMessage }

func (p *pktinfo4) enable(c *net.UDPConn) error {
	return ipv4.NewPacketConn(c).SetControlMessage(ipv4.FlagDst, true)
}
func (p *pktinfo4) buffer() []byte { return ipv4.NewControlMessage(ipv4.FlagDst) }
func (p *pktinfo4) parse(oob []byte) netip.Addr {
	if p.cm.Parse(oob) != nil {
		return netip.Addr{}
	}
	ip, _ := netip.AddrFromSlice(p.cm.Dst.To4())
	return ip
}
func (p *pktinfo4) source(local netip.Addr) []byte {
	return (&ipv4.ControlMessage{Src: local.AsSlice()}).Marshal()
}

type pktinfo6 struct{ cm ipv6.ControlMessage }

func (p *pktinfo6) enable(c *net.UDPConn) error {
	return ipv6.NewPacketConn(c).SetControlMessage(ipv6.FlagDst, true)
}
func (p *pktinfo6) buffer() []byte { return ipv6.NewControlMessage(ipv6.FlagDst) }
func (p *pktinfo6) parse(oob []byte) netip.Addr {
	if p.cm.Parse(oob) != nil {
		return netip.Addr{}
	}
	ip, _ := netip.AddrFromSlice(p.cm.Dst.To16())
	return ip
}
func (p *pktinfo6) source(local netip.Addr) []byte {
	return (&ipv6.ControlMessage{Src: local.AsSlice()}).Marshal()
}
