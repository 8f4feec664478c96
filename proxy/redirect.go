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
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/userspace"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/replyroute"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

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
	forced   bool                // write at the next point even if rules are unchanged
}

func (f *redirectFrontend) mode() Mode { return ModeRedirect }
func (f *redirectFrontend) ipv6() bool { return f.v6.table != nil }

func (f *redirectFrontend) binds(p *service.Port) []netip.AddrPort {
	return f.listeners.RedirectBinds(p)
}

func (f *redirectFrontend) dnsListen(netip.Addr) netip.AddrPort {
	return f.listeners.RedirectBinds(nil)[0]
}

func (f *redirectFrontend) point(s service.Snapshot, bound map[service.Key][]netip.AddrPort, dns *dnsTarget) (bool, error) {
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
	wrote4, err4 := f.v4.write(v4)
	wrote6, err6 := f.v6.write(v6)
	return wrote4 || wrote6, errors.Join(err4, err6)
}

func (f *redirectFrontend) rules() ([]iptables.Rule, error) {
	var out []iptables.Rule
	for _, t := range []*iptables.Table{f.v4.table, f.v6.table} {
		if t == nil {
			continue
		}
		rs, err := t.Rules()
		if err != nil {
			return nil, err
		}
		out = append(out, rs...)
	}
	return out, nil
}

// resync makes the next point write both tables, even when the rules look
// as last written: someone may have changed the kernel's copy.
func (f *redirectFrontend) resync() {
	f.v4.forced, f.v6.forced = true, true
}

// write makes the table hold rs. Most changes are endpoint changes, which
// leave every rule as it was: the listeners alone follow them, and iptables
// is not run, unless a resync asked for a write.
func (t *family) write(rs []iptables.Redirect) (bool, error) {
	if t.table == nil {
		return false, nil
	}
	if !t.forced && t.written != nil && slices.Equal(rs, t.written) {
		return false, nil
	}
	old := t.written
	t.written, t.forced = nil, false
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

// dnsRuleComment marks the rules that lead to the DNS stub.
const dnsRuleComment = "kube-userspace-proxy/dns"

// redirects lists the rules for s, and for the DNS stub when dns is not
// nil. Port 53 of the cluster DNS IP is the stub's, whatever Service uses
// that address too. An address:port that two service ports claim is given
// to the first in key order; the other is reported.
func redirects(s service.Snapshot, ports map[service.Key]int, dns *dnsTarget) ([]iptables.Redirect, []error) {
	var rs []iptables.Redirect
	var errs []error
	if dns != nil {
		for _, proto := range []string{"udp", "tcp"} {
			rs = append(rs, iptables.Redirect{Kind: iptables.ClusterIP, IP: dns.ip, Port: dnsPort, Protocol: proto, ToPort: dns.listen.Port(), Comment: dnsRuleComment})
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
