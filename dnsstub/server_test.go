package dnsstub

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

const domain = "k8s.cluster.local"

func ips(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func httpPort(port uint16) []service.NamedPort {
	return []service.NamedPort{{Name: "http", Protocol: service.TCP, Port: port}}
}

// testSnapshot is the cluster the tests ask about.
func testSnapshot() service.Snapshot {
	big := service.Service{Namespace: "default", Name: "big"}
	for i := range 100 {
		big.Endpoints = append(big.Endpoints, service.DNSEndpoint{IP: netip.AddrFrom4([4]byte{10, 245, byte(i / 250), byte(i%250 + 1)}), Hostname: fmt.Sprintf("b%d", i)})
	}
	return service.Snapshot{Services: []service.Service{
		{Namespace: "default", Name: "svc-test-1", ClusterIPs: ips("10.96.0.11"),
			Ports:     []service.NamedPort{{Name: "http", Protocol: service.TCP, Port: 80}, {Name: "echo", Protocol: service.UDP, Port: 5353}},
			Endpoints: []service.DNSEndpoint{{IP: netip.MustParseAddr("10.244.1.2"), Hostname: "10-244-1-2", Ports: httpPort(8080)}}},
		{Namespace: "default", Name: "headless", Ports: httpPort(8080), Endpoints: []service.DNSEndpoint{
			{IP: netip.MustParseAddr("10.244.1.3"), Hostname: "web-0", Ports: httpPort(8080)},
			{IP: netip.MustParseAddr("10.244.2.3"), Hostname: "10-244-2-3", Ports: httpPort(8080)},
		}},
		{Namespace: "default", Name: "empty-headless", Ports: httpPort(80)},
		{Namespace: "default", Name: "noeps", ClusterIPs: ips("10.96.0.12"), Ports: httpPort(80)},
		{Namespace: "prod", Name: "dual", ClusterIPs: ips("10.96.0.13", "fd00::13")},
		{Namespace: "default", Name: "alias", ExternalName: "svc-test-1.default.svc." + domain},
		{Namespace: "default", Name: "outside", ExternalName: "example.org"},
		big,
	}, Pods: []service.PodAddress{
		{Namespace: "default", IP: netip.MustParseAddr("10.244.1.2")},
		{Namespace: "default", IP: netip.MustParseAddr("fd00:244::2")},
	}}
}

// upstream is a DNS server on loopback standing for the node's resolver. It
// answers example.org, and anything else with NXDOMAIN; "big.example.org"
// is too large for UDP, so it answers with TC there and whole over TCP.
func upstream(t *testing.T) (addr string, queries func() []string) {
	t.Helper()
	var mu sync.Mutex
	var seen []string
	h := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg).SetReply(r)
		q := r.Question[0]
		mu.Lock()
		seen = append(seen, q.Name)
		mu.Unlock()
		switch q.Name {
		case "example.org.":
			if q.Qtype == dns.TypeA {
				rr, _ := dns.NewRR("example.org. 60 IN A 192.0.2.1")
				m.Answer = append(m.Answer, rr)
			}
		case "big.example.org.":
			for i := range 60 {
				rr, _ := dns.NewRR(fmt.Sprintf("big.example.org. 60 IN A 192.0.2.%d", i+1))
				m.Answer = append(m.Answer, rr)
			}
			if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
				m.Truncate(512)
			}
		default:
			m.Rcode = dns.RcodeNameError
		}
		w.WriteMsg(m)
	})
	pc, ln := listenBoth(t)
	for _, srv := range []*dns.Server{{PacketConn: pc, Handler: h}, {Listener: ln, Handler: h}} {
		go srv.ActivateAndServe()
		t.Cleanup(func() { srv.Shutdown() })
	}
	return pc.LocalAddr().String(), func() []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(seen)
	}
}

// stub starts a Server on loopback, UDP and TCP on one port, and returns
// its address.
func stub(t *testing.T, cfg Config, zone bool) (*Server, string) {
	t.Helper()
	s, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if zone {
		s.SetZone(NewZone(cfg.Domain, 5*time.Second, testSnapshot()))
	}
	pc, ln := listenBoth(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, pc, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s, pc.LocalAddr().String()
}

func ask(t *testing.T, addr, net_, name string, qtype uint16, edns uint16) *dns.Msg {
	t.Helper()
	q := new(dns.Msg).SetQuestion(name, qtype)
	if edns > 0 {
		q.SetEdns0(edns, false)
	}
	c := &dns.Client{Net: net_, Timeout: 3 * time.Second, UDPSize: 65535}
	r, _, err := c.Exchange(q, addr)
	if err != nil {
		t.Fatalf("%s %s over %s: %v", name, dns.TypeToString[qtype], net_, err)
	}
	return r
}

// rrs writes records as zone-file lines, sorted, so that tests can compare
// RRsets as sets. An SOA's serial (the time the zone was built) is written
// as 0.
func rrs(list []dns.RR) []string {
	var out []string
	for _, rr := range list {
		if s, ok := rr.(*dns.SOA); ok {
			c := *s
			c.Serial = 0
			rr = &c
		}
		out = append(out, strings.ReplaceAll(rr.String(), "\t", " "))
	}
	slices.Sort(out)
	return out
}

// dnsCase is one question and the whole reply it must get, in zone-file
// text, after CoreDNS's test.Case. A zero Rcode is NOERROR; the SOA is
// written with serial 0 (see rrs).
type dnsCase struct {
	Qname     string
	Qtype     uint16
	Rcode     int
	Answer    []string // sorted
	Ns        []string // the authority section
	Forwarded bool     // not ours: the upstream answers, without AA
}

// check asks c's question at addr over proto and compares the reply.
func (c dnsCase) check(t *testing.T, addr, proto string) {
	t.Helper()
	r := ask(t, addr, proto, c.Qname, c.Qtype, 0)
	if r.Rcode != c.Rcode {
		t.Errorf("rcode = %s; want %s", dns.RcodeToString[r.Rcode], dns.RcodeToString[c.Rcode])
	}
	if got := rrs(r.Answer); !slices.Equal(got, c.Answer) {
		t.Errorf("answer =\n%q\nwant\n%q", got, c.Answer)
	}
	if got := rrs(r.Ns); !slices.Equal(got, c.Ns) {
		t.Errorf("authority =\n%q\nwant\n%q", got, c.Ns)
	}
	if !r.RecursionAvailable {
		t.Error("RA not set: stub resolvers warn that recursion is not available")
	}
	if r.Authoritative == c.Forwarded {
		t.Errorf("AA = %v; want %v", r.Authoritative, !c.Forwarded)
	}
}

// soa is the zone's SOA as rrs writes it: the negative answers' authority.
const soa = domain + ". 5 IN SOA ns.dns." + domain + ". hostmaster." + domain + ". 0 7200 1800 86400 5"

func TestRecords(t *testing.T) {
	up, _ := upstream(t)
	_, addr := stub(t, Config{Domain: domain, Upstreams: []string{up}}, true)
	const z = "." + domain + "."
	const nx = dns.RcodeNameError
	tests := []dnsCase{
		{Qname: "svc-test-1.default.svc" + z, Qtype: dns.TypeA, Answer: []string{"svc-test-1.default.svc" + z + " 5 IN A 10.96.0.11"}},
		{Qname: "SVC-Test-1.Default.SVC.K8S.CLUSTER.LOCAL.", Qtype: dns.TypeA, Answer: []string{"svc-test-1.default.svc" + z + " 5 IN A 10.96.0.11"}},
		{Qname: "svc-test-1.default.svc" + z, Qtype: dns.TypeAAAA, Ns: []string{soa}},
		{Qname: "_http._tcp.svc-test-1.default.svc" + z, Qtype: dns.TypeSRV, Answer: []string{"_http._tcp.svc-test-1.default.svc" + z + " 5 IN SRV 0 100 80 svc-test-1.default.svc" + z}},
		{Qname: "_echo._udp.svc-test-1.default.svc" + z, Qtype: dns.TypeSRV, Answer: []string{"_echo._udp.svc-test-1.default.svc" + z + " 5 IN SRV 0 100 5353 svc-test-1.default.svc" + z}},
		{Qname: "_http._udp.svc-test-1.default.svc" + z, Qtype: dns.TypeSRV, Rcode: nx, Ns: []string{soa}},
		{Qname: "headless.default.svc" + z, Qtype: dns.TypeA, Answer: []string{
			"headless.default.svc" + z + " 5 IN A 10.244.1.3",
			"headless.default.svc" + z + " 5 IN A 10.244.2.3"}},
		{Qname: "web-0.headless.default.svc" + z, Qtype: dns.TypeA, Answer: []string{"web-0.headless.default.svc" + z + " 5 IN A 10.244.1.3"}},
		{Qname: "10-244-2-3.headless.default.svc" + z, Qtype: dns.TypeA, Answer: []string{"10-244-2-3.headless.default.svc" + z + " 5 IN A 10.244.2.3"}},
		{Qname: "_http._tcp.headless.default.svc" + z, Qtype: dns.TypeSRV, Answer: []string{
			"_http._tcp.headless.default.svc" + z + " 5 IN SRV 0 50 8080 10-244-2-3.headless.default.svc" + z,
			"_http._tcp.headless.default.svc" + z + " 5 IN SRV 0 50 8080 web-0.headless.default.svc" + z}},
		{Qname: "empty-headless.default.svc" + z, Qtype: dns.TypeA, Rcode: nx, Ns: []string{soa}},
		{Qname: "noeps.default.svc" + z, Qtype: dns.TypeA, Answer: []string{"noeps.default.svc" + z + " 5 IN A 10.96.0.12"}},
		{Qname: "dual.prod.svc" + z, Qtype: dns.TypeAAAA, Answer: []string{"dual.prod.svc" + z + " 5 IN AAAA fd00::13"}},
		{Qname: "dual.prod.svc" + z, Qtype: dns.TypeA, Answer: []string{"dual.prod.svc" + z + " 5 IN A 10.96.0.13"}},
		{Qname: "alias.default.svc" + z, Qtype: dns.TypeA, Answer: []string{
			"alias.default.svc" + z + " 5 IN CNAME svc-test-1.default.svc" + z,
			"svc-test-1.default.svc" + z + " 5 IN A 10.96.0.11"}},
		// An ExternalName outside the zone: our CNAME, then the
		// upstream's answer for its target.
		{Qname: "outside.default.svc" + z, Qtype: dns.TypeA, Answer: []string{
			"example.org. 60 IN A 192.0.2.1",
			"outside.default.svc" + z + " 5 IN CNAME example.org."}},
		{Qname: "outside.default.svc" + z, Qtype: dns.TypeCNAME, Answer: []string{"outside.default.svc" + z + " 5 IN CNAME example.org."}},
		{Qname: "11.0.96.10.in-addr.arpa.", Qtype: dns.TypePTR, Answer: []string{"11.0.96.10.in-addr.arpa. 5 IN PTR svc-test-1.default.svc" + z}},
		{Qname: "3.1.244.10.in-addr.arpa.", Qtype: dns.TypePTR, Answer: []string{"3.1.244.10.in-addr.arpa. 5 IN PTR web-0.headless.default.svc" + z}},
		{Qname: "2.1.244.10.in-addr.arpa.", Qtype: dns.TypePTR, Answer: []string{"2.1.244.10.in-addr.arpa. 5 IN PTR 10-244-1-2.svc-test-1.default.svc" + z}},
		{Qname: "10-244-1-2.svc-test-1.default.svc" + z, Qtype: dns.TypeA, Answer: []string{"10-244-1-2.svc-test-1.default.svc" + z + " 5 IN A 10.244.1.2"}},
		{Qname: "dns-version" + z, Qtype: dns.TypeTXT, Answer: []string{"dns-version" + z + ` 5 IN TXT "1.1.0"`}},
		{Qname: "dns-version" + z, Qtype: dns.TypeA, Ns: []string{soa}},
		{Qname: domain + ".", Qtype: dns.TypeSOA, Answer: []string{soa}},
		{Qname: "svc" + z, Qtype: dns.TypeA, Ns: []string{soa}},
		{Qname: "default.svc" + z, Qtype: dns.TypeA, Ns: []string{soa}},
		{Qname: "nope.svc" + z, Qtype: dns.TypeA, Rcode: nx, Ns: []string{soa}},
		{Qname: "foo" + z, Qtype: dns.TypeA, Rcode: nx, Ns: []string{soa}},
		{Qname: "missing.default.svc" + z, Qtype: dns.TypeA, Rcode: nx, Ns: []string{soa}},
		// The search path of a pod in "default" looking up an outside
		// name: answered here, never forwarded.
		{Qname: "example.org.default.svc" + z, Qtype: dns.TypeA, Rcode: nx, Ns: []string{soa}},
		{Qname: "example.org.svc" + z, Qtype: dns.TypeA, Rcode: nx, Ns: []string{soa}},
		{Qname: "example.org" + z, Qtype: dns.TypeAAAA, Rcode: nx, Ns: []string{soa}},
		{Qname: "example.org.", Qtype: dns.TypeA, Answer: []string{"example.org. 60 IN A 192.0.2.1"}, Forwarded: true},
		{Qname: "nowhere.example.", Qtype: dns.TypeA, Rcode: nx, Forwarded: true},
		{Qname: "4.3.2.1.in-addr.arpa.", Qtype: dns.TypePTR, Rcode: nx, Forwarded: true},
	}
	for _, tt := range tests {
		for _, proto := range []string{"udp", "tcp"} {
			t.Run(proto+" "+dns.TypeToString[tt.Qtype]+" "+tt.Qname, func(t *testing.T) { tt.check(t, addr, proto) })
		}
	}
}

func TestSearchPathIsNotForwarded(t *testing.T) {
	up, queries := upstream(t)
	_, addr := stub(t, Config{Domain: domain, Upstreams: []string{up}}, true)
	for _, name := range []string{"example.org.default.svc." + domain + ".", "example.org.svc." + domain + ".", "example.org." + domain + "."} {
		ask(t, addr, "udp", name, dns.TypeA, 0)
	}
	if q := queries(); len(q) != 0 {
		t.Errorf("upstream was asked %q; names in the cluster domain must never leave the node", q)
	}
}

func TestRefusedAndServfail(t *testing.T) {
	_, addr := stub(t, Config{Domain: domain}, false)
	// Before the first zone: SERVFAIL, not a wrong NXDOMAIN.
	if r := ask(t, addr, "udp", "svc-test-1.default.svc."+domain+".", dns.TypeA, 0); r.Rcode != dns.RcodeServerFailure {
		t.Errorf("before the first snapshot: %s, want SERVFAIL", dns.RcodeToString[r.Rcode])
	}
	// No upstream: SERVFAIL for outside names.
	if r := ask(t, addr, "udp", "example.org.", dns.TypeA, 0); r.Rcode != dns.RcodeServerFailure {
		t.Errorf("outside name with no upstream: %s, want SERVFAIL", dns.RcodeToString[r.Rcode])
	}
	// Zone transfers and other classes.
	if r := ask(t, addr, "tcp", domain+".", dns.TypeAXFR, 0); r.Rcode != dns.RcodeRefused {
		t.Errorf("AXFR: %s, want REFUSED", dns.RcodeToString[r.Rcode])
	}
	q := new(dns.Msg).SetQuestion("svc-test-1.default.svc."+domain+".", dns.TypeA)
	q.Question[0].Qclass = dns.ClassCHAOS
	r, _, err := (&dns.Client{Net: "udp"}).Exchange(q, addr)
	if err != nil || r.Rcode != dns.RcodeRefused {
		t.Errorf("class CH: %v %v, want REFUSED", r, err)
	}
}

func TestUpstreamDownGivesServfailQuickly(t *testing.T) {
	// A port nobody listens on: the upstream answers ICMP unreachable.
	pc, _ := net.ListenPacket("udp", "127.0.0.1:0")
	dead := pc.LocalAddr().String()
	pc.Close()
	_, addr := stub(t, Config{Domain: domain, Upstreams: []string{dead}, ForwardTimeout: time.Second}, true)
	start := time.Now()
	r := ask(t, addr, "udp", "example.org.", dns.TypeA, 0)
	if r.Rcode != dns.RcodeServerFailure || time.Since(start) > 2*time.Second {
		t.Errorf("with the upstream down: %s after %s, want SERVFAIL within the forward timeout", dns.RcodeToString[r.Rcode], time.Since(start))
	}
}

func TestTruncation(t *testing.T) {
	up, _ := upstream(t)
	_, addr := stub(t, Config{Domain: domain, Upstreams: []string{up}}, true)
	name := "big.default.svc." + domain + "."
	small := ask(t, addr, "udp", name, dns.TypeA, 0)
	if !small.Truncated || len(small.Answer) == 0 || len(small.Answer) >= 100 {
		t.Errorf("100 records over UDP without EDNS0: TC=%v with %d records; want TC and a partial answer", small.Truncated, len(small.Answer))
	}
	small.Compress = true // as it came: Truncate compresses what it sends
	if n, _ := small.Pack(); len(n) > 512 {
		t.Errorf("UDP reply without EDNS0 is %d bytes, over 512", len(n))
	}
	// An EDNS0 buffer claim above MaxUDPSize is held to it: a small query
	// must not draw a reply dozens of times its size.
	edns := ask(t, addr, "udp", name, dns.TypeA, 65000)
	if !edns.Truncated || len(edns.Answer) <= 30 || edns.IsEdns0() == nil || edns.IsEdns0().UDPSize() != MaxUDPSize {
		t.Errorf("over UDP with EDNS0 65000: TC=%v, %d records, OPT %v; want TC, more records than without EDNS0, and an OPT of %d", edns.Truncated, len(edns.Answer), edns.IsEdns0(), MaxUDPSize)
	}
	edns.Compress = true
	if n, _ := edns.Pack(); len(n) > MaxUDPSize {
		t.Errorf("UDP reply to an EDNS0 65000 query is %d bytes, over %d", len(n), MaxUDPSize)
	}
	// A relayed reply advertises our size too, not the upstream's.
	if r := ask(t, addr, "udp", "example.org.", dns.TypeA, 4096); r.IsEdns0() == nil || r.IsEdns0().UDPSize() != MaxUDPSize {
		t.Errorf("forwarded reply's OPT = %v; want UDP size %d", r.IsEdns0(), MaxUDPSize)
	}
	whole := ask(t, addr, "tcp", name, dns.TypeA, 0)
	if whole.Truncated || len(whole.Answer) != 100 {
		t.Errorf("over TCP: TC=%v, %d records; want all 100", whole.Truncated, len(whole.Answer))
	}
	// Forwarded: the upstream's TC reply is fetched again over TCP.
	big := ask(t, addr, "tcp", "big.example.org.", dns.TypeA, 0)
	if len(big.Answer) != 60 {
		t.Errorf("forwarded big answer: %d records, want 60 (TCP fallback)", len(big.Answer))
	}
}

func TestManyQueriesOnOneTCPConnection(t *testing.T) {
	_, addr := stub(t, Config{Domain: domain}, true)
	c := &dns.Client{Net: "tcp", Timeout: 3 * time.Second}
	conn, err := c.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for i := range 300 {
		q := new(dns.Msg).SetQuestion("svc-test-1.default.svc."+domain+".", dns.TypeA)
		r, _, err := c.ExchangeWithConn(q, conn)
		if err != nil || len(r.Answer) != 1 {
			t.Fatalf("query %d on one TCP connection: %v, %v (miekg's default closes after 128)", i, r, err)
		}
	}
}

func TestLargeUDPQuery(t *testing.T) {
	_, addr := stub(t, Config{Domain: domain}, true)
	q := new(dns.Msg).SetQuestion("svc-test-1.default.svc."+domain+".", dns.TypeA)
	q.SetEdns0(4096, false)
	opt := q.IsEdns0()
	opt.Option = append(opt.Option, &dns.EDNS0_PADDING{Padding: make([]byte, 900)})
	if b, _ := q.Pack(); len(b) <= 512 {
		t.Fatalf("query is %d bytes; the test needs one over 512", len(b))
	}
	r, _, err := (&dns.Client{Net: "udp", Timeout: 3 * time.Second}).Exchange(q, addr)
	if err != nil || r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
		t.Errorf("a 900-byte-padded UDP query: %v, %v", r, err)
	}
}

func TestMalformedQuery(t *testing.T) {
	_, addr := stub(t, Config{Domain: domain}, true)
	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// A header claiming one question, then garbage instead of a name.
	c.Write([]byte{0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff})
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 512)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("no reply to a malformed query: %v", err)
	}
	r := new(dns.Msg)
	if err := r.Unpack(buf[:n]); err != nil || r.Rcode != dns.RcodeFormatError || r.Id != 0x1234 {
		t.Errorf("reply to a malformed query: %v (%v); want FORMERR with the same ID", r, err)
	}
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	_, addr := stub(t, Config{Domain: domain, Registerer: reg}, true)
	ask(t, addr, "udp", "svc-test-1.default.svc."+domain+".", dns.TypeA, 0)
	ask(t, addr, "udp", "missing.default.svc."+domain+".", dns.TypeAAAA, 0)
	ask(t, addr, "udp", "example.org.", dns.TypeA, 0)
	if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP kube_userspace_proxy_dns_requests_total DNS queries answered, by query type and response code.
# TYPE kube_userspace_proxy_dns_requests_total counter
kube_userspace_proxy_dns_requests_total{qtype="A",rcode="NOERROR"} 1
kube_userspace_proxy_dns_requests_total{qtype="A",rcode="SERVFAIL"} 1
kube_userspace_proxy_dns_requests_total{qtype="AAAA",rcode="NXDOMAIN"} 1
# HELP kube_userspace_proxy_dns_forwarded_total DNS queries sent upstream: names outside the cluster domain.
# TYPE kube_userspace_proxy_dns_forwarded_total counter
kube_userspace_proxy_dns_forwarded_total 1
`), "kube_userspace_proxy_dns_requests_total", "kube_userspace_proxy_dns_forwarded_total"); err != nil {
		t.Error(err)
	}
}

// listenBoth opens UDP and TCP on one loopback port. The kernel picks a
// free UDP port; the same TCP port may be taken by another test running in
// parallel, so a few ports are tried.
func listenBoth(t *testing.T) (net.PacketConn, net.Listener) {
	t.Helper()
	var lastErr error
	for range 10 {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ln, err := net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			return pc, ln
		}
		pc.Close()
		lastErr = err
	}
	t.Fatal(lastErr)
	return nil, nil
}
