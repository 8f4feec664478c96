package dnsstub

import (
	"testing"
	"time"

	"github.com/miekg/dns"
)

// FuzzAnswer feeds arbitrary bytes to the query path. Whatever arrives, the
// stub must not panic, and what it answers must be a well-formed reply to
// that query: same ID, the response bit set, and packable. (Bytes that do
// not unpack never reach the handler: miekg answers FORMERR itself.)
func FuzzAnswer(f *testing.F) {
	s, err := NewServer(Config{Domain: domain})
	if err != nil {
		f.Fatal(err)
	}
	s.SetZone(NewZone(domain, 5*time.Second, testSnapshot()))
	for _, name := range []string{"svc-test-1.default.svc." + domain + ".", "_http._tcp.headless.default.svc." + domain + ".", "11.0.96.10.in-addr.arpa.", "alias.default.svc." + domain + "."} {
		for _, qtype := range []uint16{dns.TypeA, dns.TypeAAAA, dns.TypeSRV, dns.TypePTR, dns.TypeANY} {
			q := new(dns.Msg).SetQuestion(name, qtype)
			q.SetEdns0(1232, true)
			b, _ := q.Pack()
			f.Add(b, true)
		}
	}
	f.Fuzz(func(t *testing.T, b []byte, udp bool) {
		q := new(dns.Msg)
		if err := q.Unpack(b); err != nil {
			return
		}
		r := s.Answer(q, udp)
		if r.Id != q.Id || !r.Response {
			t.Fatalf("reply ID %d response %v to query ID %d", r.Id, r.Response, q.Id)
		}
		packed, err := r.Pack()
		if err != nil {
			t.Fatalf("reply does not pack: %v\n%v", err, r)
		}
		if udp && q.IsEdns0() == nil && len(packed) > dns.MinMsgSize && !r.Truncated {
			// Pack without compression may exceed what was sent; only a
			// reply that claims to be whole must fit.
			r.Compress = true
			if p, _ := r.Pack(); len(p) > dns.MinMsgSize {
				t.Fatalf("UDP reply of %d bytes to a query without EDNS0", len(p))
			}
		}
		if udp {
			r.Compress = true
			if p, _ := r.Pack(); len(p) > MaxUDPSize {
				t.Fatalf("UDP reply of %d bytes, over %d", len(p), MaxUDPSize)
			}
		}
	})
}
