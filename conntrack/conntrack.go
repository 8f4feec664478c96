// Package conntrack forgets UDP flows that our rules no longer describe.
//
// The kernel's connection tracking decides a flow's NAT once, on its first
// packet, and keeps the decision for as long as packets keep coming (for
// UDP, until 30s to 180s of silence). A client that keeps sending from one
// socket, as resolvers and game clients do, therefore keeps going where the
// rules sent it at the start:
//   - to a listener port we have closed (the Service was removed, or the
//     proxy restarted and its listeners got other ports): its datagrams
//     are refused, for as long as it sends;
//   - nowhere near us at all, if it started before our rule existed (its
//     datagrams are routed towards the ClusterIP as to any address).
//
// TCP does not need this: a new connection is a new flow. So after every
// change to our UDP rules, the entries that lead elsewhere than the rules
// now say are deleted, and the client's next datagram is NATed afresh.
// Upstream's legacy proxier ran `conntrack -D --orig-dst IP -p udp` for a
// removed ClusterIP; this also covers external, load-balancer and NodePort
// addresses, changed listener ports, and restarts.
package conntrack

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Mapping is one UDP rule of ours: datagrams to IP:Port are sent to our
// listener port Listener. An invalid IP is a NodePort: any local address.
type Mapping struct {
	IP       netip.Addr
	Port     uint16
	Listener uint16
}

// ClearStale deletes the UDP conntrack entries of family (IPv6 when ipv6)
// that no longer match our rules: entries for an address of current that
// were NATed to another port than its listener (or not at all), and
// entries that a removed mapping NATed to its listener. It returns how many
// entries were deleted.
func ClearStale(ipv6 bool, current, removed []Mapping) (uint, error) {
	if len(current) == 0 && len(removed) == 0 {
		return 0, nil
	}
	family := netlink.FAMILY_V4
	if ipv6 {
		family = netlink.FAMILY_V6
	}
	n, err := netlink.ConntrackDeleteFilters(netlink.ConntrackTable, netlink.InetFamily(family), newStale(current, removed))
	if err != nil {
		return n, fmt.Errorf("delete stale UDP conntrack entries: %w", err)
	}
	return n, nil
}

// stale matches the entries ClearStale deletes. The kernel's table can hold
// hundreds of thousands of flows and a node thousands of UDP rules, so
// each flow is looked up in maps, not compared with every mapping.
type stale struct {
	listener map[netip.AddrPort]uint16 // current ClusterIP-like frontends
	nodePort map[uint16]uint16         // current NodePorts
	removed  map[Mapping]bool
}

func newStale(current, removed []Mapping) *stale {
	s := &stale{listener: map[netip.AddrPort]uint16{}, nodePort: map[uint16]uint16{}, removed: map[Mapping]bool{}}
	for _, m := range current {
		if m.IP.IsValid() {
			s.listener[netip.AddrPortFrom(m.IP, m.Port)] = m.Listener
		} else {
			s.nodePort[m.Port] = m.Listener
		}
	}
	for _, m := range removed {
		s.removed[m] = true
	}
	return s
}

func (s *stale) MatchConntrackFlow(f *netlink.ConntrackFlow) bool {
	if f.Forward.Protocol != unix.IPPROTO_UDP {
		return false
	}
	dst, _ := netip.AddrFromSlice(f.Forward.DstIP)
	dst = dst.Unmap()
	port := f.Forward.DstPort
	// Where the flow's replies come from: our listener's port if a rule
	// of ours redirected it, the original port if nothing NATed it.
	to := f.Reverse.SrcPort
	if l, ok := s.listener[netip.AddrPortFrom(dst, port)]; ok && to != l {
		return true // a ClusterIP (or external, LB) flow not on our listener
	}
	if l, ok := s.nodePort[port]; ok && to != l && to != port {
		return true // a NodePort flow NATed to a port that is no longer ours
	}
	return s.removed[Mapping{IP: dst, Port: port, Listener: to}] || s.removed[Mapping{Port: port, Listener: to}]
}
