package userspace

import (
	"maps"
	"net/netip"
	"slices"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// Use is what one service port's listener holds at one moment, counted by
// endpoint: what `kube-userspace-proxy explain` shows next to the rules.
type Use struct {
	// Sockets are the addresses the listener's sockets are bound to.
	Sockets []netip.AddrPort
	// Connections counts the proxied TCP connections by endpoint; Dialing
	// those still waiting for their endpoint to answer.
	Connections map[netip.AddrPort]int
	Dialing     int
	// Sessions counts the UDP sessions by endpoint.
	Sessions map[netip.AddrPort]int
	// Pins counts the clients pinned to each endpoint by ClientIP
	// affinity.
	Pins map[netip.AddrPort]int
}

// Use reports what the listener of key holds; false when there is none.
// Connections and sessions are counted on the loops that carry them (a
// command each), since only a loop reads its entries' state; so Use waits
// for every loop once, and must not be called from one.
func (ls *Listeners) Use(key service.Key) (Use, bool) {
	ls.mu.Lock()
	l, ok := ls.active[key]
	var sockets []socket
	if ok {
		sockets = slices.Collect(maps.Values(l.sockets))
	}
	ls.mu.Unlock()
	if !ok {
		return Use{}, false
	}
	u := Use{Connections: map[netip.AddrPort]int{}, Sessions: map[netip.AddrPort]int{}, Pins: l.bal.PinsByEndpoint()}
	for _, s := range sockets {
		u.Sockets = append(u.Sockets, s.addr())
	}
	slices.SortFunc(u.Sockets, netip.AddrPort.Compare)

	// This listener's connections, and the loop each is carried by (set
	// before the connection was tracked, under connMu).
	ls.connMu.Lock()
	var conns []*tcpConn
	for c := range ls.conns {
		if c.l == l {
			conns = append(conns, c)
		}
	}
	ls.connMu.Unlock()
	for _, lp := range ls.loops {
		lp.do(func(*loop) {
			for _, c := range conns {
				switch {
				case c.loop != lp:
				case c.connecting:
					u.Dialing++
				default:
					u.Connections[c.endpoint]++
				}
			}
		})
	}
	for _, s := range sockets {
		udp, ok := s.(*udpSocket)
		if !ok {
			continue
		}
		udp.loop.do(func(*loop) {
			for _, sess := range udp.sessions {
				u.Sessions[sess.endpoint]++
			}
		})
	}
	return u, true
}
