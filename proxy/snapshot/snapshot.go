// Package snapshot turns Kubernetes objects, Services and the EndpointSlices
// that list their pods, into the proxy's service.Snapshot. Both sources (a
// manifest file, or the API server) end here, so from this point on there is
// one code path.
//
// The rules are kube-proxy's (pkg/proxy/endpointslicecache.go and
// pkg/proxy/topology.go):
//   - headless Services (clusterIP None) and ExternalName Services are not
//     proxied: DNS answers for them, no virtual IP exists;
//   - EndpointSlices belong to the Service named by their
//     kubernetes.io/service-name label; all slices of a Service are merged and
//     an address listed twice counts once;
//   - an endpoint condition left unset counts as ready and serving, and not
//     terminating;
//   - traffic goes to ready endpoints; when none is ready, to endpoints that
//     are serving and terminating (so a rolling update never drops traffic
//     while the old pods still serve);
//   - internalTrafficPolicy Local keeps ClusterIP traffic on endpoints of
//     this node.
package snapshot

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// Build returns the Snapshot for services and endpointSlices. nodeName is this
// node's name, for internalTrafficPolicy Local. Service ports that cannot be
// proxied (SCTP, a malformed ClusterIP) are left out and named in the
// returned warnings.
func Build(services []*v1.Service, endpointSlices []*discovery.EndpointSlice, nodeName string) (service.Snapshot, []error) {
	bySvc := make(map[[2]string][]*discovery.EndpointSlice)
	for _, s := range endpointSlices {
		name := s.Labels[discovery.LabelServiceName]
		if name == "" {
			continue // kube-proxy ignores a slice that names no Service
		}
		k := [2]string{s.Namespace, name}
		bySvc[k] = append(bySvc[k], s)
	}
	var ports []service.Port
	var warnings []error
	for _, svc := range services {
		if skip(svc) {
			continue
		}
		clusterIPs, err := clusterIPs(svc)
		if err != nil {
			warnings = append(warnings, err)
			continue
		}
		local := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == v1.ServiceInternalTrafficPolicyLocal
		proxyProtocol := false
		switch v, ok := svc.Annotations[service.AnnotationProxyProtocol]; {
		case !ok:
		case v == "v2":
			proxyProtocol = true
		default:
			warnings = append(warnings, fmt.Errorf("service %s/%s: annotation %s=%q: want \"v2\" (the PROXY protocol version sent); served without the header",
				svc.Namespace, svc.Name, service.AnnotationProxyProtocol, v))
		}
		for _, clusterIP := range clusterIPs {
			// Each family of a dual-stack Service is proxied on its own:
			// its ClusterIP, the external and load-balancer IPs of its
			// family, and the endpoints of its family.
			ipv6 := clusterIP.Is6()
			for _, sp := range svc.Spec.Ports {
				proto := service.Protocol(sp.Protocol)
				if proto == "" {
					proto = service.TCP
				}
				name := service.PortName{Namespace: svc.Namespace, Name: svc.Name, Port: sp.Name}
				if proto != service.TCP && proto != service.UDP {
					if !ipv6 || len(clusterIPs) == 1 { // say it once
						warnings = append(warnings, fmt.Errorf("service port %s: protocol %s is not supported by a userspace proxy; skipped", name, proto))
					}
					continue
				}
				ports = append(ports, service.Port{
					Name:            name,
					Protocol:        proto,
					ClusterIP:       clusterIP,
					Port:            uint16(sp.Port),
					NodePort:        uint16(sp.NodePort),
					ExternalIPs:     parseIPs(svc.Spec.ExternalIPs, ipv6),
					LoadBalancerIPs: ingressIPs(svc, ipv6),
					Affinity:        affinity(svc),
					InternalLocal:   local,
					ProxyProtocol:   proxyProtocol && proto == service.TCP,
				})
				p := &ports[len(ports)-1]
				p.Endpoints, p.Known = endpoints(bySvc[[2]string{svc.Namespace, svc.Name}], sp.Name, proto, ipv6, local, nodeName)
			}
		}
	}
	snap, err := service.NewSnapshot(ports)
	snap.Services = dnsServices(services, bySvc)
	snap.Pods = slicePods(endpointSlices)
	if err != nil {
		// Port names are unique within a Service, so this means two
		// objects claim one name: keep going with nothing rather than a
		// guess, and say why.
		return service.Snapshot{Services: snap.Services}, append(warnings, err)
	}
	return snap, warnings
}

// skip reports whether svc has no virtual IP to proxy: headless or
// ExternalName Services (kube-proxy's ShouldSkipService).
func skip(svc *v1.Service) bool {
	return svc.Spec.Type == v1.ServiceTypeExternalName ||
		svc.Spec.ClusterIP == "" || svc.Spec.ClusterIP == v1.ClusterIPNone
}

// clusterIPs are the Service's virtual IPs, one per family: spec.clusterIPs,
// or spec.clusterIP alone from an API server that predates dual-stack.
func clusterIPs(svc *v1.Service) ([]netip.Addr, error) {
	ss := svc.Spec.ClusterIPs
	if len(ss) == 0 {
		ss = []string{svc.Spec.ClusterIP}
	}
	var ips []netip.Addr
	for _, s := range ss {
		ip, err := netip.ParseAddr(s)
		if err != nil || ip.Zone() != "" {
			return nil, fmt.Errorf("service %s/%s: clusterIP %q is not an IP address; not proxied", svc.Namespace, svc.Name, s)
		}
		ip = ip.Unmap()
		if len(ips) > 0 && ips[0].Is6() == ip.Is6() {
			return nil, fmt.Errorf("service %s/%s: clusterIPs %v has two addresses of one family; not proxied", svc.Namespace, svc.Name, ss)
		}
		ips = append(ips, ip)
	}
	return ips, nil
}

func affinity(svc *v1.Service) service.Affinity {
	if svc.Spec.SessionAffinity != v1.ServiceAffinityClientIP {
		return service.Affinity{}
	}
	a := service.Affinity{ClientIP: true, Timeout: service.DefaultAffinityTimeout}
	if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
		a.Timeout = time.Duration(*c.ClientIP.TimeoutSeconds) * time.Second
	}
	return a
}

// parseIPs returns the addresses of ss of one family, IPv6 or IPv4,
// sorted and each once.
func parseIPs(ss []string, ipv6 bool) []netip.Addr {
	var ips []netip.Addr
	for _, s := range ss {
		if ip, err := netip.ParseAddr(s); err == nil && ip.Zone() == "" && ip.Unmap().Is6() == ipv6 {
			ips = append(ips, ip.Unmap())
		}
	}
	slices.SortFunc(ips, netip.Addr.Compare)
	return slices.Compact(ips)
}

func ingressIPs(svc *v1.Service, ipv6 bool) []netip.Addr {
	var ss []string
	for _, in := range svc.Status.LoadBalancer.Ingress {
		ss = append(ss, in.IP)
	}
	return parseIPs(ss, ipv6)
}

// endpoints picks the addresses that traffic for one service port goes to,
// and lists every endpoint it chose from.
func endpoints(svcSlices []*discovery.EndpointSlice, portName string, proto service.Protocol, ipv6, local bool, nodeName string) (chosen []netip.AddrPort, known []service.EndpointState) {
	family := discovery.AddressTypeIPv4
	if ipv6 {
		family = discovery.AddressTypeIPv6
	}
	var ready, terminating []netip.AddrPort
	for _, s := range svcSlices {
		if s.AddressType != family {
			continue
		}
		port, ok := slicePort(s, portName, proto)
		if !ok {
			continue
		}
		for _, ep := range s.Endpoints {
			if len(ep.Addresses) == 0 {
				continue
			}
			// Only the first address counts, as in kube-proxy: the API
			// allows one address per endpoint in practice.
			ip, err := netip.ParseAddr(ep.Addresses[0])
			if err != nil || ip.Zone() != "" || ip.Unmap().Is6() != ipv6 {
				continue
			}
			addr := netip.AddrPortFrom(ip.Unmap(), port)
			c := ep.Conditions
			isReady := c.Ready == nil || *c.Ready
			isServing := c.Serving == nil || *c.Serving
			isTerminating := c.Terminating != nil && *c.Terminating
			node := ""
			if ep.NodeName != nil {
				node = *ep.NodeName
			}
			known = append(known, service.EndpointState{Addr: addr, Ready: isReady, Serving: isServing, Terminating: isTerminating, Node: node})
			if local && node != nodeName {
				continue
			}
			switch {
			case isReady:
				ready = append(ready, addr)
			case isServing && isTerminating:
				terminating = append(terminating, addr)
			}
		}
	}
	chosen = ready
	if len(chosen) == 0 {
		chosen = terminating
	}
	slices.SortFunc(chosen, netip.AddrPort.Compare)
	slices.SortFunc(known, func(a, b service.EndpointState) int { return a.Addr.Compare(b.Addr) })
	known = slices.CompactFunc(known, func(a, b service.EndpointState) bool { return a.Addr == b.Addr })
	return slices.Compact(chosen), known
}

// slicePort finds the port of slice s that serves the service port named
// portName. A slice port matches by name (both empty for an unnamed port)
// and protocol; a port with no number is ignored.
func slicePort(s *discovery.EndpointSlice, portName string, proto service.Protocol) (uint16, bool) {
	for _, p := range s.Ports {
		name := ""
		if p.Name != nil {
			name = *p.Name
		}
		pp := service.TCP
		if p.Protocol != nil {
			pp = service.Protocol(*p.Protocol)
		}
		if name == portName && pp == proto && p.Port != nil && *p.Port > 0 && *p.Port < 65536 {
			return uint16(*p.Port), true
		}
	}
	return 0, false
}

// dnsServices is the DNS view of services: every one of them, with the
// endpoints DNS publishes.
func dnsServices(services []*v1.Service, bySvc map[[2]string][]*discovery.EndpointSlice) []service.Service {
	out := make([]service.Service, 0, len(services))
	for _, svc := range services {
		d := service.Service{Namespace: svc.Namespace, Name: svc.Name}
		if svc.Spec.Type == v1.ServiceTypeExternalName {
			d.ExternalName = strings.TrimSuffix(svc.Spec.ExternalName, ".")
		} else {
			ips := svc.Spec.ClusterIPs
			if len(ips) == 0 && svc.Spec.ClusterIP != "" {
				ips = []string{svc.Spec.ClusterIP}
			}
			for _, s := range ips {
				if ip, err := netip.ParseAddr(s); err == nil {
					d.ClusterIPs = append(d.ClusterIPs, ip)
				}
			}
		}
		for _, p := range svc.Spec.Ports {
			proto := service.Protocol(p.Protocol)
			if proto == "" {
				proto = service.TCP
			}
			d.Ports = append(d.Ports, service.NamedPort{Name: p.Name, Protocol: proto, Port: uint16(p.Port)})
		}
		d.Endpoints = dnsEndpoints(bySvc[[2]string{svc.Namespace, svc.Name}])
		out = append(out, d)
	}
	slices.SortFunc(out, func(a, b service.Service) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	return out
}

// slicePods are the addresses EndpointSlices give as pods' (their
// targetRef is a Pod), ready or not: the pods a proxy that may not read
// Pods (system:node-proxier) can know of.
func slicePods(endpointSlices []*discovery.EndpointSlice) []service.PodAddress {
	var out []service.PodAddress
	for _, s := range endpointSlices {
		for _, ep := range s.Endpoints {
			if ep.TargetRef == nil || ep.TargetRef.Kind != "Pod" {
				continue
			}
			ns := cmp.Or(ep.TargetRef.Namespace, s.Namespace)
			for _, a := range ep.Addresses {
				if ip, err := netip.ParseAddr(a); err == nil {
					out = append(out, service.PodAddress{Namespace: ns, IP: ip})
				}
			}
		}
	}
	return sortedPods(out)
}

// WithPods adds the addresses of pods (a manifest's Pods) to the pods s
// knows of.
func WithPods(s service.Snapshot, pods []*v1.Pod) service.Snapshot {
	all := slices.Clone(s.Pods)
	for _, pod := range pods {
		ips := []string{pod.Status.PodIP}
		for _, a := range pod.Status.PodIPs {
			ips = append(ips, a.IP)
		}
		for _, a := range ips {
			if ip, err := netip.ParseAddr(a); err == nil {
				all = append(all, service.PodAddress{Namespace: pod.Namespace, IP: ip})
			}
		}
	}
	s.Pods = sortedPods(all)
	return s
}

func sortedPods(pods []service.PodAddress) []service.PodAddress {
	slices.SortFunc(pods, service.PodAddress.Compare)
	return slices.Compact(pods)
}

// dnsEndpoints lists the ready endpoints of a Service's slices, once per
// address, with the ports each slice gives them.
func dnsEndpoints(svcSlices []*discovery.EndpointSlice) []service.DNSEndpoint {
	byIP := map[netip.Addr]*service.DNSEndpoint{}
	var order []netip.Addr
	for _, s := range svcSlices {
		if s.AddressType != discovery.AddressTypeIPv4 && s.AddressType != discovery.AddressTypeIPv6 {
			continue
		}
		var ports []service.NamedPort
		for _, p := range s.Ports {
			if p.Port == nil || *p.Port <= 0 || *p.Port > 65535 {
				continue
			}
			np := service.NamedPort{Protocol: service.TCP, Port: uint16(*p.Port)}
			if p.Name != nil {
				np.Name = *p.Name
			}
			if p.Protocol != nil {
				np.Protocol = service.Protocol(*p.Protocol)
			}
			ports = append(ports, np)
		}
		for _, ep := range s.Endpoints {
			if len(ep.Addresses) == 0 || (ep.Conditions.Ready != nil && !*ep.Conditions.Ready) {
				continue
			}
			ip, err := netip.ParseAddr(ep.Addresses[0])
			if err != nil {
				continue
			}
			e, ok := byIP[ip]
			if !ok {
				e = &service.DNSEndpoint{IP: ip, Hostname: dashed(ip)}
				if ep.Hostname != nil && *ep.Hostname != "" {
					e.Hostname = *ep.Hostname
				}
				byIP[ip] = e
				order = append(order, ip)
			}
			for _, p := range ports {
				if !slices.Contains(e.Ports, p) {
					e.Ports = append(e.Ports, p)
				}
			}
		}
	}
	slices.SortFunc(order, netip.Addr.Compare)
	out := make([]service.DNSEndpoint, 0, len(order))
	for _, ip := range order {
		out = append(out, *byIP[ip])
	}
	return out
}

// dashed is CoreDNS's name for an endpoint without a hostname: its address
// with dashes, 10-244-1-2 (for IPv6, colons become dashes and a trailing
// dash gets a 0).
func dashed(ip netip.Addr) string {
	s := strings.NewReplacer(".", "-", ":", "-").Replace(ip.String())
	if strings.HasSuffix(s, "-") {
		s += "0"
	}
	return s
}
