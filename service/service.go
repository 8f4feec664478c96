// Package service is the vocabulary every other part of the proxy speaks: a
// Service port, the endpoints behind it, and the Snapshot that holds them all.
//
// A Kubernetes Service is a stable virtual address (the ClusterIP) in front of
// a changing set of pods. Each port of a Service is proxied on its own, so the
// unit here is the service port, named namespace/name:port exactly as
// kube-proxy names it. Values in this package are immutable once built: a
// Snapshot is made whole by a source (a manifest or the API server) and handed
// to the parts that act on it, which never change it. See docs/architecture.md.
package service

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"time"
)

// PortName names one port of one Service: namespace/name:port. The port part is
// the Service port's name, which is empty when a Service has a single unnamed
// port.
type PortName struct {
	Namespace string
	Name      string
	Port      string
}

// String gives "namespace/name:port", or "namespace/name" for an unnamed port,
// as kube-proxy writes it in logs and rule comments.
func (n PortName) String() string {
	if n.Port == "" {
		return n.Namespace + "/" + n.Name
	}
	return n.Namespace + "/" + n.Name + ":" + n.Port
}

// Compare orders port names by namespace, name, then port.
func (n PortName) Compare(o PortName) int {
	return cmp.Or(
		cmp.Compare(n.Namespace, o.Namespace),
		cmp.Compare(n.Name, o.Name),
		cmp.Compare(n.Port, o.Port),
	)
}

// Protocol is the transport of a service port. The proxy handles TCP and UDP;
// SCTP Services are refused when they are read.
type Protocol string

// The protocols a userspace proxy can carry.
const (
	TCP Protocol = "TCP"
	UDP Protocol = "UDP"
)

// Key identifies what gets one listener: a service port, its protocol and
// its IP family. A dual-stack Service has a ClusterIP of each family, and
// each family is proxied on its own, to endpoints of that family, as
// kube-proxy does (one proxier per family).
type Key struct {
	Name     PortName
	Protocol Protocol
	IPv6     bool
}

// String is "namespace/name:port/TCP", with "/IPv6" added for the IPv6
// half of a service port.
func (k Key) String() string {
	s := k.Name.String() + "/" + string(k.Protocol)
	if k.IPv6 {
		s += "/IPv6"
	}
	return s
}

// Compare orders keys by name, protocol, then family (IPv4 first).
func (k Key) Compare(o Key) int {
	return cmp.Or(k.Name.Compare(o.Name), cmp.Compare(k.Protocol, o.Protocol), compareBool(k.IPv6, o.IPv6))
}

func compareBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	default:
		return -1
	}
}

// DefaultAffinityTimeout is how long a ClientIP pin lasts when the Service does
// not say (Kubernetes' DefaultClientIPServiceAffinitySeconds, 3 hours).
const DefaultAffinityTimeout = 10800 * time.Second

// Affinity is a Service's sessionAffinity. The zero value means None: every new
// connection is balanced on its own.
type Affinity struct {
	// ClientIP pins each client IP to one endpoint.
	ClientIP bool
	// Timeout is how long a pin lasts after its last use
	// (sessionAffinityConfig.clientIP.timeoutSeconds).
	Timeout time.Duration
}

// Port is one service port of one IP family as the proxy serves it: the
// addresses clients use (frontends) and the endpoints traffic is spread
// over, all of the ClusterIP's family.
type Port struct {
	Name     PortName
	Protocol Protocol

	// ClusterIP is the Service's virtual IP, and Port the port on it
	// (spec.ports[].port).
	ClusterIP netip.Addr
	Port      uint16
	// NodePort, when not zero, is also served on every local address of the
	// node (type NodePort and LoadBalancer).
	NodePort uint16
	// ExternalIPs (spec.externalIPs) and LoadBalancerIPs
	// (status.loadBalancer.ingress[].ip) are served like the ClusterIP.
	ExternalIPs     []netip.Addr
	LoadBalancerIPs []netip.Addr

	Affinity Affinity
	// InternalLocal is internalTrafficPolicy Local: Endpoints hold only
	// this node's.
	InternalLocal bool
	// ProxyProtocol makes each TCP connection to an endpoint start with a
	// PROXY protocol v2 header naming the client and the address it
	// connected to (the Service's AnnotationProxyProtocol).
	ProxyProtocol bool

	// Endpoints are the pod addresses (pod IP and targetPort) chosen for
	// traffic, sorted. Empty means connections are refused.
	Endpoints []netip.AddrPort
	// Known are all the endpoints the EndpointSlices list for this port
	// and family, chosen or not, with their conditions, sorted: what
	// `explain` shows beside Endpoints.
	Known []EndpointState
}

// EndpointState is one endpoint as its EndpointSlice describes it.
type EndpointState struct {
	Addr netip.AddrPort
	// The slice's conditions, an unset one read as kube-proxy reads it
	// (ready and serving, not terminating).
	Ready, Serving, Terminating bool
	// Node is the endpoint's nodeName; empty when the slice gives none.
	Node string
}

// AnnotationProxyProtocol, set to "v2" on a Service, makes its TCP ports
// send endpoints a PROXY protocol v2 header first: for endpoints (HAProxy,
// nginx, Envoy, most ingress controllers) that learn the client's address
// that way, where it cannot be kept on the packets.
const AnnotationProxyProtocol = "kube-userspace-proxy.io/proxy-protocol"

// Key is the listener key of p.
func (p Port) Key() Key { return Key{Name: p.Name, Protocol: p.Protocol, IPv6: p.ClusterIP.Is6()} }

// Snapshot is the whole desired state of the node at one moment: every
// proxied service port, sorted by Key, and every Service as DNS publishes
// it. Build it with NewSnapshot.
type Snapshot struct {
	Ports []Port
	// Services is the DNS view: every Service, headless and ExternalName
	// ones too (they have no port to proxy, but names to answer).
	Services []Service
	// Pods are the pod addresses the proxy knows of, sorted: those that
	// EndpointSlices name as a Pod's, and the Pods of a manifest. DNS
	// answers pod records (<a-b-c-d>.<ns>.pod.<zone>) for them alone when
	// it verifies pods.
	Pods []PodAddress
}

// PodAddress is one address of a pod in its namespace.
type PodAddress struct {
	Namespace string
	IP        netip.Addr
}

// Compare orders pod addresses by namespace, then IP.
func (a PodAddress) Compare(b PodAddress) int {
	return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), a.IP.Compare(b.IP))
}

// Service is one Service as DNS sees it (the Kubernetes DNS-Based Service
// Discovery specification).
type Service struct {
	Namespace, Name string
	// ClusterIPs are the virtual IPs; none for a headless Service.
	ClusterIPs []netip.Addr
	// ExternalName, when set, makes the Service an alias (a CNAME).
	ExternalName string
	// Ports are the Service's ports (spec.ports).
	Ports []NamedPort
	// Endpoints are the endpoints DNS publishes: the ready ones, which
	// includes every listed one when the Service sets
	// publishNotReadyAddresses.
	Endpoints []DNSEndpoint
}

// Headless reports whether s has no virtual IP: its name resolves to its
// endpoints.
func (s *Service) Headless() bool { return len(s.ClusterIPs) == 0 && s.ExternalName == "" }

// NamedPort is a port with its name and protocol.
type NamedPort struct {
	Name     string
	Protocol Protocol
	Port     uint16
}

// DNSEndpoint is one endpoint of a Service, as DNS publishes it.
type DNSEndpoint struct {
	IP netip.Addr
	// Hostname is the endpoint's own DNS label: its hostname field, else
	// its IP with dashes (10-244-1-2), as CoreDNS names it.
	Hostname string
	// Ports are the endpoint's ports (the targets), by Service port name.
	Ports []NamedPort
}

// NewSnapshot sorts ports by key and returns them as a Snapshot. It reports an
// error if two ports have the same key.
func NewSnapshot(ports []Port) (Snapshot, error) {
	ports = slices.Clone(ports)
	slices.SortFunc(ports, func(a, b Port) int { return a.Key().Compare(b.Key()) })
	for i := 1; i < len(ports); i++ {
		if ports[i-1].Key() == ports[i].Key() {
			return Snapshot{}, fmt.Errorf("service port %s appears twice", ports[i].Key())
		}
	}
	return Snapshot{Ports: ports}, nil
}

// Lookup returns the port with key k.
func (s Snapshot) Lookup(k Key) (*Port, bool) {
	i, ok := slices.BinarySearchFunc(s.Ports, k, func(p Port, k Key) int { return p.Key().Compare(k) })
	if !ok {
		return nil, false
	}
	return &s.Ports[i], true
}

// SameFrontends reports whether a and b are reached at the same addresses:
// ClusterIP, port, NodePort, external and load-balancer IPs.
func SameFrontends(a, b *Port) bool {
	return a.ClusterIP == b.ClusterIP && a.Port == b.Port && a.NodePort == b.NodePort &&
		slices.Equal(a.ExternalIPs, b.ExternalIPs) && slices.Equal(a.LoadBalancerIPs, b.LoadBalancerIPs)
}
