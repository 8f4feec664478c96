// Package dnsstub answers the DNS names Kubernetes gives Services, on every
// node, from the same Snapshot the proxy serves: the Kubernetes DNS-Based
// Service Discovery specification, schema 1.1.0, for one cluster domain.
// Names outside the domain are forwarded to the node's upstream servers.
// See docs/dns.md.
//
// The names it answers, relative to the zone (cluster.local by default):
//
//	<svc>.<ns>.svc                 A/AAAA: the ClusterIPs; for a headless
//	                               Service its ready endpoints; CNAME for an
//	                               ExternalName Service
//	<host>.<svc>.<ns>.svc          A/AAAA of one endpoint of the Service
//	_<port>._<proto>.<svc>.<ns>.svc  SRV for each named port
//	<a-b-c-d>.<ns>.pod             A/AAAA of the address the name spells
//	                               (--dns-pod-records; see PodRecords)
//	dns-version                    TXT "1.1.0"
//	<reversed IP>.in-addr.arpa     PTR for ClusterIPs and endpoints
package dnsstub

import (
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/miekg/dns"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// SchemaVersion is the version of the DNS specification we answer.
const SchemaVersion = "1.1.0"

// Zone is the cluster domain's records at one moment. It is built whole
// from a Snapshot and never changed.
type Zone struct {
	origin string // lower-case FQDN: "cluster.local."
	ttl    uint32
	soa    *dns.SOA
	// names holds every name that exists in the zone, with its records;
	// names that only have names below them (svc.<zone>, <ns>.svc.<zone>)
	// exist with no records.
	names map[string][]dns.RR
	// ptrs holds reverse names (in-addr.arpa, ip6.arpa) we answer.
	ptrs map[string][]dns.RR
	// pods are the pod addresses known, for verified pod records.
	pods map[podKey]bool
}

// NewZone builds the zone for domain (such as "cluster.local") from s, with
// ttl on every record.
func NewZone(domain string, ttl time.Duration, s service.Snapshot) *Zone {
	origin := dns.Fqdn(strings.ToLower(domain))
	z := &Zone{
		origin: origin,
		ttl:    uint32(ttl / time.Second),
		names:  map[string][]dns.RR{},
		ptrs:   map[string][]dns.RR{},
		pods:   make(map[podKey]bool, len(s.Pods)),
	}
	for _, p := range s.Pods {
		z.pods[podKey{strings.ToLower(p.Namespace), p.IP}] = true
	}
	// The SOA is CoreDNS's: ns.dns.<zone>, hostmaster.<zone>, and a
	// negative-answer TTL equal to the record TTL.
	z.soa = &dns.SOA{
		Hdr:     dns.RR_Header{Name: origin, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: min(z.ttl, 300)},
		Ns:      "ns.dns." + origin,
		Mbox:    "hostmaster." + origin,
		Serial:  uint32(time.Now().Unix()),
		Refresh: 7200,
		Retry:   1800,
		Expire:  86400,
		Minttl:  z.ttl,
	}
	z.add(z.soa)
	z.add(&dns.TXT{Hdr: z.hdr("dns-version."+origin, dns.TypeTXT), Txt: []string{SchemaVersion}})
	z.touch("svc." + origin)
	for i := range s.Services {
		z.addService(&s.Services[i])
	}
	return z
}

func (z *Zone) hdr(name string, t uint16) dns.RR_Header {
	return dns.RR_Header{Name: name, Rrtype: t, Class: dns.ClassINET, Ttl: z.ttl}
}

// add records rr under its name, and makes the names above it exist.
func (z *Zone) add(rr dns.RR) {
	name := strings.ToLower(rr.Header().Name)
	z.touch(name)
	z.names[name] = append(z.names[name], rr)
}

// touch makes name and every name between it and the origin exist.
func (z *Zone) touch(name string) {
	for n := name; len(n) >= len(z.origin); {
		if _, ok := z.names[n]; !ok {
			z.names[n] = nil
		}
		if n == z.origin {
			return
		}
		_, rest, ok := strings.Cut(n, ".")
		if !ok {
			return
		}
		n = rest
	}
}

func (z *Zone) addPTR(ip netip.Addr, target string) {
	rev, err := dns.ReverseAddr(ip.String())
	if err != nil {
		return
	}
	z.ptrs[rev] = append(z.ptrs[rev], &dns.PTR{Hdr: z.hdr(rev, dns.TypePTR), Ptr: target})
}

func (z *Zone) address(name string, ip netip.Addr) dns.RR {
	if ip.Is4() {
		return &dns.A{Hdr: z.hdr(name, dns.TypeA), A: ip.AsSlice()}
	}
	return &dns.AAAA{Hdr: z.hdr(name, dns.TypeAAAA), AAAA: ip.AsSlice()}
}

// addService publishes one Service.
func (z *Zone) addService(s *service.Service) {
	name := strings.ToLower(fmt.Sprintf("%s.%s.svc.%s", s.Name, s.Namespace, z.origin))
	z.touch(strings.ToLower(s.Namespace) + ".svc." + z.origin)
	switch {
	case s.ExternalName != "":
		z.add(&dns.CNAME{Hdr: z.hdr(name, dns.TypeCNAME), Target: dns.Fqdn(s.ExternalName)})
	case !s.Headless():
		for _, ip := range s.ClusterIPs {
			z.add(z.address(name, ip))
			z.addPTR(ip, name)
		}
		for _, p := range s.Ports {
			if p.Name == "" {
				continue // only named ports have SRV records
			}
			z.add(&dns.SRV{Hdr: z.hdr(srvName(p, name), dns.TypeSRV), Priority: 0, Weight: 100, Port: p.Port, Target: name})
		}
		// Each endpoint has a name of its own too, and its IP a PTR to it,
		// as CoreDNS publishes them: the name of the Service itself still
		// resolves to the ClusterIP only.
		for _, ep := range s.Endpoints {
			host := strings.ToLower(ep.Hostname) + "." + name
			z.add(z.address(host, ep.IP))
			z.addPTR(ep.IP, host)
		}
	default:
		// Headless: the name is the endpoints. With no ready endpoint the
		// name does not exist (NXDOMAIN), as the specification says.
		weights := map[string]int{}
		for _, ep := range s.Endpoints {
			for _, p := range ep.Ports {
				if p.Name != "" {
					weights[srvName(p, name)]++
				}
			}
		}
		for _, ep := range s.Endpoints {
			host := strings.ToLower(ep.Hostname) + "." + name
			z.add(z.address(name, ep.IP))
			z.add(z.address(host, ep.IP))
			z.addPTR(ep.IP, host)
			for _, p := range ep.Ports {
				if p.Name == "" {
					continue
				}
				srv := srvName(p, name)
				z.add(&dns.SRV{Hdr: z.hdr(srv, dns.TypeSRV), Priority: 0, Weight: uint16(max(1, 100/weights[srv])), Port: p.Port, Target: host})
			}
		}
	}
}

// srvName is _<port>._<proto>.<service name>.
func srvName(p service.NamedPort, svcName string) string {
	return "_" + strings.ToLower(p.Name) + "._" + strings.ToLower(string(p.Protocol)) + "." + svcName
}

// InZone reports whether name (lower case, FQDN) is the zone or below it.
func (z *Zone) InZone(name string) bool { return inZone(name, z.origin) }

func inZone(name, origin string) bool {
	return name == origin || strings.HasSuffix(name, "."+origin)
}

// lookup answers a question for a name in the zone: the records of qtype
// at name, whether the name exists at all, and, for an alias, the CNAME.
func (z *Zone) lookup(name string, qtype uint16) (answer []dns.RR, exists bool) {
	rrs, exists := z.names[name]
	if !exists {
		return nil, false
	}
	for _, rr := range rrs {
		t := rr.Header().Rrtype
		if t == qtype || (t == dns.TypeCNAME && qtype != dns.TypeCNAME) {
			answer = append(answer, rr)
		}
	}
	return answer, true
}

// reverse answers a PTR question, if the name is one of ours.
func (z *Zone) reverse(name string) ([]dns.RR, bool) {
	rrs, ok := z.ptrs[name]
	return rrs, ok
}
