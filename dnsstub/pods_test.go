package dnsstub

import (
	"testing"

	"github.com/miekg/dns"
)

// TestPodRecords: <a-b-c-d>.<ns>.pod.<zone> in CoreDNS's three pod modes.
// testSnapshot knows the pods 10.244.1.2 and fd00:244::2 in "default".
func TestPodRecords(t *testing.T) {
	const z = "." + domain + "."
	const nx = dns.RcodeNameError
	tests := []struct {
		mode PodRecords
		dnsCase
	}{
		{PodsInsecure, dnsCase{Qname: "10-244-1-2.default.pod" + z, Qtype: dns.TypeA, Answer: []string{"10-244-1-2.default.pod" + z + " 5 IN A 10.244.1.2"}}},
		{PodsInsecure, dnsCase{Qname: "10-244-9-9.default.pod" + z, Qtype: dns.TypeA, Answer: []string{"10-244-9-9.default.pod" + z + " 5 IN A 10.244.9.9"}}}, // no such pod: insecure answers all the same
		{PodsInsecure, dnsCase{Qname: "10-244-9-9.Prod.POD" + z, Qtype: dns.TypeA, Answer: []string{"10-244-9-9.prod.pod" + z + " 5 IN A 10.244.9.9"}}},
		{PodsInsecure, dnsCase{Qname: "fd00-244--2.default.pod" + z, Qtype: dns.TypeAAAA, Answer: []string{"fd00-244--2.default.pod" + z + " 5 IN AAAA fd00:244::2"}}},
		{PodsInsecure, dnsCase{Qname: "10-244-1-2.default.pod" + z, Qtype: dns.TypeAAAA, Ns: []string{soa}}},
		{PodsInsecure, dnsCase{Qname: "10-244-1-2.default.pod" + z, Qtype: dns.TypeTXT, Ns: []string{soa}}},
		{PodsInsecure, dnsCase{Qname: "web-0.default.pod" + z, Qtype: dns.TypeA, Rcode: nx, Ns: []string{soa}}},
		{PodsInsecure, dnsCase{Qname: "10-244-1-300.default.pod" + z, Qtype: dns.TypeA, Rcode: nx, Ns: []string{soa}}},
		{PodsInsecure, dnsCase{Qname: "x.10-244-1-2.default.pod" + z, Qtype: dns.TypeA, Rcode: nx, Ns: []string{soa}}},
		{PodsInsecure, dnsCase{Qname: "default.pod" + z, Qtype: dns.TypeA, Ns: []string{soa}}},
		{PodsInsecure, dnsCase{Qname: "pod" + z, Qtype: dns.TypeA, Ns: []string{soa}}},
		{PodsVerified, dnsCase{Qname: "10-244-1-2.default.pod" + z, Qtype: dns.TypeA, Answer: []string{"10-244-1-2.default.pod" + z + " 5 IN A 10.244.1.2"}}},
		{PodsVerified, dnsCase{Qname: "fd00-244--2.default.pod" + z, Qtype: dns.TypeAAAA, Answer: []string{"fd00-244--2.default.pod" + z + " 5 IN AAAA fd00:244::2"}}},
		{PodsVerified, dnsCase{Qname: "10-244-9-9.default.pod" + z, Qtype: dns.TypeA, Rcode: nx, Ns: []string{soa}}},
		{PodsVerified, dnsCase{Qname: "10-244-1-2.prod.pod" + z, Qtype: dns.TypeA, Rcode: nx, Ns: []string{soa}}}, // the address, but not in that namespace
		{PodsDisabled, dnsCase{Qname: "10-244-1-2.default.pod" + z, Qtype: dns.TypeA, Rcode: nx, Ns: []string{soa}}},
		{PodsDisabled, dnsCase{Qname: "default.pod" + z, Qtype: dns.TypeA, Rcode: nx, Ns: []string{soa}}},
		{PodsDisabled, dnsCase{Qname: "pod" + z, Qtype: dns.TypeA, Ns: []string{soa}}},
	}
	addrs := map[PodRecords]string{}
	for _, mode := range []PodRecords{PodsInsecure, PodsVerified, PodsDisabled} {
		_, addrs[mode] = stub(t, Config{Domain: domain, PodRecords: mode}, true)
	}
	for _, tt := range tests {
		t.Run(string(tt.mode)+" "+dns.TypeToString[tt.Qtype]+" "+tt.Qname, func(t *testing.T) { tt.check(t, addrs[tt.mode], "udp") })
	}
}

func TestParsePodRecords(t *testing.T) {
	for _, ok := range []string{"insecure", "verified", "disabled"} {
		if m, err := ParsePodRecords(ok); err != nil || string(m) != ok {
			t.Errorf("ParsePodRecords(%q) = %q, %v", ok, m, err)
		}
	}
	if _, err := ParsePodRecords("Insecure"); err == nil {
		t.Error("ParsePodRecords(Insecure): no error; the modes are lower case, as in a Corefile")
	}
	if _, err := NewServer(Config{PodRecords: "sometimes"}); err == nil {
		t.Error("NewServer with pod records \"sometimes\": no error")
	}
}
