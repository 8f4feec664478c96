package proxy

import (
	"fmt"
	"net/netip"

	"github.com/sirupsen/logrus"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/iptables"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/localaddr"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// bindFrontend makes Service addresses local and binds listeners to them.
type bindFrontend struct {
	log    logrus.FieldLogger
	device *localaddr.Device
	// nodePortAddresses selects the node addresses NodePorts are served
	// on; empty means all of them (a wildcard socket).
	nodePortAddresses []netip.Prefix
}

func (f *bindFrontend) mode() Mode { return ModeBind }

// ipv6 is false: IPv6 addresses carry no label, so bind mode could not
// tell its addresses from the node's own (see localaddr); the IPv6 halves
// of Services need redirect mode.
func (f *bindFrontend) ipv6() bool { return false }

// binds is every address the Service port is reached at: its ClusterIP,
// external and load-balancer IPs on the Service port, and the node's
// addresses on the NodePort. A service port with no endpoints has no
// socket at all: its addresses stay local (see point), so the kernel
// itself refuses its clients, with a reset for TCP and ICMP port
// unreachable for UDP, as it does for any local port nobody listens on.
func (f *bindFrontend) binds(p *service.Port) []netip.AddrPort {
	if len(p.Endpoints) == 0 {
		return nil
	}
	var out []netip.AddrPort
	for _, ip := range serviceIPs(p) {
		out = append(out, netip.AddrPortFrom(ip, p.Port))
	}
	if p.NodePort != 0 {
		if len(f.nodePortAddresses) == 0 {
			out = append(out, netip.AddrPortFrom(netip.IPv4Unspecified(), p.NodePort))
		} else {
			addrs, err := localaddr.NodeAddresses(f.nodePortAddresses)
			if err != nil {
				f.log.WithError(err).Error("NodePort not served")
			}
			for _, ip := range addrs {
				out = append(out, netip.AddrPortFrom(ip, p.NodePort))
			}
		}
	}
	return out
}

func (f *bindFrontend) dnsListen(ip netip.Addr) netip.AddrPort {
	return netip.AddrPortFrom(ip, dnsPort)
}

// serviceIPs are the addresses of p that bind mode makes local.
func serviceIPs(p *service.Port) []netip.Addr {
	ips := append([]netip.Addr{p.ClusterIP}, p.ExternalIPs...)
	return append(ips, p.LoadBalancerIPs...)
}

// point adds the addresses of every service port that has a socket, or
// has none because it has no endpoints, and removes ours that no Service
// uses any more. The sockets were bound before the addresses existed
// (IP_FREEBIND), so traffic finds them listening. A port whose socket
// could not be opened (its port is taken on the node) gets no address:
// whatever holds the port would answer in the Service's name.
func (f *bindFrontend) point(s service.Snapshot, bound map[service.Key][]netip.AddrPort, dns *dnsTarget) (bool, error) {
	var want []netip.Addr
	if dns != nil {
		want = append(want, dns.ip)
	}
	for i := range s.Ports {
		p := &s.Ports[i]
		if len(bound[p.Key()]) == 0 && len(p.Endpoints) > 0 {
			continue
		}
		want = append(want, serviceIPs(p)...)
	}
	return true, f.device.Sync(dedupe(want))
}

// rules: bind mode writes none.
func (f *bindFrontend) rules() ([]iptables.Rule, error) { return nil, nil }

// resync does nothing: point makes the device hold exactly its addresses
// every time.
func (f *bindFrontend) resync() {}

func dedupe(ips []netip.Addr) []netip.Addr {
	seen := map[netip.Addr]bool{}
	var out []netip.Addr
	for _, ip := range ips {
		if !seen[ip] {
			seen[ip] = true
			out = append(out, ip)
		}
	}
	return out
}

func newBind(cfg *Config, log logrus.FieldLogger) (*bindFrontend, error) {
	if err := bindAddressFits(cfg); err != nil {
		return nil, err
	}
	device, err := localaddr.Open(proxyToken(cfg.ServiceProxyName))
	if err != nil {
		return nil, fmt.Errorf("bind mode: %w", err)
	}
	return &bindFrontend{log: log, device: device, nodePortAddresses: cfg.NodePortAddresses}, nil
}
