package proxy

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/iptables"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

func TestRedirectsAndConflicts(t *testing.T) {
	ip := netip.MustParseAddr("10.96.0.10")
	a := service.Port{Name: service.PortName{Namespace: "default", Name: "a"}, Protocol: service.TCP, ClusterIP: ip, Port: 80, NodePort: 30080,
		ExternalIPs: []netip.Addr{netip.MustParseAddr("203.0.113.7")}, Endpoints: []netip.AddrPort{netip.MustParseAddrPort("10.244.1.2:8080")}}
	// b claims a's ClusterIP:port and NodePort: both are refused, its own
	// UDP port is fine, and marked as having no endpoints.
	b := service.Port{Name: service.PortName{Namespace: "default", Name: "b"}, Protocol: service.TCP, ClusterIP: ip, Port: 80, NodePort: 30080}
	bUDP := service.Port{Name: service.PortName{Namespace: "default", Name: "b"}, Protocol: service.UDP, ClusterIP: ip, Port: 80}
	// c has no listener, so it gets no rule.
	c := service.Port{Name: service.PortName{Namespace: "default", Name: "c"}, Protocol: service.TCP, ClusterIP: netip.MustParseAddr("10.96.0.12"), Port: 80}
	s, err := service.NewSnapshot([]service.Port{a, b, bUDP, c})
	if err != nil {
		t.Fatal(err)
	}
	rs, errs := redirects(s, map[service.Key]int{a.Key(): 1000, b.Key(): 1001, bUDP.Key(): 1002}, nil)
	want := []iptables.Redirect{
		{Kind: iptables.ClusterIP, IP: ip, Port: 80, Protocol: "tcp", ToPort: 1000, Comment: "default/a"},
		{Kind: iptables.ExternalIP, IP: netip.MustParseAddr("203.0.113.7"), Port: 80, Protocol: "tcp", ToPort: 1000, Comment: "default/a"},
		{Kind: iptables.NodePort, Port: 30080, Protocol: "tcp", ToPort: 1000, Comment: "default/a"},
		{Kind: iptables.ClusterIP, IP: ip, Port: 80, Protocol: "udp", ToPort: 1002, NoEndpoints: true, Comment: "default/b"},
	}
	if len(rs) != len(want) {
		t.Fatalf("redirects = %+v, want %+v", rs, want)
	}
	for i := range want {
		if rs[i] != want[i] {
			t.Errorf("redirect %d = %+v, want %+v", i, rs[i], want[i])
		}
	}
	if len(errs) != 2 || !strings.Contains(errs[0].Error(), "already served for default/a") {
		t.Errorf("conflicts = %v, want b's ClusterIP and NodePort refused", errs)
	}
}

// TestRedirectsDualStack: both halves of a dual-stack service port get
// their rules, each marked with its family, and share the NodePort number
// without a conflict (one rule in iptables, one in ip6tables).
func TestRedirectsDualStack(t *testing.T) {
	name := service.PortName{Namespace: "default", Name: "ds"}
	v4 := service.Port{Name: name, Protocol: service.TCP, ClusterIP: netip.MustParseAddr("10.96.0.10"), Port: 80, NodePort: 30080,
		Endpoints: []netip.AddrPort{netip.MustParseAddrPort("10.244.1.2:8080")}}
	v6 := v4
	v6.ClusterIP = netip.MustParseAddr("fd00:96::10")
	v6.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("[fd00:244::2]:8080")}
	s, err := service.NewSnapshot([]service.Port{v6, v4})
	if err != nil {
		t.Fatal(err)
	}
	rs, errs := redirects(s, map[service.Key]int{v4.Key(): 1000, v6.Key(): 1001}, nil)
	want := []iptables.Redirect{
		{Kind: iptables.ClusterIP, IP: v4.ClusterIP, Port: 80, Protocol: "tcp", ToPort: 1000, Comment: "default/ds"},
		{Kind: iptables.NodePort, Port: 30080, Protocol: "tcp", ToPort: 1000, Comment: "default/ds"},
		{Kind: iptables.ClusterIP, IPv6: true, IP: v6.ClusterIP, Port: 80, Protocol: "tcp", ToPort: 1001, Comment: "default/ds"},
		{Kind: iptables.NodePort, IPv6: true, Port: 30080, Protocol: "tcp", ToPort: 1001, Comment: "default/ds"},
	}
	if len(errs) != 0 || len(rs) != len(want) {
		t.Fatalf("redirects = %+v, conflicts %v; want %+v", rs, errs, want)
	}
	for i := range want {
		if rs[i] != want[i] {
			t.Errorf("redirect %d = %+v, want %+v", i, rs[i], want[i])
		}
	}
}

// TestNoLocalEndpoints counts Services, not ports, with a Local internal
// policy and nothing on this node.
func TestNoLocalEndpoints(t *testing.T) {
	port := func(name, port string, local bool, eps ...netip.AddrPort) service.Port {
		return service.Port{Name: service.PortName{Namespace: "default", Name: name, Port: port}, Protocol: service.TCP,
			ClusterIP: netip.MustParseAddr("10.96.0.10"), InternalLocal: local, Endpoints: eps}
	}
	ep := netip.MustParseAddrPort("10.244.1.2:80")
	s, err := service.NewSnapshot([]service.Port{
		port("a", "http", true), port("a", "https", true), // one Service, two ports
		port("b", "http", true, ep), // has a local endpoint
		port("c", "http", false),    // Cluster policy: not counted
	})
	if err != nil {
		t.Fatal(err)
	}
	if n := noLocalEndpoints(s); n != 1 {
		t.Errorf("noLocalEndpoints = %d, want 1", n)
	}
}

// TestTriggersBounded: while syncs keep failing, the trigger times kept
// for the network programming latency stop growing at maxTriggers, and the
// oldest are the ones kept.
func TestTriggersBounded(t *testing.T) {
	start := time.Unix(1000, 0)
	var ts []time.Time
	for i := range 3 * maxTriggers {
		ts = addTriggers(ts, []time.Time{start.Add(time.Duration(i) * time.Second)})
	}
	if len(ts) != maxTriggers || !ts[0].Equal(start) {
		t.Fatalf("after %d changes: %d trigger times, first %v; want %d, first %v", 3*maxTriggers, len(ts), ts[0], maxTriggers, start)
	}
}
