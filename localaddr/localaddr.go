// Package localaddr makes Service IPs addresses of the node itself, for the
// bind mode that needs no netfilter at all. Once 10.96.0.11 is a local
// address, a pod's packet to it is delivered to the node like any packet to
// the node, and a listener bound to 10.96.0.11:80 accepts it: no NAT, no
// conntrack, no rule.
//
// The addresses live on a device of ours when the kernel can make one (a
// dummy interface, kup0), else on lo. Either way each address we add
// carries our label (kup0:kup or lo:kup), which is how a restarted proxy
// tells its own addresses from anybody else's: it adds what is missing,
// removes its own stale ones, and never touches an address without our
// label. See docs/modes.md.
package localaddr

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// DeviceName is the dummy device we create when the kernel can.
const DeviceName = "kup0"

// labelMark marks the addresses of every proxy of ours: the label is
// "<device>:kup" for the default proxy and "<device>:kup<token>" for one
// with a --service-proxy-name. Linux requires an address label to start
// with its device's name, and keeps it to 15 characters.
const labelMark = ":kup"

// Device holds the Service addresses.
type Device struct {
	link  netlink.Link
	label string
}

// label is the address label of the proxy with token on link.
func label(link netlink.Link, token string) string {
	return link.Attrs().Name + labelMark + token
}

// Open finds or makes the device for Service addresses: our dummy device if
// the kernel has the dummy driver, else lo. It also keeps the node from
// answering ARP for those addresses on its real interfaces (see ARP). token
// tells this proxy's addresses from those of another proxy of ours on the
// node ("" for the default proxy; see iptables.Token).
func Open(token string) (*Device, error) {
	link, err := netlink.LinkByName(DeviceName)
	if err != nil {
		link, err = makeDummy()
	}
	if err != nil {
		// No dummy driver (this is common in minimal kernels and VMs):
		// lo serves as well, every address on it is local.
		if link, err = netlink.LinkByName("lo"); err != nil {
			return nil, fmt.Errorf("find lo: %w", err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("bring %s up: %w", link.Attrs().Name, err)
	}
	if err := ARP(link); err != nil {
		return nil, err
	}
	return &Device{link: link, label: label(link, token)}, nil
}

func makeDummy() (netlink.Link, error) {
	d := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: DeviceName}}
	if err := netlink.LinkAdd(d); err != nil {
		return nil, err
	}
	return netlink.LinkByName(DeviceName)
}

// Name is the device's name.
func (d *Device) Name() string { return d.link.Attrs().Name }

// ARP keeps the node from claiming Service addresses on its network, as
// kube-proxy's IPVS mode does for kube-ipvs0: arp_ignore=1 answers ARP only
// for addresses of the interface the request came in on, and arp_announce=2
// never uses an address of another interface as the source of the node's own
// ARP requests. Without them Linux answers ARP for any local address on any
// interface, and the node would draw other hosts' traffic for every
// ClusterIP.
//
// The values it replaces are written down first, in the alias of link
// (IFLA_IFALIAS, "ip link show" prints it), so that Cleanup can put them
// back: the kernel keeps the alias for the network namespace, across
// restarts of the proxy and of its container, and a second proxy of ours
// finds the first one's record and keeps it.
func ARP(link netlink.Link) error {
	if !strings.HasPrefix(link.Attrs().Alias, arpAliasPrefix) {
		var saved []string
		for _, s := range arpSysctls {
			old, err := os.ReadFile(s.file)
			if err != nil {
				return fmt.Errorf("read %s: %w", s.file, err)
			}
			saved = append(saved, s.name+"="+strings.TrimSpace(string(old)))
		}
		if err := netlink.LinkSetAlias(link, arpAliasPrefix+strings.Join(saved, " ")); err != nil {
			return fmt.Errorf("record the ARP settings on %s: %w", link.Attrs().Name, err)
		}
	}
	for _, s := range arpSysctls {
		if err := os.WriteFile(s.file, []byte(s.value), 0o644); err != nil {
			return fmt.Errorf("set %s to %s: %w", s.file, s.value, err)
		}
	}
	return nil
}

// arpSysctls are the settings ARP changes.
var arpSysctls = []struct{ name, file, value string }{
	{"arp_ignore", "/proc/sys/net/ipv4/conf/all/arp_ignore", "1"},
	{"arp_announce", "/proc/sys/net/ipv4/conf/all/arp_announce", "2"},
}

// arpAliasPrefix starts the link alias that records the ARP settings found
// before ours: "kube-userspace-proxy arp: arp_ignore=0 arp_announce=0".
const arpAliasPrefix = "kube-userspace-proxy arp: "

// restoreARP puts back the ARP settings recorded in link's alias, and
// clears the alias. Without a record it changes nothing.
func restoreARP(link netlink.Link) error {
	alias := link.Attrs().Alias
	if !strings.HasPrefix(alias, arpAliasPrefix) {
		return nil
	}
	var errs []error
	for _, kv := range strings.Fields(strings.TrimPrefix(alias, arpAliasPrefix)) {
		name, value, _ := strings.Cut(kv, "=")
		for _, s := range arpSysctls {
			if s.name == name {
				if err := os.WriteFile(s.file, []byte(value), 0o644); err != nil {
					errs = append(errs, fmt.Errorf("restore %s to %s: %w", s.file, value, err))
				}
			}
		}
	}
	if len(errs) == 0 {
		errs = append(errs, netlink.LinkSetAlias(link, ""))
	}
	return errors.Join(errs...)
}

// Ours lists the addresses on the device that carry our label.
func (d *Device) Ours() ([]netip.Addr, error) {
	addrs, err := netlink.AddrList(d.link, unix.AF_INET)
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", d.Name(), err)
	}
	var ours []netip.Addr
	for _, a := range addrs {
		if a.Label != d.label {
			continue
		}
		if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok {
			ours = append(ours, ip)
		}
	}
	slices.SortFunc(ours, netip.Addr.Compare)
	return ours, nil
}

// Sync makes our addresses exactly want: it adds the missing ones and removes
// ours that are not wanted. An address somebody else put on the device (no
// label, or another label) is never removed, and is not added again.
func (d *Device) Sync(want []netip.Addr) error {
	ours, err := d.Ours()
	if err != nil {
		return err
	}
	others, err := d.others()
	if err != nil {
		return err
	}
	var errs []error
	for _, ip := range want {
		if slices.Contains(ours, ip) || others[ip] {
			continue
		}
		if err := netlink.AddrAdd(d.link, d.addr(ip)); err != nil && !errors.Is(err, unix.EEXIST) {
			errs = append(errs, fmt.Errorf("add %s to %s: %w", ip, d.Name(), err))
		}
	}
	for _, ip := range ours {
		if !slices.Contains(want, ip) {
			if err := netlink.AddrDel(d.link, d.addr(ip)); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
				errs = append(errs, fmt.Errorf("remove %s from %s: %w", ip, d.Name(), err))
			}
		}
	}
	return errors.Join(errs...)
}

// others is the set of addresses on the device that are not ours.
func (d *Device) others() (map[netip.Addr]bool, error) {
	addrs, err := netlink.AddrList(d.link, unix.AF_INET)
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", d.Name(), err)
	}
	m := map[netip.Addr]bool{}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok && a.Label != d.label {
			m[ip] = true
		}
	}
	return m, nil
}

func (d *Device) addr(ip netip.Addr) *netlink.Addr {
	return &netlink.Addr{
		IPNet: &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(32, 32)},
		Label: d.label,
		// A host route only: the address must not make the node think it
		// owns a whole subnet.
		Scope: unix.RT_SCOPE_HOST,
	}
}

// Cleanup removes the addresses of the proxy with token, and once no proxy
// of ours has an address left, puts the ARP settings back as they were and
// deletes our dummy device if we made one. It is not an error when there
// is nothing to remove.
func Cleanup(token string) error {
	var errs []error
	for _, name := range []string{DeviceName, "lo"} {
		link, err := netlink.LinkByName(name)
		if err != nil {
			if name == "lo" {
				errs = append(errs, fmt.Errorf("find lo: %w", err))
			}
			continue
		}
		if err := (&Device{link: link, label: label(link, token)}).Sync(nil); err != nil {
			errs = append(errs, err)
			continue
		}
		others, err := anyOfOurs(link)
		if err != nil || others {
			errs = append(errs, err) // another proxy of ours still serves here
			continue
		}
		if err := restoreARP(link); err != nil {
			errs = append(errs, err)
		}
		if _, dummy := link.(*netlink.Dummy); dummy {
			if err := netlink.LinkDel(link); err != nil {
				errs = append(errs, fmt.Errorf("delete %s: %w", DeviceName, err))
			}
		}
	}
	return errors.Join(errs...)
}

// anyOfOurs reports whether link has an address of any proxy of ours.
func anyOfOurs(link netlink.Link) (bool, error) {
	addrs, err := netlink.AddrList(link, unix.AF_INET)
	if err != nil {
		return false, fmt.Errorf("list addresses of %s: %w", link.Attrs().Name, err)
	}
	return slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return isOurs(a.Label) }), nil
}

// isOurs reports whether an address label is one of any proxy of ours.
func isOurs(label string) bool { return strings.Contains(label, labelMark) }

// NodeAddresses lists the node's IPv4 addresses within prefixes (all of them
// when prefixes is empty), leaving out loopback and our own Service
// addresses: where NodePorts are served in bind mode (--nodeport-addresses).
func NodeAddresses(prefixes []netip.Prefix) ([]netip.Addr, error) {
	addrs, err := netlink.AddrList(nil, unix.AF_INET)
	if err != nil {
		return nil, fmt.Errorf("list node addresses: %w", err)
	}
	var out []netip.Addr
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP.To4())
		if !ok || ip.IsLoopback() || isOurs(a.Label) {
			continue
		}
		if len(prefixes) == 0 || slices.ContainsFunc(prefixes, func(p netip.Prefix) bool { return p.Contains(ip) }) {
			out = append(out, ip)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out), nil
}
