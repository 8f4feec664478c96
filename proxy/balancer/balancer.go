// Package balancer chooses the endpoint for each new connection to a service
// port: round robin over the endpoints, or, with sessionAffinity ClientIP, the
// endpoint a client IP was pinned to, for as long as the pin is fresh.
//
// This is the legacy kube-proxy LoadBalancerRR (pkg/proxy/userspace/roundrobin.go)
// with its affinity timeout bug fixed (kubernetes#107398): the timeout is taken
// from every update, whatever order the Service and its endpoints arrive in,
// because Update always carries both.
package balancer

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// Balancer spreads the connections of one service port over its endpoints. It
// is safe for concurrent use. The zero value has no endpoints.
type Balancer struct {
	// Now returns the current time; nil means time.Now. Tests set it.
	Now func() time.Time

	mu        sync.Mutex
	endpoints []netip.AddrPort // sorted; never mutated after it is stored
	next      int              // round-robin position in endpoints
	affinity  service.Affinity
	pins      map[netip.Addr]pin // client IP -> endpoint, with ClientIP affinity
}

type pin struct {
	endpoint netip.AddrPort
	lastUsed time.Time
}

func (b *Balancer) now() time.Time {
	if b.Now != nil {
		return b.Now()
	}
	return time.Now()
}

// Update replaces the endpoints and the affinity settings. An unchanged
// endpoint set (in any order) keeps its round-robin position; a changed one
// starts again at a random endpoint. It reports whether the endpoint set
// changed. Pins to endpoints that are gone are dropped, and all pins
// are dropped when affinity is turned off.
func (b *Balancer) Update(endpoints []netip.AddrPort, affinity service.Affinity) (changed bool) {
	if affinity.ClientIP && affinity.Timeout <= 0 {
		affinity.Timeout = service.DefaultAffinityTimeout
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.affinity = affinity
	if !affinity.ClientIP {
		b.pins = nil
	}
	endpoints = slices.Clone(endpoints)
	slices.SortFunc(endpoints, netip.AddrPort.Compare)
	if slices.Equal(b.endpoints, endpoints) {
		return false
	}
	b.endpoints = endpoints
	// Start the rotation at a random endpoint, as upstream shuffled its list:
	// otherwise every node would send its first connection to the same pod.
	b.next = 0
	if len(endpoints) > 0 {
		b.next = rand.IntN(len(endpoints))
	}
	for client, p := range b.pins {
		if !slices.Contains(b.endpoints, p.endpoint) {
			delete(b.pins, client)
		}
	}
	return true
}

// Choice is the order in which one new connection tries endpoints: first the
// endpoint the balancer picked, then every other one once, in list order
// from a random one of them, and then round again. The random start spreads
// a dead endpoint's share over all the others: walking on from the dead one
// would hand its whole share to its neighbour in the list, which would then
// get twice the traffic of the rest. It is a value: later Updates do not
// change it.
type Choice struct {
	endpoints []netip.AddrPort
	first     int
	// skip is where the failover order starts among the others: the
	// first retry goes to endpoints[first+skip].
	skip int
}

// newChoice makes the Choice that starts at endpoints[first].
func newChoice(endpoints []netip.AddrPort, first int) Choice {
	c := Choice{endpoints: endpoints, first: first, skip: 1}
	if n := len(endpoints); n > 2 {
		c.skip = 1 + rand.IntN(n-1)
	}
	return c
}

// Len is the number of distinct endpoints in c; zero means there is none.
func (c Choice) Len() int { return len(c.endpoints) }

// Endpoint is the endpoint for the given attempt (0 is the first try).
func (c Choice) Endpoint(attempt int) netip.AddrPort {
	n := len(c.endpoints)
	k := attempt % n
	if k == 0 {
		return c.endpoints[c.first]
	}
	// The others are first+1 ... first+n-1 (mod n); the k-th retry takes
	// the one skip-1+k-1 places into that ring.
	other := (c.skip - 1 + k - 1) % (n - 1)
	return c.endpoints[(c.first+1+other)%n]
}

// Pick chooses the endpoint for a new connection from client. With ClientIP
// affinity a fresh pin wins and is refreshed; otherwise the next endpoint in
// round-robin order is taken and, with affinity, the client is pinned to it.
func (b *Balancer) Pick(client netip.Addr) Choice {
	b.mu.Lock()
	defer b.mu.Unlock()
	eps := b.endpoints
	if len(eps) == 0 {
		return Choice{}
	}
	now := b.now()
	if b.affinity.ClientIP {
		if p, ok := b.pins[client]; ok && now.Sub(p.lastUsed) < b.affinity.Timeout {
			p.lastUsed = now
			b.pins[client] = p
			i, _ := slices.BinarySearchFunc(eps, p.endpoint, netip.AddrPort.Compare)
			return newChoice(eps, i)
		}
	}
	i := b.next
	b.next = (b.next + 1) % len(eps)
	if b.affinity.ClientIP {
		b.pinLocked(client, eps[i], now)
	}
	return newChoice(eps, i)
}

// Connected tells the balancer that the connection from client reached
// endpoint after earlier attempts failed, so the client's pin moves there.
func (b *Balancer) Connected(client netip.Addr, endpoint netip.AddrPort) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.affinity.ClientIP && slices.Contains(b.endpoints, endpoint) {
		b.pinLocked(client, endpoint, b.now())
	}
}

func (b *Balancer) pinLocked(client netip.Addr, endpoint netip.AddrPort, now time.Time) {
	if b.pins == nil {
		b.pins = make(map[netip.Addr]pin)
	}
	b.pins[client] = pin{endpoint: endpoint, lastUsed: now}
}

// ExpirePins forgets pins unused for the affinity timeout, so the map does not
// grow with every client ever seen. The proxy calls it on every sync.
func (b *Balancer) ExpirePins() {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.now()
	for client, p := range b.pins {
		if now.Sub(p.lastUsed) >= b.affinity.Timeout {
			delete(b.pins, client)
		}
	}
}

// Pins is the number of clients currently pinned.
func (b *Balancer) Pins() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.pins)
}

// PinsByEndpoint counts the live pins of each endpoint.
func (b *Balancer) PinsByEndpoint() map[netip.AddrPort]int {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.now()
	out := map[netip.AddrPort]int{}
	for _, p := range b.pins {
		if now.Sub(p.lastUsed) < b.affinity.Timeout {
			out[p.endpoint]++
		}
	}
	return out
}

// Has reports whether endpoint is one of the current endpoints.
func (b *Balancer) Has(endpoint netip.AddrPort) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	_, ok := slices.BinarySearchFunc(b.endpoints, endpoint, netip.AddrPort.Compare)
	return ok
}
