// Package conntrack forgets flows that our rules no longer describe.
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
//     datagrams are routed towards the ClusterIP as to any address, or,
//     for a NodePort, refused by the node, whose port nobody listens on).
//
// TCP has the second case only while connecting: a SYN sent just before
// our rule existed is retransmitted on the same flow, which keeps its
// first decision, so the connect hangs until the client gives up (two
// minutes with Linux's defaults). Established TCP connections are never
// touched: a new connection is a new flow.
//
// So after every change to our rules, the UDP entries and the connecting
// TCP entries that lead elsewhere than the rules now say are deleted, and
// the client's next packet is NATed afresh. Upstream's legacy proxier ran
// `conntrack -D --orig-dst IP -p udp` for a removed ClusterIP; this also
// covers external, load-balancer and NodePort addresses, changed listener
// ports, restarts and SYNs in flight.
package conntrack

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Mapping is one rule of ours: packets to IP:Port (UDP, or TCP when TCP is
// set) are sent to our listener port Listener. An invalid IP is a
// NodePort: any local address.
type Mapping struct {
	TCP      bool
	IP       netip.Addr
	Port     uint16
	Listener uint16
}

// ClearStale deletes the conntrack entries of family (IPv6 when ipv6) that
// no longer match our rules: UDP and connecting TCP entries for an address
// of current that were NATed to another port than its listener (or not at
// all), and UDP entries that a removed mapping NATed to its listener. It
// returns how many entries were deleted.
func ClearStale(ipv6 bool, current, removed []Mapping) (uint, error) {
	if len(current) == 0 && len(removed) == 0 {
		return 0, nil
	}
	family := netlink.FAMILY_V4
	if ipv6 {
		family = netlink.FAMILY_V6
	}
	st := newStale(current, removed)
	if len(st.nodePort) > 0 {
		// A NodePort flow that nothing NATed is stale only if it was
		// for one of the node's own addresses: the same port on another
		// host is none of our business.
		addrs, err := netlink.AddrList(nil, family)
		if err != nil {
			return 0, fmt.Errorf("list the node's addresses: %w", err)
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok {
				st.local[ip.Unmap()] = true
			}
		}
	}
	n, err := netlink.ConntrackDeleteFilters(netlink.ConntrackTable, netlink.InetFamily(family), st)
	if err != nil {
		return n, fmt.Errorf("delete stale conntrack entries: %w", err)
	}
	return n, nil
}

// stale matches the entries ClearStale deletes. The kernel's table can hold
// hundreds of thousands of flows and a node thousands of rules, so each
// flow is looked up in maps, not compared with every mapping.
type stale struct {
	listener map[frontend]uint16 // current ClusterIP-like frontends
	nodePort map[frontend]uint16 // current NodePorts (no address)
	removed  map[Mapping]bool    // UDP only
	local    map[netip.Addr]bool // the node's addresses, when there are NodePorts
}

type frontend struct {
	tcp  bool
	addr netip.AddrPort
}

func newStale(current, removed []Mapping) *stale {
	s := &stale{listener: map[frontend]uint16{}, nodePort: map[frontend]uint16{}, removed: map[Mapping]bool{}, local: map[netip.Addr]bool{}}
	for _, m := range current {
		if m.IP.IsValid() {
			s.listener[frontend{m.TCP, netip.AddrPortFrom(m.IP, m.Port)}] = m.Listener
		} else {
			s.nodePort[frontend{m.TCP, netip.AddrPortFrom(netip.Addr{}, m.Port)}] = m.Listener
		}
	}
	for _, m := range removed {
		if !m.TCP {
			s.removed[m] = true
		}
	}
	return s
}

func (s *stale) MatchConntrackFlow(f *netlink.ConntrackFlow) bool {
	var tcp bool
	switch f.Forward.Protocol {
	case unix.IPPROTO_UDP:
	case unix.IPPROTO_TCP:
		// Only connections still connecting; see the package comment.
		info, ok := f.ProtoInfo.(*netlink.ProtoInfoTCP)
		if !ok || info.State != nl.TCP_CONNTRACK_SYN_SENT {
			return false
		}
		tcp = true
	default:
		return false
	}
	dst, _ := netip.AddrFromSlice(f.Forward.DstIP)
	dst = dst.Unmap()
	port := f.Forward.DstPort
	// Where the flow's replies come from: our listener's port if a rule
	// of ours redirected it, the original port if nothing NATed it.
	to := f.Reverse.SrcPort
	if l, ok := s.listener[frontend{tcp, netip.AddrPortFrom(dst, port)}]; ok && to != l {
		return true // a ClusterIP (or external, LB) flow not on our listener
	}
	if l, ok := s.nodePort[frontend{tcp, netip.AddrPortFrom(netip.Addr{}, port)}]; ok && to != l {
		if to != port {
			return true // a NodePort flow NATed to a port that is no longer ours
		}
		if s.local[dst] {
			return true // a NodePort flow from before the rule existed
		}
	}
	return !tcp && (s.removed[Mapping{IP: dst, Port: port, Listener: to}] || s.removed[Mapping{Port: port, Listener: to}])
}
