package proxy

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/conntrack"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/iptables"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/localaddr"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/userspace"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/replyroute"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// Modes: how Service traffic reaches our listeners (--mode).
const (
	// ModeRedirect: iptables nat rules redirect each Service address to a
	// listener on a port of its own. The default; the legacy userspace mode.
	ModeRedirect = "redirect"
	// ModeBind: no netfilter at all. Service addresses become addresses of
	// the node and the listeners bind them directly.
	ModeBind = "bind"
	// ModeAuto: redirect when the kernel can NAT, else bind.
	ModeAuto = "auto"
)

// A frontend is how Service traffic reaches our listeners: the one part that
// differs between modes. Everything else (sources, snapshots, listeners,
// balancing, splicing) is shared.
type frontend interface {
	// mode is the mode's name, for logs and /proxyMode.
	mode() string
	// ipv6 reports whether the IPv6 halves of service ports can be
	// served.
	ipv6() bool
	// binds says where each service port's listener sockets go.
	binds(p *service.Port) []netip.AddrPort
	// dnsListen is where the DNS stub's sockets go for cluster DNS IP ip
	// (a port of 0 means one from the proxy port range).
	dnsListen(ip netip.Addr) netip.AddrPort
	// point makes the Service addresses of s, and the cluster DNS IP when
	// dns is not nil, lead to the sockets that were bound for them. It is
	// called after the sockets are open and before unwanted ones are
	// closed. With full unset it may skip writing what it wrote last time;
	// full (the periodic pass) writes everything again, putting back what
	// someone else removed. It reports whether it wrote anything.
	point(s service.Snapshot, bound map[service.Key][]netip.AddrPort, dns *dnsTarget, full bool) (bool, error)
}

// redirectFrontend points Service addresses at listeners with iptables:
// IPv4 addresses with iptables, IPv6 ones with ip6tables.
type redirectFrontend struct {
	log       logrus.FieldLogger
	listeners *userspace.Listeners
	v4, v6    family // v6.table is nil when the node cannot NAT IPv6
}

// family is one IP family's rule table, and what we last wrote to it.
type family struct {
	log      logrus.FieldLogger
	ipv6     bool
	table    *iptables.Table
	failures prometheus.Counter  // failed iptables-restore runs
	written  []iptables.Redirect // nil until a write succeeds
}

func (f *redirectFrontend) mode() string { return ModeRedirect }
func (f *redirectFrontend) ipv6() bool   { return f.v6.table != nil }

func (f *redirectFrontend) binds(p *service.Port) []netip.AddrPort {
	return f.listeners.RedirectBinds(p)
}

func (f *redirectFrontend) dnsListen(netip.Addr) netip.AddrPort {
	return f.listeners.RedirectBinds(nil)[0]
}

func (f *redirectFrontend) point(s service.Snapshot, bound map[service.Key][]netip.AddrPort, dns *dnsTarget, full bool) (bool, error) {
	ports := make(map[service.Key]int, len(bound))
	for k, addrs := range bound {
		ports[k] = int(addrs[0].Port())
	}
	rs, conflicts := redirects(s, ports, dns)
	for _, c := range conflicts {
		f.log.WithError(c).Error("Service address not served")
	}
	var v4, v6 []iptables.Redirect
	for _, r := range rs {
		if r.IPv6 {
			v6 = append(v6, r)
		} else {
			v4 = append(v4, r)
		}
	}
	wrote4, err4 := f.v4.write(v4, full)
	wrote6, err6 := f.v6.write(v6, full)
	return wrote4 || wrote6, errors.Join(err4, err6)
}

// write makes the table hold rs. Most changes are endpoint changes, which
// leave every rule as it was: the listeners alone follow them, and iptables
// is not run. full writes all the same.
func (t *family) write(rs []iptables.Redirect, full bool) (bool, error) {
	if t.table == nil {
		return false, nil
	}
	if !full && t.written != nil && slices.Equal(rs, t.written) {
		return false, nil
	}
	old := t.written
	t.written = nil
	if err := t.table.Sync(rs); err != nil {
		t.failures.Inc()
		return true, err
	}
	t.written = append([]iptables.Redirect{}, rs...) // non-nil even when empty
	t.clearStale(old, rs)
	return true, nil
}

// clearStale deletes the conntrack entries of flows that no longer go
// where the rules rs send them (see package conntrack), when rules were
// added or UDP ones removed since old (nil: unknown, as after a start).
func (t *family) clearStale(old, rs []iptables.Redirect) {
	current, before := mappings(rs), mappings(old)
	var removed []conntrack.Mapping
	for m := range before {
		if !m.TCP && !current[m] {
			removed = append(removed, m)
		}
	}
	added := false
	for m := range current {
		added = added || !before[m]
	}
	if old != nil && !added && len(removed) == 0 {
		return
	}
	n, err := conntrack.ClearStale(t.ipv6, slices.Collect(maps.Keys(current)), removed)
	if err != nil {
		// Only flows that started before the change stay stale.
		t.log.WithError(err).Warn("Could not clear stale conntrack entries")
		return
	}
	if n > 0 {
		t.log.WithField("entries", n).Info("Cleared conntrack entries that led elsewhere than the rules now say")
	}
}

// mappings are the rules of rs as conntrack sees them: the ones that lead
// to a listener with endpoints. The flows of a service port that lost its
// endpoints are cleared like those of a removed one, so that a UDP
// client's next datagram is a new flow, which the filter table refuses.
func mappings(rs []iptables.Redirect) map[conntrack.Mapping]bool {
	ms := make(map[conntrack.Mapping]bool, len(rs))
	for _, r := range rs {
		if r.NoEndpoints {
			continue
		}
		ip := r.IP
		if r.Kind == iptables.NodePort {
			ip = netip.Addr{}
		}
		ms[conntrack.Mapping{TCP: r.Protocol == "tcp", IP: ip, Port: r.Port, Listener: r.ToPort}] = true
	}
	return ms
}

// redirects lists the rules for s, and for the DNS stub when dns is not
// nil. Port 53 of the cluster DNS IP is the stub's, whatever Service uses
// that address too. An address:port that two service ports claim is given
// to the first in key order; the other is reported.
func redirects(s service.Snapshot, ports map[service.Key]int, dns *dnsTarget) ([]iptables.Redirect, []error) {
	var rs []iptables.Redirect
	var errs []error
	if dns != nil {
		for _, proto := range []string{"udp", "tcp"} {
			rs = append(rs, iptables.Redirect{Kind: iptables.ClusterIP, IP: dns.ip, Port: dnsPort, Protocol: proto, ToPort: dns.listen.Port(), Comment: "kube-userspace-proxy/dns"})
		}
	}
	owner := map[string]service.Key{}
	add := func(p *service.Port, kind iptables.Kind, ip netip.Addr, port uint16, listener int) {
		if kind != iptables.NodePort && dns.claims(ip, port) {
			return // answered by the DNS stub
		}
		proto := strings.ToLower(string(p.Protocol))
		claim := fmt.Sprintf("%s/%s", netip.AddrPortFrom(ip, port), proto)
		if kind == iptables.NodePort {
			// Each half of a dual-stack Service has the NodePort on
			// node addresses of its family.
			claim = fmt.Sprintf("nodePort %d/%s", port, proto)
			if p.ClusterIP.Is6() {
				claim += " on IPv6"
			}
		}
		if other, ok := owner[claim]; ok && other != p.Key() {
			errs = append(errs, fmt.Errorf("%s of %s is already served for %s", claim, p.Name, other.Name))
			return
		}
		owner[claim] = p.Key()
		rs = append(rs, iptables.Redirect{Kind: kind, IPv6: p.ClusterIP.Is6(), IP: ip, Port: port, Protocol: proto, ToPort: uint16(listener),
			NoEndpoints: len(p.Endpoints) == 0, Comment: p.Name.String()})
	}
	for i := range s.Ports {
		p := &s.Ports[i]
		listener, ok := ports[p.Key()]
		if !ok {
			continue
		}
		add(p, iptables.ClusterIP, p.ClusterIP, p.Port, listener)
		for _, ip := range p.ExternalIPs {
			add(p, iptables.ExternalIP, ip, p.Port, listener)
		}
		for _, ip := range p.LoadBalancerIPs {
			add(p, iptables.LoadBalancerIP, ip, p.Port, listener)
		}
		if p.NodePort != 0 {
			add(p, iptables.NodePort, netip.Addr{}, p.NodePort, listener)
		}
	}
	return rs, errs
}

// bindFrontend makes Service addresses local and binds listeners to them.
type bindFrontend struct {
	log    logrus.FieldLogger
	device *localaddr.Device
	// nodePortAddresses selects the node addresses NodePorts are served
	// on; empty means all of them (a wildcard socket).
	nodePortAddresses []netip.Prefix
}

func (f *bindFrontend) mode() string { return ModeBind }

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
func (f *bindFrontend) point(s service.Snapshot, bound map[service.Key][]netip.AddrPort, dns *dnsTarget, _ bool) (bool, error) {
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

// newFrontend makes the frontend for mode. For auto, creating our nat chains
// is the probe: if the kernel or iptables cannot, bind mode is used, and one
// log line says why.
func newFrontend(cfg *Config, log logrus.FieldLogger, listeners *userspace.Listeners, restoreFailures prometheus.Counter) (frontend, error) {
	mode := cfg.Mode
	if mode == "" {
		mode = ModeRedirect
	}
	switch mode {
	case ModeRedirect:
		f, err := newRedirect(cfg, log, listeners, restoreFailures)
		if err != nil {
			return nil, err
		}
		log.WithFields(logrus.Fields{"iptablesBackend": f.v4.table.Backend(), "ipv6": f.ipv6()}).Info("Mode redirect: iptables sends Service traffic to our listeners")
		return f, nil
	case ModeBind:
		f, err := newBind(cfg, log)
		if err != nil {
			return nil, err
		}
		log.WithField("device", f.device.Name()).Info("Mode bind: Service addresses are local to the node; no netfilter rules")
		dropSourcePreservation(cfg, log, listeners)
		return f, nil
	case ModeAuto:
		f, err := newRedirect(cfg, log, listeners, restoreFailures)
		if err == nil {
			err = f.v4.table.Probe() // our nat chains, their rules untouched
		}
		if err == nil {
			log.WithField("iptablesBackend", f.v4.table.Backend()).Info("Mode auto chose redirect: the kernel can NAT")
			return f, nil
		}
		b, berr := newBind(cfg, log)
		if berr != nil {
			return nil, fmt.Errorf("mode auto: redirect failed (%v) and bind failed: %w", err, berr)
		}
		log.WithError(err).WithField("device", b.device.Name()).Warn("Mode auto chose bind: the kernel cannot NAT (creating our nat chain failed)")
		dropSourcePreservation(cfg, log, listeners)
		return b, nil
	default:
		return nil, fmt.Errorf("--mode %q: want redirect, bind or auto", mode)
	}
}

func newRedirect(cfg *Config, log logrus.FieldLogger, listeners *userspace.Listeners, restoreFailures prometheus.Counter) (*redirectFrontend, error) {
	backend := cfg.Backend
	if backend == "" {
		var err error
		if backend, err = iptables.DetectBackend(); err != nil {
			return nil, err
		}
	}
	chains := iptables.ChainsFor(cfg.ServiceProxyName)
	if cfg.Listeners.PreserveSource {
		// Replies to connections made from a client pod's address are
		// marked (mangle) and routed to local delivery (replyroute).
		if err := replyroute.Default.Ensure(); err != nil {
			return nil, fmt.Errorf("--preserve-source-ip: %w", err)
		}
		chains.ReplyMark = replyroute.Default.Mark
		log.WithField("localPodCIDRs", localPodCIDRs(cfg)).Info("Endpoints see the client's own address for connections from this node's pods")
	}
	table, err := iptables.New(backend, iptables.IPv4, cfg.Listeners.BindAddress, chains)
	if err != nil {
		return nil, err
	}
	f := &redirectFrontend{log: log, listeners: listeners, v4: family{log: log, table: table, failures: restoreFailures}}
	// IPv6: only where ip6tables can NAT. Making sure our chains exist is
	// the probe (it leaves their rules alone); without it, IPv4 is served
	// all the same.
	table6, err := iptables.New(backend, iptables.IPv6, netip.Addr{}, chains)
	if err == nil {
		err = table6.Probe()
	}
	if err != nil {
		log.WithError(err).Warn("ip6tables cannot NAT here: the IPv6 halves of Services are not served")
		return f, nil
	}
	f.v6 = family{log: log, ipv6: true, table: table6, failures: restoreFailures}
	return f, nil
}

func newBind(cfg *Config, log logrus.FieldLogger) (*bindFrontend, error) {
	if a := cfg.Listeners.BindAddress; a.IsValid() && !a.IsUnspecified() {
		return nil, errors.New("--bind-address applies to redirect mode only: in bind mode listeners bind the Service addresses themselves")
	}
	device, err := localaddr.Open(proxyToken(cfg.ServiceProxyName))
	if err != nil {
		return nil, fmt.Errorf("bind mode: %w", err)
	}
	return &bindFrontend{log: log, device: device, nodePortAddresses: cfg.NodePortAddresses}, nil
}

// dropSourcePreservation turns --preserve-source-ip off in bind mode, which
// has no mangle table to send the endpoints' replies back to us, and says
// so: traffic is served from the node's address, as without the flag.
func dropSourcePreservation(cfg *Config, log logrus.FieldLogger, listeners *userspace.Listeners) {
	if !cfg.Listeners.PreserveSource {
		return
	}
	listeners.DropSourcePreservation()
	log.Warn("--preserve-source-ip needs redirect mode (netfilter's mangle table and socket match); in bind mode endpoints see the node's address")
}

// localPodCIDRs says where the local pod CIDRs come from, for the log.
func localPodCIDRs(cfg *Config) string {
	if len(cfg.Listeners.PreserveSourceFrom) == 0 {
		return "the Node's spec.podCIDRs"
	}
	return fmt.Sprint(cfg.Listeners.PreserveSourceFrom)
}

// proxyToken tells one proxy's rules and addresses from another's on the
// same node: "" for the default proxy, so its names stay the plain ones.
func proxyToken(serviceProxyName string) string {
	if serviceProxyName == "" {
		return ""
	}
	return iptables.Token(serviceProxyName)
}
