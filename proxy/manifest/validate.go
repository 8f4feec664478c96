package manifest

import (
	"fmt"
	"net/netip"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// validateAll checks what an API server would have checked before a
// controller or kube-proxy ever saw the objects, and fills in the defaults it
// would have set. A manifest has no API server in front of it, so every
// mistake is caught here and named by file, object and field.
func validateAll(objs *Objects) []error {
	var errs []error
	report := func(obj any, kind, ns, name string, list field.ErrorList) {
		for _, e := range list {
			errs = append(errs, fmt.Errorf("%s (%s %s/%s): %s", objs.Source(obj), kind, ns, name, e.Error()))
		}
	}
	seen := map[string]string{}
	unique := func(obj any, kind, ns, name string) {
		key := kind + " " + ns + "/" + name
		if first, ok := seen[key]; ok {
			errs = append(errs, fmt.Errorf("%s (%s %s/%s): metadata.name: Duplicate value: %q: already defined at %s", objs.Source(obj), kind, ns, name, name, first))
			return
		}
		seen[key] = objs.Source(obj)
	}

	clusterIPs := map[netip.Addr]string{}
	nodePorts := map[string]string{}
	for _, s := range objs.Services {
		unique(s, "Service", s.Namespace, s.Name)
		report(s, "Service", s.Namespace, s.Name, validateService(s))
		// Addresses a cluster's allocators would never hand out twice.
		for i, a := range s.Spec.ClusterIPs {
			if ip, err := netip.ParseAddr(a); err == nil {
				if other, ok := clusterIPs[ip]; ok {
					path := field.NewPath("spec", "clusterIP") // the first is the clusterIP
					if i > 0 {
						path = field.NewPath("spec", "clusterIPs").Index(i)
					}
					report(s, "Service", s.Namespace, s.Name, field.ErrorList{field.Duplicate(path, a+" (also an address of Service "+other+")")})
				}
				clusterIPs[ip] = s.Namespace + "/" + s.Name
			}
		}
		for i, p := range s.Spec.Ports {
			if p.NodePort == 0 {
				continue
			}
			k := fmt.Sprintf("%d/%s", p.NodePort, p.Protocol)
			if other, ok := nodePorts[k]; ok {
				report(s, "Service", s.Namespace, s.Name, field.ErrorList{field.Duplicate(field.NewPath("spec", "ports").Index(i).Child("nodePort"), fmt.Sprintf("%d (also used by Service %s)", p.NodePort, other))})
			}
			nodePorts[k] = s.Namespace + "/" + s.Name
		}
	}
	for _, s := range objs.EndpointSlices {
		unique(s, "EndpointSlice", s.Namespace, s.Name)
		report(s, "EndpointSlice", s.Namespace, s.Name, validateEndpointSlice(s))
	}
	for _, p := range objs.Pods {
		unique(p, "Pod", p.Namespace, p.Name)
		report(p, "Pod", p.Namespace, p.Name, validatePod(p))
	}
	return errs
}

func validateMeta(name, namespace string, nameCheck func(string) []string) field.ErrorList {
	var errs field.ErrorList
	meta := field.NewPath("metadata")
	if name == "" {
		errs = append(errs, field.Required(meta.Child("name"), "every object needs a name"))
	}
	for _, msg := range nameCheck(name) {
		if name != "" {
			errs = append(errs, field.Invalid(meta.Child("name"), name, msg))
		}
	}
	for _, msg := range validation.IsDNS1123Label(namespace) {
		errs = append(errs, field.Invalid(meta.Child("namespace"), namespace, msg))
	}
	return errs
}

// validateService checks a Service and sets the defaults the API server
// would: protocol TCP, targetPort equal to port, sessionAffinity None.
func validateService(s *v1.Service) field.ErrorList {
	errs := validateMeta(s.Name, s.Namespace, validation.IsDNS1035Label)
	spec := field.NewPath("spec")
	switch s.Spec.Type {
	case "":
		s.Spec.Type = v1.ServiceTypeClusterIP
	case v1.ServiceTypeClusterIP, v1.ServiceTypeNodePort, v1.ServiceTypeLoadBalancer:
	case v1.ServiceTypeExternalName:
		if s.Spec.ExternalName == "" {
			errs = append(errs, field.Required(spec.Child("externalName"), "an ExternalName Service names the host it aliases"))
		}
		return errs
	default:
		errs = append(errs, field.NotSupported(spec.Child("type"), s.Spec.Type, []string{"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"}))
	}

	headless := s.Spec.ClusterIP == v1.ClusterIPNone
	switch {
	case s.Spec.ClusterIP == "":
		errs = append(errs, field.Required(spec.Child("clusterIP"), "a manifest has no address allocator: give the Service an address from your service range, or None for a headless Service"))
	case !headless:
		if _, err := netip.ParseAddr(s.Spec.ClusterIP); err != nil {
			errs = append(errs, field.Invalid(spec.Child("clusterIP"), s.Spec.ClusterIP, "must be an IP address or None"))
		}
	}
	errs = append(errs, validateClusterIPs(s, spec)...)
	if len(s.Spec.Ports) == 0 && !headless {
		errs = append(errs, field.Required(spec.Child("ports"), "a Service with a cluster IP needs at least one port"))
	}

	names := map[string]bool{}
	portProtos := map[string]bool{}
	for i := range s.Spec.Ports {
		p := &s.Spec.Ports[i]
		path := spec.Child("ports").Index(i)
		if p.Protocol == "" {
			p.Protocol = v1.ProtocolTCP
		}
		if len(s.Spec.Ports) > 1 && p.Name == "" {
			errs = append(errs, field.Required(path.Child("name"), "every port needs a name when a Service has more than one"))
		}
		if p.Name != "" {
			for _, msg := range validation.IsDNS1123Label(p.Name) {
				errs = append(errs, field.Invalid(path.Child("name"), p.Name, msg))
			}
			if names[p.Name] {
				errs = append(errs, field.Duplicate(path.Child("name"), p.Name))
			}
			names[p.Name] = true
		}
		for _, msg := range validation.IsValidPortNum(int(p.Port)) {
			errs = append(errs, field.Invalid(path.Child("port"), p.Port, msg))
		}
		switch p.Protocol {
		case v1.ProtocolTCP, v1.ProtocolUDP, v1.ProtocolSCTP:
		default:
			errs = append(errs, field.NotSupported(path.Child("protocol"), p.Protocol, []string{"TCP", "UDP", "SCTP"}))
		}
		key := fmt.Sprintf("%d/%s", p.Port, p.Protocol)
		if portProtos[key] {
			errs = append(errs, field.Duplicate(path, key))
		}
		portProtos[key] = true
		errs = append(errs, validateTargetPort(p, path.Child("targetPort"))...)
		if p.NodePort != 0 {
			if s.Spec.Type == v1.ServiceTypeClusterIP {
				errs = append(errs, field.Forbidden(path.Child("nodePort"), "may not be used when type is 'ClusterIP'"))
			}
			for _, msg := range validation.IsValidPortNum(int(p.NodePort)) {
				errs = append(errs, field.Invalid(path.Child("nodePort"), p.NodePort, msg))
			}
		}
	}

	for i, ip := range s.Spec.ExternalIPs {
		if _, err := netip.ParseAddr(ip); err != nil {
			errs = append(errs, field.Invalid(spec.Child("externalIPs").Index(i), ip, "must be an IP address"))
		}
	}
	for i, in := range s.Status.LoadBalancer.Ingress {
		if _, err := netip.ParseAddr(in.IP); in.IP != "" && err != nil {
			errs = append(errs, field.Invalid(field.NewPath("status", "loadBalancer", "ingress").Index(i).Child("ip"), in.IP, "must be an IP address"))
		}
	}

	switch s.Spec.SessionAffinity {
	case "":
		s.Spec.SessionAffinity = v1.ServiceAffinityNone
	case v1.ServiceAffinityNone:
	case v1.ServiceAffinityClientIP:
		if c := s.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			if t := *c.ClientIP.TimeoutSeconds; t <= 0 || t > maxAffinitySeconds {
				errs = append(errs, field.Invalid(spec.Child("sessionAffinityConfig", "clientIP", "timeoutSeconds"), t,
					fmt.Sprintf("must be greater than 0 and at most %d", maxAffinitySeconds)))
			}
		}
	default:
		errs = append(errs, field.NotSupported(spec.Child("sessionAffinity"), s.Spec.SessionAffinity, []string{"None", "ClientIP"}))
	}
	return errs
}

// validateClusterIPs checks spec.clusterIPs, the addresses of a dual-stack
// Service, and defaults it from spec.clusterIP as the API server does: the
// first is clusterIP, a second one is of the other family.
func validateClusterIPs(s *v1.Service, spec *field.Path) field.ErrorList {
	if s.Spec.ClusterIP == "" {
		return nil
	}
	if len(s.Spec.ClusterIPs) == 0 {
		s.Spec.ClusterIPs = []string{s.Spec.ClusterIP}
		return nil
	}
	path := spec.Child("clusterIPs")
	var errs field.ErrorList
	if s.Spec.ClusterIPs[0] != s.Spec.ClusterIP {
		errs = append(errs, field.Invalid(path.Index(0), s.Spec.ClusterIPs[0], "must be equal to spec.clusterIP ("+s.Spec.ClusterIP+")"))
	}
	if len(s.Spec.ClusterIPs) > 2 {
		errs = append(errs, field.TooMany(path, len(s.Spec.ClusterIPs), 2))
	}
	if len(s.Spec.ClusterIPs) == 2 {
		a, errA := netip.ParseAddr(s.Spec.ClusterIPs[0])
		b, errB := netip.ParseAddr(s.Spec.ClusterIPs[1])
		switch {
		case errB != nil:
			errs = append(errs, field.Invalid(path.Index(1), s.Spec.ClusterIPs[1], "must be an IP address"))
		case errA == nil && a.Is4() == b.Is4():
			errs = append(errs, field.Invalid(path.Index(1), s.Spec.ClusterIPs[1], "must be of the other IP family than clusterIPs[0]: one IPv4 and one IPv6"))
		}
	}
	return errs
}

// validateTargetPort checks a targetPort and defaults an absent one to the
// Service port, as the API server does.
func validateTargetPort(p *v1.ServicePort, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	switch {
	case p.TargetPort.Type == intstr.Int && p.TargetPort.IntVal == 0:
		p.TargetPort = intstr.FromInt32(p.Port)
	case p.TargetPort.Type == intstr.Int:
		for _, msg := range validation.IsValidPortNum(int(p.TargetPort.IntVal)) {
			errs = append(errs, field.Invalid(path, p.TargetPort.IntVal, msg))
		}
	default:
		for _, msg := range validation.IsValidPortName(p.TargetPort.StrVal) {
			errs = append(errs, field.Invalid(path, p.TargetPort.StrVal, msg))
		}
	}
	return errs
}

func validateEndpointSlice(s *discovery.EndpointSlice) field.ErrorList {
	errs := validateMeta(s.Name, s.Namespace, validation.IsDNS1123Subdomain)
	if s.Labels[discovery.LabelServiceName] == "" {
		errs = append(errs, field.Required(field.NewPath("metadata", "labels").Key(discovery.LabelServiceName), "names the Service this slice belongs to"))
	}
	switch s.AddressType {
	case discovery.AddressTypeIPv4, discovery.AddressTypeIPv6, discovery.AddressTypeFQDN:
	default:
		errs = append(errs, field.NotSupported(field.NewPath("addressType"), s.AddressType, []string{"IPv4", "IPv6", "FQDN"}))
	}
	for i, ep := range s.Endpoints {
		path := field.NewPath("endpoints").Index(i).Child("addresses")
		if len(ep.Addresses) == 0 {
			errs = append(errs, field.Required(path, "an endpoint has one address"))
		}
		for j, a := range ep.Addresses {
			if s.AddressType == discovery.AddressTypeFQDN {
				continue
			}
			ip, err := netip.ParseAddr(a)
			if err != nil || (s.AddressType == discovery.AddressTypeIPv4) != ip.Is4() {
				errs = append(errs, field.Invalid(path.Index(j), a, "must be an "+string(s.AddressType)+" address, as addressType says"))
			}
		}
	}
	for i, p := range s.Ports {
		path := field.NewPath("ports").Index(i)
		if p.Port != nil {
			for _, msg := range validation.IsValidPortNum(int(*p.Port)) {
				errs = append(errs, field.Invalid(path.Child("port"), *p.Port, msg))
			}
		}
		if p.Protocol != nil {
			switch *p.Protocol {
			case v1.ProtocolTCP, v1.ProtocolUDP, v1.ProtocolSCTP:
			default:
				errs = append(errs, field.NotSupported(path.Child("protocol"), *p.Protocol, []string{"TCP", "UDP", "SCTP"}))
			}
		}
	}
	return errs
}

func validatePod(p *v1.Pod) field.ErrorList {
	errs := validateMeta(p.Name, p.Namespace, validation.IsDNS1123Subdomain)
	if p.Status.PodIP != "" {
		if _, err := netip.ParseAddr(p.Status.PodIP); err != nil {
			errs = append(errs, field.Invalid(field.NewPath("status", "podIP"), p.Status.PodIP, "must be an IP address"))
		}
	}
	for i, a := range p.Status.PodIPs {
		if _, err := netip.ParseAddr(a.IP); err != nil {
			errs = append(errs, field.Invalid(field.NewPath("status", "podIPs").Index(i).Child("ip"), a.IP, "must be an IP address"))
		}
	}
	if len(p.Status.PodIPs) > 0 && p.Status.PodIPs[0].IP != p.Status.PodIP {
		errs = append(errs, field.Invalid(field.NewPath("status", "podIPs").Index(0).Child("ip"), p.Status.PodIPs[0].IP, "must be equal to status.podIP ("+p.Status.PodIP+")"))
	}
	for i, c := range p.Spec.Containers {
		for j, cp := range c.Ports {
			path := field.NewPath("spec", "containers").Index(i).Child("ports").Index(j)
			for _, msg := range validation.IsValidPortNum(int(cp.ContainerPort)) {
				errs = append(errs, field.Invalid(path.Child("containerPort"), cp.ContainerPort, msg))
			}
			if cp.Name != "" {
				for _, msg := range validation.IsValidPortName(cp.Name) {
					errs = append(errs, field.Invalid(path.Child("name"), cp.Name, msg))
				}
			}
		}
	}
	return errs
}

// maxAffinitySeconds is the API server's limit on
// sessionAffinityConfig.clientIP.timeoutSeconds (one day).
const maxAffinitySeconds = 86400
