package snapshot

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

func ptr[T any](v T) *T { return &v }

func svc(name string, mutate func(*v1.Service)) *v1.Service {
	s := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
		Spec: v1.ServiceSpec{
			ClusterIP: "10.96.0.10",
			Ports:     []v1.ServicePort{{Name: "http", Port: 80, Protocol: v1.ProtocolTCP}},
		},
	}
	if mutate != nil {
		mutate(s)
	}
	return s
}

type ep struct {
	ip                          string
	ready, serving, terminating *bool
	node                        string
}

func slice(name, service string, port int32, eps ...ep) *discovery.EndpointSlice {
	s := &discovery.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "default", Name: name, Labels: map[string]string{discovery.LabelServiceName: service}},
		AddressType: discovery.AddressTypeIPv4,
		Ports:       []discovery.EndpointPort{{Name: ptr("http"), Protocol: ptr(v1.ProtocolTCP), Port: ptr(port)}},
	}
	for _, e := range eps {
		d := discovery.Endpoint{Addresses: []string{e.ip}, Conditions: discovery.EndpointConditions{Ready: e.ready, Serving: e.serving, Terminating: e.terminating}}
		if e.node != "" {
			d.NodeName = ptr(e.node)
		}
		s.Endpoints = append(s.Endpoints, d)
	}
	return s
}

func endpointsOf(t *testing.T, s service.Snapshot, name string) []string {
	t.Helper()
	p, ok := s.Lookup(service.Key{Name: service.PortName{Namespace: "default", Name: name, Port: "http"}, Protocol: service.TCP})
	if !ok {
		t.Fatalf("snapshot has no port for %s", name)
	}
	var out []string
	for _, e := range p.Endpoints {
		out = append(out, e.String())
	}
	return out
}

func TestEndpointSelection(t *testing.T) {
	yes, no := ptr(true), ptr(false)
	tests := []struct {
		name   string
		svc    *v1.Service
		slices []*discovery.EndpointSlice
		want   []string
	}{
		{"unset conditions mean ready", svc("a", nil),
			[]*discovery.EndpointSlice{slice("a-1", "a", 8080, ep{ip: "10.244.1.2"})},
			[]string{"10.244.1.2:8080"}},
		{"not ready is left out", svc("a", nil),
			[]*discovery.EndpointSlice{slice("a-1", "a", 8080, ep{ip: "10.244.1.2"}, ep{ip: "10.244.2.2", ready: no})},
			[]string{"10.244.1.2:8080"}},
		{"terminating serves only when nothing is ready", svc("a", nil),
			[]*discovery.EndpointSlice{slice("a-1", "a", 8080,
				ep{ip: "10.244.1.2", ready: no, serving: yes, terminating: yes},
				ep{ip: "10.244.2.2", ready: no, serving: no, terminating: yes})},
			[]string{"10.244.1.2:8080"}},
		{"terminating is ignored while something is ready", svc("a", nil),
			[]*discovery.EndpointSlice{slice("a-1", "a", 8080,
				ep{ip: "10.244.1.2", ready: no, serving: yes, terminating: yes},
				ep{ip: "10.244.3.2", ready: yes})},
			[]string{"10.244.3.2:8080"}},
		{"slices merge and duplicates count once", svc("a", nil),
			[]*discovery.EndpointSlice{
				slice("a-1", "a", 8080, ep{ip: "10.244.2.2"}, ep{ip: "10.244.1.2"}),
				slice("a-2", "a", 8080, ep{ip: "10.244.1.2"}),
				slice("b-1", "b", 8080, ep{ip: "10.244.9.2"}),
				slice("nolabel", "", 8080, ep{ip: "10.244.8.2"}),
			},
			[]string{"10.244.1.2:8080", "10.244.2.2:8080"}},
		{"internalTrafficPolicy Local keeps this node's endpoints", svc("a", func(s *v1.Service) {
			s.Spec.InternalTrafficPolicy = ptr(v1.ServiceInternalTrafficPolicyLocal)
		}),
			[]*discovery.EndpointSlice{slice("a-1", "a", 8080, ep{ip: "10.244.1.2", node: "node-a"}, ep{ip: "10.244.2.2", node: "node-b"})},
			[]string{"10.244.1.2:8080"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, warnings := Build([]*v1.Service{tt.svc}, tt.slices, "node-a")
			if len(warnings) > 0 {
				t.Errorf("warnings: %v", warnings)
			}
			if got := endpointsOf(t, s, tt.svc.Name); !slices.Equal(got, tt.want) {
				t.Errorf("endpoints = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestSkippedServices(t *testing.T) {
	services := []*v1.Service{
		svc("headless", func(s *v1.Service) { s.Spec.ClusterIP = "None" }),
		svc("external", func(s *v1.Service) { s.Spec.Type = v1.ServiceTypeExternalName; s.Spec.ExternalName = "example.org" }),
		svc("sctp", func(s *v1.Service) { s.Spec.ClusterIP = "10.96.0.12"; s.Spec.Ports[0].Protocol = v1.ProtocolSCTP }),
		svc("bad", func(s *v1.Service) { s.Spec.ClusterIP = "10.96.0.300" }),
		svc("twice", func(s *v1.Service) {
			s.Spec.ClusterIP = "10.96.0.14"
			s.Spec.ClusterIPs = []string{"10.96.0.14", "10.96.0.15"}
		}),
		svc("kept", func(s *v1.Service) { s.Spec.ClusterIP = "10.96.0.13" }),
	}
	s, warnings := Build(services, nil, "")
	if len(s.Ports) != 1 || s.Ports[0].Name.Name != "kept" {
		t.Errorf("snapshot ports = %v, want only kept", s.Ports)
	}
	joined := ""
	for _, w := range warnings {
		joined += w.Error() + "\n"
	}
	for _, want := range []string{"default/sctp:http: protocol SCTP is not supported", `clusterIP "10.96.0.300" is not an IP address`, "two addresses of one family"} {
		if !strings.Contains(joined, want) {
			t.Errorf("warnings %q lack %q", joined, want)
		}
	}
	if len(warnings) != 3 {
		t.Errorf("%d warnings, want 3 (headless and ExternalName are skipped silently)", len(warnings))
	}
}

// TestDualStack: each family of a dual-stack Service is a service port of
// its own, with the addresses and endpoints of its family only.
func TestDualStack(t *testing.T) {
	s := svc("ds", func(s *v1.Service) {
		s.Spec.ClusterIPs = []string{"fd00:96::10", "10.96.0.10"} // IPv6 primary
		s.Spec.IPFamilies = []v1.IPFamily{v1.IPv6Protocol, v1.IPv4Protocol}
		s.Spec.Ports[0].NodePort = 30080
		s.Spec.ExternalIPs = []string{"203.0.113.7", "2001:db8::7"}
		s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: "2001:db8::9"}, {IP: "198.51.100.9"}}
	})
	v4 := slice("ds-v4", "ds", 8080, ep{ip: "10.244.1.2"})
	v6 := slice("ds-v6", "ds", 8080, ep{ip: "fd00:244:1::2"}, ep{ip: "fd00:244:2::2"})
	v6.AddressType = discovery.AddressTypeIPv6
	snap, warnings := Build([]*v1.Service{s}, []*discovery.EndpointSlice{v4, v6}, "")
	if len(warnings) > 0 || len(snap.Ports) != 2 {
		t.Fatalf("ports %v, warnings %v; want two ports", snap.Ports, warnings)
	}
	for _, tt := range []struct {
		ipv6                    bool
		clusterIP, external, lb string
		endpoints               []string
	}{
		{false, "10.96.0.10", "203.0.113.7", "198.51.100.9", []string{"10.244.1.2:8080"}},
		{true, "fd00:96::10", "2001:db8::7", "2001:db8::9", []string{"[fd00:244:1::2]:8080", "[fd00:244:2::2]:8080"}},
	} {
		p, ok := snap.Lookup(service.Key{Name: service.PortName{Namespace: "default", Name: "ds", Port: "http"}, Protocol: service.TCP, IPv6: tt.ipv6})
		if !ok {
			t.Fatalf("no port for IPv6=%v", tt.ipv6)
		}
		var eps []string
		for _, e := range p.Endpoints {
			eps = append(eps, e.String())
		}
		if p.ClusterIP.String() != tt.clusterIP || p.NodePort != 30080 ||
			fmt.Sprint(p.ExternalIPs) != "["+tt.external+"]" || fmt.Sprint(p.LoadBalancerIPs) != "["+tt.lb+"]" || !slices.Equal(eps, tt.endpoints) {
			t.Errorf("IPv6=%v: port %+v, endpoints %v", tt.ipv6, p, eps)
		}
	}
}

func TestFrontendsAndAffinity(t *testing.T) {
	s := svc("a", func(s *v1.Service) {
		s.Spec.Type = v1.ServiceTypeLoadBalancer
		s.Spec.Ports[0].NodePort = 30080
		s.Spec.ExternalIPs = []string{"203.0.113.7", "bad", "203.0.113.7"}
		s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: "198.51.100.9"}, {Hostname: "lb.example.org"}}
		s.Spec.SessionAffinity = v1.ServiceAffinityClientIP
		s.Spec.SessionAffinityConfig = &v1.SessionAffinityConfig{ClientIP: &v1.ClientIPConfig{TimeoutSeconds: ptr[int32](60)}}
	})
	snap, _ := Build([]*v1.Service{s}, nil, "")
	p := snap.Ports[0]
	if p.NodePort != 30080 || len(p.ExternalIPs) != 1 || p.ExternalIPs[0] != netip.MustParseAddr("203.0.113.7") ||
		len(p.LoadBalancerIPs) != 1 || p.Affinity != (service.Affinity{ClientIP: true, Timeout: time.Minute}) {
		t.Errorf("port = %+v", p)
	}
}

// TestProxyProtocolAnnotation: "v2" turns the header on for TCP ports;
// any other value is reported and the Service served without it.
func TestProxyProtocolAnnotation(t *testing.T) {
	annotated := func(v string) func(*v1.Service) {
		return func(s *v1.Service) {
			s.Annotations = map[string]string{service.AnnotationProxyProtocol: v}
			s.Spec.Ports = append(s.Spec.Ports, v1.ServicePort{Name: "dns", Port: 53, Protocol: v1.ProtocolUDP})
		}
	}
	s, warnings := Build([]*v1.Service{svc("on", annotated("v2")), svc("typo", annotated("2")), svc("off", nil)}, nil, "")
	if len(warnings) != 1 || !strings.Contains(warnings[0].Error(), `"2"`) {
		t.Errorf("warnings = %v, want one naming the bad value", warnings)
	}
	for _, p := range s.Ports {
		want := p.Name.Name == "on" && p.Protocol == service.TCP
		if p.ProxyProtocol != want {
			t.Errorf("%s: ProxyProtocol = %v, want %v", p.Key(), p.ProxyProtocol, want)
		}
	}
}

// TestKnownPods: the pods a snapshot knows are those slices name as Pods'
// (ready or not), and a manifest's Pods.
func TestKnownPods(t *testing.T) {
	s1 := slice("a", "web", 80, ep{ip: "10.244.1.2"}, ep{ip: "10.244.1.3", ready: ptr(false)}, ep{ip: "10.244.9.9"})
	s1.Endpoints[0].TargetRef = &v1.ObjectReference{Kind: "Pod", Name: "web-1"}
	s1.Endpoints[1].TargetRef = &v1.ObjectReference{Kind: "Pod", Namespace: "default", Name: "web-2"}
	s, _ := Build([]*v1.Service{svc("web", nil)}, []*discovery.EndpointSlice{s1}, "")
	s = WithPods(s, []*v1.Pod{{ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "db"}, Status: v1.PodStatus{PodIP: "10.244.2.2"}}})
	want := []service.PodAddress{
		{Namespace: "default", IP: netip.MustParseAddr("10.244.1.2")},
		{Namespace: "default", IP: netip.MustParseAddr("10.244.1.3")},
		{Namespace: "prod", IP: netip.MustParseAddr("10.244.2.2")},
	}
	if !slices.Equal(s.Pods, want) {
		t.Errorf("pods = %v, want %v (10.244.9.9 has no Pod targetRef)", s.Pods, want)
	}
}
