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

// pod answers name, a lower-case FQDN in the zone, if it is in the pod
// subtree ("<addr>.<ns>.pod.<zone>"; ok is false otherwise): its records of
// qtype, and whether the name exists at all (NXDOMAIN when not).
// pod.<zone> and <ns>.pod.<zone> exist with no records.
func (z *Zone) pod(name string, qtype uint16, mode PodRecords) (answer []dns.RR, exists, ok bool) {
	suffix := "pod." + z.origin
	if name != suffix && !strings.HasSuffix(name, "."+suffix) {
		return nil, false, false
	}
	labels := dns.SplitDomainName(strings.TrimSuffix(name, suffix))
	switch {
	case len(labels) == 0:
		return nil, true, true // a type node, NODATA
	case len(labels) == 1:
		return nil, mode != PodsDisabled, true // a namespace
	case len(labels) > 2 || mode == PodsDisabled:
		return nil, false, true
	}
	ip, valid := podAddress(labels[0])
	if !valid || (mode == PodsVerified && !z.pods[podKey{labels[1], ip}]) {
		return nil, false, true
	}
	if (qtype == dns.TypeA && ip.Is4()) || (qtype == dns.TypeAAAA && ip.Is6()) {
		return []dns.RR{z.address(name, ip)}, true, true
	}
	return nil, true, true
}

// podKey is a pod address in its namespace, for PodsVerified.
type podKey struct {
	namespace string
	ip        netip.Addr
}
