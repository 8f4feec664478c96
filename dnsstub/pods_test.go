package dnsstub

import (
	"slices"
	"testing"

	"github.com/miekg/dns"
)

// TestPodRecords: <a-b-c-d>.<ns>.pod.<zone> in CoreDNS's three pod modes.
// testSnapshot knows the pods 10.244.1.2 and fd00:244::2 in "default".
func TestPodRecords(t *testing.T) {
	z := "." + domain + "."
	const (
		nx     = dns.RcodeNameError
		noerr  = dns.RcodeSuccess
		nodata = "" // NOERROR, no answer, the SOA
	)
	tests := []struct {
		mode   PodRecords
		name   string
		qtype  uint16
		rcode  int
		answer string // one zone-file line, or nodata
	}{
		{PodsInsecure, "10-244-1-2.default.pod" + z, dns.TypeA, noerr, "10-244-1-2.default.pod" + z + " 5 IN A 10.244.1.2"},
		{PodsInsecure, "10-244-9-9.default.pod" + z, dns.TypeA, noerr, "10-244-9-9.default.pod" + z + " 5 IN A 10.244.9.9"}, // no such pod: insecure answers all the same
		{PodsInsecure, "10-244-9-9.Prod.POD" + z, dns.TypeA, noerr, "10-244-9-9.prod.pod" + z + " 5 IN A 10.244.9.9"},
		{PodsInsecure, "fd00-244--2.default.pod" + z, dns.TypeAAAA, noerr, "fd00-244--2.default.pod" + z + " 5 IN AAAA fd00:244::2"},
		{PodsInsecure, "10-244-1-2.default.pod" + z, dns.TypeAAAA, noerr, nodata},
		{PodsInsecure, "10-244-1-2.default.pod" + z, dns.TypeTXT, noerr, nodata},
		{PodsInsecure, "web-0.default.pod" + z, dns.TypeA, nx, nodata},
		{PodsInsecure, "10-244-1-300.default.pod" + z, dns.TypeA, nx, nodata},
		{PodsInsecure, "x.10-244-1-2.default.pod" + z, dns.TypeA, nx, nodata},
		{PodsInsecure, "default.pod" + z, dns.TypeA, noerr, nodata},
		{PodsInsecure, "pod" + z, dns.TypeA, noerr, nodata},
		{PodsVerified, "10-244-1-2.default.pod" + z, dns.TypeA, noerr, "10-244-1-2.default.pod" + z + " 5 IN A 10.244.1.2"},
		{PodsVerified, "fd00-244--2.default.pod" + z, dns.TypeAAAA, noerr, "fd00-244--2.default.pod" + z + " 5 IN AAAA fd00:244::2"},
		{PodsVerified, "10-244-9-9.default.pod" + z, dns.TypeA, nx, nodata},
		{PodsVerified, "10-244-1-2.prod.pod" + z, dns.TypeA, nx, nodata}, // the address, but not in that namespace
		{PodsDisabled, "10-244-1-2.default.pod" + z, dns.TypeA, nx, nodata},
		{PodsDisabled, "default.pod" + z, dns.TypeA, nx, nodata},
		{PodsDisabled, "pod" + z, dns.TypeA, noerr, nodata},
	}
	addrs := map[PodRecords]string{}
	for _, mode := range []PodRecords{PodsInsecure, PodsVerified, PodsDisabled} {
		_, addrs[mode] = stub(t, Config{Domain: domain, PodRecords: mode}, true)
	}
	for _, tt := range tests {
		t.Run(string(tt.mode)+" "+dns.TypeToString[tt.qtype]+" "+tt.name, func(t *testing.T) {
			r := ask(t, addrs[tt.mode], "udp", tt.name, tt.qtype, 0)
			if r.Rcode != tt.rcode || !r.Authoritative {
				t.Errorf("rcode = %s, AA %v; want %s, AA", dns.RcodeToString[r.Rcode], r.Authoritative, dns.RcodeToString[tt.rcode])
			}
			var want []string
			if tt.answer != nodata {
				want = []string{tt.answer}
			}
			if got := rrs(r.Answer); !slices.Equal(got, want) {
				t.Errorf("answer = %q, want %q", got, want)
			}
			if negative := len(want) == 0; negative != (len(r.Ns) == 1 && r.Ns[0].Header().Rrtype == dns.TypeSOA) {
				t.Errorf("authority = %q; want the SOA only in a negative answer", rrs(r.Ns))
			}
		})
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
