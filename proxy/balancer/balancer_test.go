package balancer

import (
	"net/netip"
	"testing"
	"time"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

var (
	a = netip.MustParseAddrPort("10.244.1.2:8080")
	b = netip.MustParseAddrPort("10.244.2.2:8080")
	c = netip.MustParseAddrPort("10.244.3.2:8080")

	client1 = netip.MustParseAddr("10.244.9.1")
	client2 = netip.MustParseAddr("10.244.9.2")
	client3 = netip.MustParseAddr("10.244.9.3")
)

// clock is a hand-moved time source.
type clock struct{ t time.Time }

func (c *clock) now() time.Time      { return c.t }
func (c *clock) add(d time.Duration) { c.t = c.t.Add(d) }
func newBalancer() (*Balancer, *clock) {
	clk := &clock{t: time.Unix(1_000_000, 0)}
	return &Balancer{Now: clk.now}, clk
}

func picks(b *Balancer, client netip.Addr, n int) []netip.AddrPort {
	var out []netip.AddrPort
	for range n {
		out = append(out, b.Pick(client).Endpoint(0))
	}
	return out
}

func TestNoEndpoints(t *testing.T) {
	var bal Balancer
	if got := bal.Pick(client1).Len(); got != 0 {
		t.Errorf("Pick on an empty balancer: Len() = %d, want 0", got)
	}
	bal.Update([]netip.AddrPort{a}, service.Affinity{})
	bal.Update(nil, service.Affinity{})
	if got := bal.Pick(client1).Len(); got != 0 {
		t.Errorf("Pick after an update to no endpoints: Len() = %d, want 0", got)
	}
}

func TestRoundRobinIsStrictlyCyclic(t *testing.T) {
	bal, _ := newBalancer()
	bal.Update([]netip.AddrPort{c, a, b}, service.Affinity{})
	got := picks(bal, client1, 7)
	// The rotation starts at a random endpoint; from there it is a, b, c in
	// order, whoever asks.
	for i := 3; i < len(got); i++ {
		if got[i] != got[i-3] {
			t.Fatalf("picks = %v; want a cycle of length 3", got)
		}
	}
	seen := map[netip.AddrPort]bool{got[0]: true, got[1]: true, got[2]: true}
	if len(seen) != 3 {
		t.Fatalf("picks = %v; want every endpoint once per cycle", got)
	}
	order := map[netip.AddrPort]netip.AddrPort{a: b, b: c, c: a}
	for i := 1; i < len(got); i++ {
		if order[got[i-1]] != got[i] {
			t.Fatalf("picks = %v; want sorted order a, b, c, wrapping", got)
		}
	}
}

func TestSameEndpointsInAnotherOrderKeepPosition(t *testing.T) {
	bal, _ := newBalancer()
	bal.Update([]netip.AddrPort{a, b, c}, service.Affinity{})
	first := bal.Pick(client1).Endpoint(0)
	bal.Update([]netip.AddrPort{c, b, a}, service.Affinity{})
	next := bal.Pick(client1).Endpoint(0)
	if next == first {
		t.Errorf("after an update with the same set, Pick = %v again; want the rotation to go on", next)
	}
}

func TestFailoverTriesEveryEndpointOnce(t *testing.T) {
	bal, _ := newBalancer()
	bal.Update([]netip.AddrPort{a, b, c}, service.Affinity{})
	for range 50 {
		ch := bal.Pick(client1)
		// Every endpoint once in the first three attempts, then round
		// again from the picked one.
		seen := map[netip.AddrPort]bool{}
		for attempt := range 3 {
			seen[ch.Endpoint(attempt)] = true
		}
		if len(seen) != 3 || ch.Endpoint(3) != ch.Endpoint(0) || ch.Endpoint(4) != ch.Endpoint(1) {
			t.Fatalf("attempts %v %v %v %v %v; want each endpoint once, then the same order again",
				ch.Endpoint(0), ch.Endpoint(1), ch.Endpoint(2), ch.Endpoint(3), ch.Endpoint(4))
		}
	}
	// A later update does not change a choice already made.
	ch := bal.Pick(client1)
	bal.Update([]netip.AddrPort{a}, service.Affinity{})
	if ch.Len() != 3 {
		t.Errorf("Choice.Len() after an update = %d, want 3", ch.Len())
	}
}

// TestFailoverSpreadsADeadEndpointsShare: connections whose first try is a
// dead endpoint go on to all the others alike, not all to its neighbour.
func TestFailoverSpreadsADeadEndpointsShare(t *testing.T) {
	d := netip.MustParseAddrPort("10.244.4.2:8080")
	bal, _ := newBalancer()
	bal.Update([]netip.AddrPort{a, b, c, d}, service.Affinity{})
	second := map[netip.AddrPort]int{}
	for range 4000 {
		if ch := bal.Pick(client1); ch.Endpoint(0) == a { // a is dead
			second[ch.Endpoint(1)]++
		}
	}
	for _, ep := range []netip.AddrPort{b, c, d} {
		if second[ep] < 250 { // 333 expected of 1000
			t.Errorf("retries after the dead endpoint: %v; want about a third each for %v, %v, %v", second, b, c, d)
			break
		}
	}
}

func TestClientIPAffinity(t *testing.T) {
	bal, clk := newBalancer()
	bal.Update([]netip.AddrPort{a, b, c}, service.Affinity{ClientIP: true, Timeout: 10 * time.Second})
	p1 := bal.Pick(client1).Endpoint(0)
	p2 := bal.Pick(client2).Endpoint(0)
	p3 := bal.Pick(client3).Endpoint(0)
	if p1 == p2 || p2 == p3 || p1 == p3 {
		t.Fatalf("three new clients got %v %v %v; want three endpoints", p1, p2, p3)
	}
	for range 5 {
		clk.add(9 * time.Second) // each use refreshes the pin
		if got := bal.Pick(client1).Endpoint(0); got != p1 {
			t.Fatalf("client1 within the timeout got %v, want its pin %v", got, p1)
		}
	}
	clk.add(5 * time.Second) // client1 idle 5s; client2 and client3 idle 50s
	bal.ExpirePins()
	if got := bal.Pins(); got != 1 {
		t.Errorf("Pins() after expiry = %d, want 1 (client1 only)", got)
	}
}

func TestAffinityPinExpiresAtTimeout(t *testing.T) {
	bal, clk := newBalancer()
	bal.Update([]netip.AddrPort{a, b}, service.Affinity{ClientIP: true, Timeout: 5 * time.Second})
	pinned := bal.Pick(client1).Endpoint(0)
	clk.add(5 * time.Second)
	// At the timeout the pin is stale: round robin picks the other one.
	if got := bal.Pick(client1).Endpoint(0); got == pinned {
		t.Errorf("Pick at the timeout = %v, the stale pin; want the next endpoint", got)
	}
}

// TestAffinityTimeoutFromEveryUpdate is kubernetes#107398: upstream kept the
// 3-hour default when the endpoints arrived before the Service, and ignored a
// change of the timeout alone.
func TestAffinityTimeoutFromEveryUpdate(t *testing.T) {
	bal, clk := newBalancer()
	// Endpoints first, with no affinity known yet.
	bal.Update([]netip.AddrPort{a, b}, service.Affinity{})
	// Then the Service, with a 5s timeout.
	bal.Update([]netip.AddrPort{a, b}, service.Affinity{ClientIP: true, Timeout: 5 * time.Second})
	pinned := bal.Pick(client1).Endpoint(0)
	clk.add(6 * time.Second)
	if got := bal.Pick(client1).Endpoint(0); got == pinned {
		t.Fatalf("after 6s the 5s pin still held (the 3h default was used)")
	}
	// Only the timeout changes, to 1 hour.
	repinned := bal.Pick(client2).Endpoint(0)
	bal.Update([]netip.AddrPort{a, b}, service.Affinity{ClientIP: true, Timeout: time.Hour})
	clk.add(30 * time.Minute)
	if got := bal.Pick(client2).Endpoint(0); got != repinned {
		t.Errorf("after a timeout-only change to 1h, the pin was lost within 30m")
	}
}

func TestAffinityDefaultTimeout(t *testing.T) {
	bal, clk := newBalancer()
	bal.Update([]netip.AddrPort{a, b}, service.Affinity{ClientIP: true})
	pinned := bal.Pick(client1).Endpoint(0)
	clk.add(service.DefaultAffinityTimeout - time.Second)
	if got := bal.Pick(client1).Endpoint(0); got != pinned {
		t.Errorf("pin lost before the 10800s default")
	}
}

func TestRemovedEndpointDropsOnlyItsPins(t *testing.T) {
	bal, _ := newBalancer()
	bal.Update([]netip.AddrPort{a, b, c}, service.Affinity{ClientIP: true, Timeout: time.Hour})
	pins := map[netip.Addr]netip.AddrPort{}
	for _, cl := range []netip.Addr{client1, client2, client3} {
		pins[cl] = bal.Pick(cl).Endpoint(0)
	}
	var gone netip.AddrPort = pins[client1]
	var keep []netip.AddrPort
	for _, ep := range []netip.AddrPort{a, b, c} {
		if ep != gone {
			keep = append(keep, ep)
		}
	}
	bal.Update(keep, service.Affinity{ClientIP: true, Timeout: time.Hour})
	if got := bal.Pins(); got != 2 {
		t.Errorf("Pins() after removing one endpoint = %d, want 2", got)
	}
	for _, cl := range []netip.Addr{client2, client3} {
		if got := bal.Pick(cl).Endpoint(0); got != pins[cl] {
			t.Errorf("client %v moved from %v to %v; only client1's endpoint went away", cl, pins[cl], got)
		}
	}
	if got := bal.Pick(client1).Endpoint(0); got == gone {
		t.Errorf("client1 still sent to removed endpoint %v", gone)
	}
}

func TestConnectedRepinsAfterFailover(t *testing.T) {
	bal, _ := newBalancer()
	bal.Update([]netip.AddrPort{a, b}, service.Affinity{ClientIP: true, Timeout: time.Hour})
	ch := bal.Pick(client1)
	bal.Connected(client1, ch.Endpoint(1)) // the first endpoint did not answer
	for range 3 {
		if got := bal.Pick(client1).Endpoint(0); got != ch.Endpoint(1) {
			t.Fatalf("after failover the client is sent to %v, want %v", got, ch.Endpoint(1))
		}
	}
}

func TestAffinityOffDropsPins(t *testing.T) {
	bal, _ := newBalancer()
	bal.Update([]netip.AddrPort{a, b}, service.Affinity{ClientIP: true, Timeout: time.Hour})
	bal.Pick(client1)
	bal.Update([]netip.AddrPort{a, b}, service.Affinity{})
	if got := bal.Pins(); got != 0 {
		t.Errorf("Pins() with affinity off = %d, want 0", got)
	}
	if x, y := bal.Pick(client1).Endpoint(0), bal.Pick(client1).Endpoint(0); x == y {
		t.Errorf("without affinity one client got %v twice in a row", x)
	}
}
