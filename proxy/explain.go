package proxy

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/miekg/dns"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/iptables"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/userspace"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// Explanation is a Service's whole path through this node as it is now:
// what `kube-userspace-proxy explain` prints. /explain on the metrics
// address serves it as JSON.
type Explanation struct {
	Mode  Mode              `json:"mode"`
	Ports []PortExplanation `json:"ports"`
}

// PortExplanation is one service port (of one IP family) from its
// frontends to its endpoints.
type PortExplanation struct {
	Name      string `json:"name"` // namespace/name:port
	Protocol  string `json:"protocol"`
	Family    string `json:"family"`
	Frontends []Frontend
	// Listener are the addresses of our sockets for this port.
	Listener  []string         `json:"listener"`
	Affinity  string           `json:"affinity"`
	Endpoints []EndpointReport `json:"endpoints"`
	// Dialing are the connections waiting for an endpoint to answer.
	Dialing int `json:"dialing"`
	// DNS are the names the embedded DNS stub answers with this port's
	// addresses (none without --cluster-dns).
	DNS []string `json:"dns,omitempty"`
}

// Frontend is one address clients use, and the rules that catch it.
type Frontend struct {
	Kind    string       `json:"kind"` // ClusterIP, ExternalIP, LoadBalancerIP, NodePort
	Address string       `json:"address"`
	Rules   []RuleReport `json:"rules,omitempty"`
	// Note says how the packet gets to us where no rule does it (bind
	// mode), or why this address is not served.
	Note string `json:"note,omitempty"`
}

// RuleReport is one of our nat rules with its counter.
type RuleReport struct {
	Hook    string `json:"hook"` // the kernel hook whose chain jumps to ours
	Chain   string `json:"chain"`
	Rule    string `json:"rule"`
	Packets uint64 `json:"packets"`
}

// EndpointReport is one endpoint, what its slice says of it, and what we
// hold to it.
type EndpointReport struct {
	Address     string `json:"address"`
	Ready       bool   `json:"ready"`
	Serving     bool   `json:"serving"`
	Terminating bool   `json:"terminating"`
	Node        string `json:"node,omitempty"`
	// Chosen says the endpoint gets new connections.
	Chosen      bool `json:"chosen"`
	Connections int  `json:"connections"`
	Sessions    int  `json:"sessions"`
	Pins        int  `json:"pins"`
}

// applied is what the apply loop last made the node serve.
type applied struct {
	snap  service.Snapshot
	bound map[service.Key][]netip.AddrPort
}

// explainer answers /explain from the last applied state, the listeners
// and the kernel's rule counters.
type explainer struct {
	state     atomic.Pointer[applied]
	listeners *userspace.Listeners
	front     frontend
	domain    string // the DNS stub's, as an FQDN; empty without one
}

// ServeHTTP answers /explain?service=NAMESPACE/NAME or
// /explain?address=IP:PORT.
func (e *explainer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ex, err := e.explain(r.URL.Query().Get("service"), r.URL.Query().Get("address"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(ex)
}

func (e *explainer) explain(svc, addr string) (Explanation, error) {
	st := e.state.Load()
	if st == nil {
		return Explanation{}, fmt.Errorf("nothing applied yet: the proxy is still waiting for its first state")
	}
	match, err := portMatcher(svc, addr)
	if err != nil {
		return Explanation{}, err
	}
	rules, err := e.front.rules()
	if err != nil {
		return Explanation{}, fmt.Errorf("read the rules' counters: %w", err)
	}
	ex := Explanation{Mode: e.front.mode()}
	for i := range st.snap.Ports {
		p := &st.snap.Ports[i]
		if match(p) {
			ex.Ports = append(ex.Ports, e.port(p, st.bound[p.Key()], rules))
		}
	}
	if len(ex.Ports) == 0 {
		return Explanation{}, fmt.Errorf("no service port of this node matches %s%s (headless and ExternalName Services have none)", svc, addr)
	}
	return ex, nil
}

// portMatcher selects service ports by Service name or by one of their
// frontend addresses.
func portMatcher(svc, addr string) (func(*service.Port) bool, error) {
	switch {
	case svc != "" && addr == "":
		ns, name, ok := strings.Cut(svc, "/")
		if !ok || ns == "" || name == "" {
			return nil, fmt.Errorf("service %q: want NAMESPACE/NAME", svc)
		}
		return func(p *service.Port) bool { return p.Name.Namespace == ns && p.Name.Name == name }, nil
	case addr != "" && svc == "":
		ap, err := netip.ParseAddrPort(addr)
		if err != nil {
			return nil, fmt.Errorf("address %q: want IP:PORT, such as 10.96.0.11:80", addr)
		}
		return func(p *service.Port) bool {
			ip, port := ap.Addr().Unmap(), ap.Port()
			return (port == p.Port && slices.Contains(serviceIPs(p), ip)) || (p.NodePort != 0 && port == p.NodePort && ip.Is6() == p.ClusterIP.Is6())
		}, nil
	default:
		return nil, fmt.Errorf("ask for one service (NAMESPACE/NAME) or one address (IP:PORT)")
	}
}

func (e *explainer) port(p *service.Port, bound []netip.AddrPort, rules []iptables.Rule) PortExplanation {
	family := "IPv4"
	if p.ClusterIP.Is6() {
		family = "IPv6"
	}
	pe := PortExplanation{Name: p.Name.String(), Protocol: string(p.Protocol), Family: family, Affinity: "None"}
	if p.Affinity.ClientIP {
		pe.Affinity = fmt.Sprintf("ClientIP for %s", p.Affinity.Timeout)
	}
	add := func(kind iptables.Kind, ip netip.Addr, port uint16) {
		f := Frontend{Kind: kindName(kind), Address: netip.AddrPortFrom(ip, port).String()}
		if kind == iptables.NodePort {
			f.Address = fmt.Sprintf("every node address, port %d", port)
		}
		f.Rules = catching(rules, p, kind, ip, port)
		if e.front.mode() == ModeBind {
			f.Note = "a local address of the node: our socket is bound to it, no rule"
		} else if len(f.Rules) == 0 {
			f.Note = "no rule catches it: see the proxy's log (a conflict with another Service, or no listener)"
		}
		pe.Frontends = append(pe.Frontends, f)
	}
	add(iptables.ClusterIP, p.ClusterIP, p.Port)
	for _, ip := range p.ExternalIPs {
		add(iptables.ExternalIP, ip, p.Port)
	}
	for _, ip := range p.LoadBalancerIPs {
		add(iptables.LoadBalancerIP, ip, p.Port)
	}
	if p.NodePort != 0 {
		add(iptables.NodePort, netip.Addr{}, p.NodePort)
	}
	for _, a := range bound {
		pe.Listener = append(pe.Listener, a.String())
	}
	use, _ := e.listeners.Use(p.Key())
	pe.Dialing = use.Dialing
	for _, k := range p.Known {
		pe.Endpoints = append(pe.Endpoints, EndpointReport{Address: k.Addr.String(), Ready: k.Ready, Serving: k.Serving, Terminating: k.Terminating,
			Node: k.Node, Chosen: slices.Contains(p.Endpoints, k.Addr),
			Connections: use.Connections[k.Addr], Sessions: use.Sessions[k.Addr], Pins: use.Pins[k.Addr]})
	}
	if e.domain != "" {
		pe.DNS = dnsNames(p, e.domain)
	}
	return pe
}

// catching are the rules that catch kind ip:port of p: ours carry p's name
// as their comment, and the address and port they match.
func catching(rules []iptables.Rule, p *service.Port, kind iptables.Kind, ip netip.Addr, port uint16) []RuleReport {
	var out []RuleReport
	for _, r := range rules {
		if !strings.Contains(r.Spec, p.Name.String()) || !strings.Contains(r.Spec, fmt.Sprintf(" --dport %d ", port)) ||
			!strings.Contains(r.Spec, "-p "+strings.ToLower(string(p.Protocol))+" ") {
			continue
		}
		nodePortChain := strings.HasPrefix(r.Chain, iptables.ChainNodePortContainer) || strings.HasPrefix(r.Chain, iptables.ChainNodePortHost)
		if (kind == iptables.NodePort) != nodePortChain {
			continue
		}
		if kind != iptables.NodePort && !strings.Contains(r.Spec, "-d "+netip.PrefixFrom(ip, ip.BitLen()).String()+" ") {
			continue
		}
		hook := "nat PREROUTING (pods, other hosts)"
		if strings.HasPrefix(r.Chain, iptables.ChainPortalsHost) || strings.HasPrefix(r.Chain, iptables.ChainNodePortHost) {
			hook = "nat OUTPUT (the node itself)"
		}
		out = append(out, RuleReport{Hook: hook, Chain: r.Chain, Rule: r.Spec, Packets: r.Packets})
	}
	return out
}

func kindName(k iptables.Kind) string {
	switch k {
	case iptables.ExternalIP:
		return "ExternalIP"
	case iptables.LoadBalancerIP:
		return "LoadBalancerIP"
	case iptables.NodePort:
		return "NodePort"
	default:
		return "ClusterIP"
	}
}

// dnsNames are the names the stub answers with p's addresses, in the
// Kubernetes DNS schema: the Service's A or AAAA record, the port's SRV
// record, and the ClusterIP's PTR record.
func dnsNames(p *service.Port, domain string) []string {
	svc := fmt.Sprintf("%s.%s.svc.%s", p.Name.Name, p.Name.Namespace, domain)
	rtype := "A"
	if p.ClusterIP.Is6() {
		rtype = "AAAA"
	}
	out := []string{fmt.Sprintf("%s %s %s", svc, rtype, p.ClusterIP)}
	if p.Name.Port != "" {
		out = append(out, fmt.Sprintf("_%s._%s.%s SRV %d %s", p.Name.Port, strings.ToLower(string(p.Protocol)), svc, p.Port, svc))
	}
	if rev, err := dns.ReverseAddr(p.ClusterIP.String()); err == nil {
		out = append(out, fmt.Sprintf("%s PTR %s", rev, svc))
	}
	return out
}
