// Package replyroute delivers to this node the replies that belong to our
// transparent sockets (--preserve-source-ip).
//
// When the proxy keeps a client pod's address, it connects to the endpoint
// from that address, which is not the node's. The endpoint's replies are
// addressed to the client pod, and the node's routing table would forward
// them to it. The mangle rule of package iptables marks each such packet
// (it belongs to one of our IP_TRANSPARENT sockets); the policy route here
// sends every marked packet to local delivery, where the socket takes it:
//
//	ip rule add fwmark 0x1000000/0x1000000 lookup 27509 pref 9100
//	ip route add local 0.0.0.0/0 dev lo table 27509
//
// (the same in IPv6). It is what TPROXY-based proxies set up, in the
// direction of replies. It knows routing, not Services.
package replyroute

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Defaults: the mark bit (clear of kube-proxy's 0x4000 and 0x8000 and of
// the low bits CNIs use), the routing table (0x6b75, "ku") and the rule's
// priority (before the main table's 32766).
const (
	DefaultMark     = 0x1000000
	DefaultTable    = 0x6b75
	DefaultPriority = 9100
)

// Route is one proxy's policy route for marked replies.
type Route struct {
	Mark     uint32
	Table    int
	Priority int
}

// Default is the route of the default mark, table and priority.
var Default = Route{Mark: DefaultMark, Table: DefaultTable, Priority: DefaultPriority}

func (r Route) rule(family int) *netlink.Rule {
	rule := netlink.NewRule()
	rule.Family = family
	rule.Mark = r.Mark
	mask := r.Mark
	rule.Mask = &mask
	rule.Table = r.Table
	rule.Priority = r.Priority
	return rule
}

func (r Route) route(family int, lo int) *netlink.Route {
	_, dst, _ := net.ParseCIDR("0.0.0.0/0")
	if family == unix.AF_INET6 {
		_, dst, _ = net.ParseCIDR("::/0")
	}
	return &netlink.Route{Family: family, Dst: dst, LinkIndex: lo, Table: r.Table, Type: unix.RTN_LOCAL, Scope: netlink.SCOPE_HOST}
}

// Ensure adds the rule and the route, in both families, where they are
// missing; IPv6 is skipped on a node without it.
func (r Route) Ensure() error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("reply route: %w", err)
	}
	var errs []error
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		if err := netlink.RouteReplace(r.route(family, lo.Attrs().Index)); err != nil {
			if family == unix.AF_INET6 && errors.Is(err, unix.EAFNOSUPPORT) {
				continue
			}
			errs = append(errs, fmt.Errorf("reply route, %s: %w", familyName(family), err))
			continue
		}
		have, err := r.has(family)
		if err == nil && !have {
			err = netlink.RuleAdd(r.rule(family))
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("reply rule, %s: %w", familyName(family), err))
		}
	}
	return errors.Join(errs...)
}

// has reports whether family's rules hold ours.
func (r Route) has(family int) (bool, error) {
	rules, err := netlink.RuleList(family)
	if err != nil {
		return false, err
	}
	for _, rule := range rules {
		if rule.Table == r.Table && rule.Mark == r.Mark && rule.Priority == r.Priority {
			return true, nil
		}
	}
	return false, nil
}

// Cleanup removes the rule and the route, wherever they are.
func (r Route) Cleanup() error {
	var errs []error
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		for {
			have, err := r.has(family)
			if err != nil || !have {
				break
			}
			if err := netlink.RuleDel(r.rule(family)); err != nil {
				errs = append(errs, fmt.Errorf("reply rule, %s: %w", familyName(family), err))
				break
			}
		}
		routes, err := netlink.RouteListFiltered(family, &netlink.Route{Table: r.Table}, netlink.RT_FILTER_TABLE)
		if err != nil {
			continue // no such family here
		}
		for i := range routes {
			if err := netlink.RouteDel(&routes[i]); err != nil {
				errs = append(errs, fmt.Errorf("reply route, %s: %w", familyName(family), err))
			}
		}
	}
	return errors.Join(errs...)
}

func familyName(family int) string {
	if family == unix.AF_INET6 {
		return "IPv6"
	}
	return "IPv4"
}
