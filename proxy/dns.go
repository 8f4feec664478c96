package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/dnsstub"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/userspace"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// dnsPort is where pods send DNS queries: the cluster DNS IP, port 53.
const dnsPort = 53

// dnsTarget is where the embedded DNS stub listens, and the address pods
// use for it (kubelet's clusterDNS).
type dnsTarget struct {
	ip     netip.Addr     // the cluster DNS IP
	listen netip.AddrPort // the stub's UDP and TCP sockets
}

// claims reports whether the stub owns ip:port: it does for port 53 of the
// cluster DNS IP, whatever Service also uses that address. A kube-dns
// Service on the same IP keeps its other ports (such as metrics on 9153);
// its port 53 is answered by the stub on every node. That is the point of
// an embedded stub: every node answers its own pods.
func (d *dnsTarget) claims(ip netip.Addr, port uint16) bool {
	return d != nil && ip == d.ip && port == dnsPort
}

// openDNS opens the stub's UDP and TCP sockets on one port: at
// addr:port, or, for port 0, on a port from the proxy port range.
// Sockets the process before this one served the stub on are taken over
// (carry.go), so that the rules pointing at them stay right.
func openDNS(cfg *Config, addr netip.AddrPort, c *carrier) (net.PacketConn, net.Listener, error) {
	var pc net.PacketConn
	var ln net.Listener
	udpName, tcpName := dnsSocketName(service.UDP, addr), dnsSocketName(service.TCP, addr)
	defer func() {
		if pc != nil && ln != nil {
			c.keep(udpName, pc.(syscall.Conn))
			c.keep(tcpName, ln.(syscall.Conn))
		}
	}()
	udpFD, okU := c.take(udpName)
	tcpFD, okT := c.take(tcpName)
	if okU && okT {
		uf, tf := os.NewFile(uintptr(udpFD), udpName), os.NewFile(uintptr(tcpFD), tcpName)
		defer uf.Close()
		defer tf.Close()
		var err1, err2 error
		pc, err1 = net.FilePacketConn(uf)
		ln, err2 = net.FileListener(tf)
		if err1 == nil && err2 == nil {
			cfg.Listeners.Ports.Reserve(pc.LocalAddr().(*net.UDPAddr).Port)
			return pc, ln, nil
		}
		if pc != nil {
			pc.Close()
		}
		if ln != nil {
			ln.Close()
		}
		pc, ln = nil, nil
	} else {
		// One without the other is of no use: the rules name one port.
		if okU {
			unix.Close(udpFD)
		}
		if okT {
			unix.Close(tcpFD)
		}
	}
	open := func(port int) (int, error) {
		a := netip.AddrPortFrom(addr.Addr(), uint16(port)).String()
		var err error
		if pc, err = userspace.ListenConfig.ListenPacket(context.Background(), "udp4", a); err != nil {
			return 0, err
		}
		got := pc.LocalAddr().(*net.UDPAddr).Port
		a = netip.AddrPortFrom(addr.Addr(), uint16(got)).String()
		if ln, err = userspace.ListenConfig.Listen(context.Background(), "tcp4", a); err != nil {
			pc.Close()
			return 0, err
		}
		return got, nil
	}
	var err error
	if addr.Port() == 0 {
		_, err = cfg.Listeners.Ports.Allocate(open)
	} else {
		_, err = open(int(addr.Port()))
	}
	if err != nil {
		return nil, nil, fmt.Errorf("DNS stub on %s: %w", addr, err)
	}
	return pc, ln, nil
}

// newDNS makes the stub for cfg, or nil when no --cluster-dns is set.
func newDNS(cfg *Config) (*dnsstub.Server, error) {
	if !cfg.ClusterDNS.IsValid() {
		return nil, nil
	}
	ups := cfg.DNSUpstreams
	if len(ups) == 0 {
		var err error
		if ups, err = dnsstub.Upstreams("/etc/resolv.conf"); err != nil {
			return nil, fmt.Errorf("read the node's DNS servers (set --dns-upstream): %w", err)
		}
		if len(ups) == 0 {
			return nil, errors.New("/etc/resolv.conf names no DNS server we can forward to (loopback ones are skipped): set --dns-upstream")
		}
	}
	return dnsstub.NewServer(cfg.dnsConfig(ups))
}
