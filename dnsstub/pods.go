package dnsstub

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/miekg/dns"
)

// PodRecords is how pod records are answered: names such as
// 10-244-1-2.default.pod.cluster.local, which resolve to the address
// written in their first label. The DNS specification dropped them in 2019,
// yet kubeadm's Corefile still serves them ("pods insecure") and
// Kubernetes' DNS conformance tests look one up. The modes are CoreDNS's.
type PodRecords string

const (
	// PodsInsecure answers any name whose first label is an address, in
	// any namespace, without checking a pod has it: kubeadm's Corefile.
	// CoreDNS also asks that the namespace exist; the proxy may not read
	// Namespaces (system:node-proxier), so it does not ask.
	PodsInsecure PodRecords = "insecure"
	// PodsVerified answers only for an address a pod of that namespace is
	// known to have: in a cluster, one that an EndpointSlice names as a
	// Pod's (the proxy watches no Pods); with --manifests, also every Pod
	// of the manifest.
	PodsVerified PodRecords = "verified"
	// PodsDisabled answers no pod record: NXDOMAIN, CoreDNS's default.
	PodsDisabled PodRecords = "disabled"
)

// ParsePodRecords checks a --dns-pod-records value.
func ParsePodRecords(s string) (PodRecords, error) {
	switch m := PodRecords(s); m {
	case PodsInsecure, PodsVerified, PodsDisabled:
		return m, nil
	}
	return "", fmt.Errorf("--dns-pod-records %q: want insecure, verified or disabled", s)
}

// podName splits name, a lower-case FQDN in the zone, into the labels of a
// pod record: "<addr>.<ns>.pod.<zone>". ok is false for names outside the
// pod subtree; addr and ns are empty for pod.<zone> and <ns>.pod.<zone>,
// which exist with no records.
func (z *Zone) podName(name string) (addr, ns string, ok bool) {
	suffix := "pod." + z.origin
	if name != suffix && !strings.HasSuffix(name, "."+suffix) {
		return "", "", false
	}
	labels := dns.SplitDomainName(strings.TrimSuffix(strings.TrimSuffix(name, suffix), "."))
	switch len(labels) {
	case 0:
		return "", "", true
	case 1:
		return "", labels[0], true
	case 2:
		return labels[0], labels[1], true
	}
	return "", "", true // too many labels: does not exist (see pod)
}

// podAddress is the address a pod record's first label spells: dashes for
// dots (10-244-1-2), or for colons in IPv6 (fd00-244--2), as CoreDNS reads it.
func podAddress(label string) (netip.Addr, bool) {
	s := strings.ReplaceAll(label, "-", ":")
	if strings.Count(label, "-") == 3 && !strings.Contains(label, "--") {
		s = strings.ReplaceAll(label, "-", ".")
	}
	ip, err := netip.ParseAddr(s)
	if err != nil || ip.Zone() != "" {
		return netip.Addr{}, false
	}
	return ip, true
}

// pod answers a name of the pod subtree: its records of qtype, and whether
// the name exists at all (NXDOMAIN when not).
func (z *Zone) pod(name string, qtype uint16, mode PodRecords) (answer []dns.RR, exists bool) {
	label, ns, _ := z.podName(name)
	labels := dns.CountLabel(strings.TrimSuffix(name, z.origin))
	switch {
	case labels == 1:
		return nil, true // pod.<zone>: a type node, NODATA
	case labels == 2:
		return nil, mode != PodsDisabled // <ns>.pod.<zone>
	case labels > 3 || mode == PodsDisabled:
		return nil, false
	}
	ip, ok := podAddress(label)
	if !ok || (mode == PodsVerified && !z.pods[podKey{ns, ip}]) {
		return nil, false
	}
	if (qtype == dns.TypeA && ip.Is4()) || (qtype == dns.TypeAAAA && ip.Is6()) {
		return []dns.RR{z.address(name, ip)}, true
	}
	return nil, true
}

// podKey is a pod address in its namespace, for PodsVerified.
type podKey struct {
	namespace string
	ip        netip.Addr
}
