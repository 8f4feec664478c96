package manifest

import (
	"fmt"
	"slices"
	"strings"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// PodSlices does, for a manifest, what the EndpointSlice controller does in a
// cluster: for every Service with a selector it lists the Pods of its
// namespace whose labels match, and writes EndpointSlices for them.
//
//   - A Pod is listed once it has an IP (status.podIP) and is not finished
//     (phase Succeeded or Failed). Its endpoint is ready when its Ready
//     condition is True and it is not being deleted, or always when the
//     Service sets publishNotReadyAddresses; serving follows the Ready
//     condition; terminating is set when the Pod has a deletionTimestamp.
//   - A named targetPort ("web-port") is looked up in the Pod's container
//     ports, by name and protocol, so Pods of one Service may listen on
//     different numbers: this is how a Service moves from one port to
//     another without downtime. A Pod without a port of that name is left
//     out of that Service port.
//   - Pods resolving to the same port numbers share a slice, as the
//     controller groups them. A slice holds one address family: a Service
//     of both families gets IPv4 slices and IPv6 slices, with the pods'
//     addresses of each (status.podIPs).
//
// Services without a selector get no slices from here: their EndpointSlices
// are written by hand, as in a cluster.
func PodSlices(services []*v1.Service, pods []*v1.Pod) []*discovery.EndpointSlice {
	var out []*discovery.EndpointSlice
	for _, svc := range services {
		if len(svc.Spec.Selector) == 0 || svc.Spec.Type == v1.ServiceTypeExternalName {
			continue
		}
		sel := labels.SelectorFromSet(svc.Spec.Selector)
		families := serviceFamilies(svc)
		groups := map[string]*discovery.EndpointSlice{}
		var order []string
		for _, pod := range pods {
			if pod.Namespace != svc.Namespace || !sel.Matches(labels.Set(pod.Labels)) || !listed(pod) {
				continue
			}
			ports := slicePorts(svc, pod)
			if len(ports) == 0 {
				continue
			}
			// A slice holds addresses of one family: a dual-stack pod
			// is listed in an IPv4 slice and an IPv6 one.
			for _, ip := range podIPs(pod) {
				family := discovery.AddressTypeIPv4
				if strings.Contains(ip, ":") {
					family = discovery.AddressTypeIPv6
				}
				if families != nil && !families[family] {
					continue
				}
				key := string(family) + " " + portsKey(ports)
				s, ok := groups[key]
				if !ok {
					s = &discovery.EndpointSlice{
						ObjectMeta: metav1.ObjectMeta{
							Name:      fmt.Sprintf("%s-pods-%d", svc.Name, len(order)+1),
							Namespace: svc.Namespace,
							Labels: map[string]string{
								discovery.LabelServiceName: svc.Name,
								discovery.LabelManagedBy:   "kube-userspace-proxy-manifest",
							},
						},
						AddressType: family,
						Ports:       ports,
					}
					groups[key] = s
					order = append(order, key)
				}
				s.Endpoints = append(s.Endpoints, podEndpoint(svc, pod, ip))
			}
		}
		for _, k := range order {
			out = append(out, groups[k])
		}
	}
	return out
}

// serviceFamilies are the address types of svc's ClusterIPs; nil for a
// headless Service, which lists pods of every family.
func serviceFamilies(svc *v1.Service) map[discovery.AddressType]bool {
	if svc.Spec.ClusterIP == "" || svc.Spec.ClusterIP == v1.ClusterIPNone {
		return nil
	}
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 {
		ips = []string{svc.Spec.ClusterIP}
	}
	families := map[discovery.AddressType]bool{}
	for _, ip := range ips {
		if strings.Contains(ip, ":") {
			families[discovery.AddressTypeIPv6] = true
		} else {
			families[discovery.AddressTypeIPv4] = true
		}
	}
	return families
}

// podIPs are the pod's addresses: status.podIPs, or status.podIP alone.
func podIPs(pod *v1.Pod) []string {
	if len(pod.Status.PodIPs) == 0 {
		return []string{pod.Status.PodIP}
	}
	ips := make([]string, len(pod.Status.PodIPs))
	for i, a := range pod.Status.PodIPs {
		ips[i] = a.IP
	}
	return ips
}

// listed reports whether the controller would list pod at all.
func listed(pod *v1.Pod) bool {
	return pod.Status.PodIP != "" && pod.Status.Phase != v1.PodSucceeded && pod.Status.Phase != v1.PodFailed
}

func podReady(pod *v1.Pod) bool {
	for _, c := range pod.Status.Conditions {
		if c.Type == v1.PodReady {
			return c.Status == v1.ConditionTrue
		}
	}
	return false
}

func podEndpoint(svc *v1.Service, pod *v1.Pod, ip string) discovery.Endpoint {
	ready := podReady(pod)
	terminating := pod.DeletionTimestamp != nil
	ep := discovery.Endpoint{
		Addresses: []string{ip},
		Conditions: discovery.EndpointConditions{
			Ready:       ptr(svc.Spec.PublishNotReadyAddresses || (ready && !terminating)),
			Serving:     ptr(ready),
			Terminating: ptr(terminating),
		},
		TargetRef: &v1.ObjectReference{Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name},
	}
	if pod.Spec.NodeName != "" {
		ep.NodeName = ptr(pod.Spec.NodeName)
	}
	if pod.Spec.Hostname != "" {
		ep.Hostname = ptr(pod.Spec.Hostname)
	}
	return ep
}

// slicePorts resolves every port of svc against pod.
func slicePorts(svc *v1.Service, pod *v1.Pod) []discovery.EndpointPort {
	var ports []discovery.EndpointPort
	for _, sp := range svc.Spec.Ports {
		n, ok := targetPort(sp, pod)
		if !ok {
			continue
		}
		ports = append(ports, discovery.EndpointPort{
			Name:     ptr(sp.Name),
			Protocol: ptr(sp.Protocol),
			Port:     ptr(n),
		})
	}
	return ports
}

// targetPort is the port number on pod that Service port sp sends to.
func targetPort(sp v1.ServicePort, pod *v1.Pod) (int32, bool) {
	if sp.TargetPort.Type == intstr.Int {
		return sp.TargetPort.IntVal, true
	}
	for _, c := range pod.Spec.Containers {
		for _, cp := range c.Ports {
			proto := cp.Protocol
			if proto == "" {
				proto = v1.ProtocolTCP
			}
			if cp.Name == sp.TargetPort.StrVal && proto == sp.Protocol {
				return cp.ContainerPort, true
			}
		}
	}
	return 0, false
}

func portsKey(ports []discovery.EndpointPort) string {
	parts := make([]string, len(ports))
	for i, p := range ports {
		parts[i] = fmt.Sprintf("%s/%s/%d", *p.Name, *p.Protocol, *p.Port)
	}
	slices.Sort(parts)
	return strings.Join(parts, ",")
}

func ptr[T any](v T) *T { return &v }
