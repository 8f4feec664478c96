// Package iptables points Service addresses at our listeners. The kernel does
// the smallest job there is: a packet to ClusterIP:port is redirected, by the
// nat table, to the listener port where our listener waits (a port of the
// node, but not a NodePort). It knows Linux and iptables, not Kubernetes: it
// is given Redirects and keeps its own chains equal to them.
//
// Chains, and the legacy kube-proxy userspace chain each one stands for:
//
//	KUP-PORTALS-CONTAINER   nat, from PREROUTING (top)   KUBE-PORTALS-CONTAINER
//	KUP-PORTALS-HOST        nat, from OUTPUT (top)       KUBE-PORTALS-HOST
//	KUP-NODEPORT-CONTAINER  nat, from PREROUTING (end)   KUBE-NODEPORT-CONTAINER
//	KUP-NODEPORT-HOST       nat, from OUTPUT (end)       KUBE-NODEPORT-HOST
//	KUP-NODEPORT-NON-LOCAL  filter, from INPUT (top)     KUBE-NODEPORT-NON-LOCAL
//
// The filter chain also guards our listener ports: a packet that reaches
// one without having been redirected by our rules is dropped, and a new
// flow to the listener of a service port with no endpoints is refused.
//
// PREROUTING sees packets that arrive from pods and other hosts; OUTPUT sees
// packets the node itself sends. Our names differ from upstream's because
// kube-proxy's iptables mode deletes the KUBE-PORTALS-* chains it finds.
// See docs/iptables.md for every rule, explained.
package iptables

import (
	"crypto/sha256"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Chain names of the default proxy (no --service-proxy-name). Each is at
// most 28 characters, the kernel's limit, with room for a token.
const (
	ChainPortalsContainer  = "KUP-PORTALS-CONTAINER"
	ChainPortalsHost       = "KUP-PORTALS-HOST"
	ChainNodePortContainer = "KUP-NODEPORT-CONTAINER"
	ChainNodePortHost      = "KUP-NODEPORT-HOST"
	ChainNodePortNonLocal  = "KUP-NODEPORT-NON-LOCAL"
	ChainReplies           = "KUP-REPLIES"
)

// Chains are the names one proxy's rules live under. Two proxies on one
// node (each serving the Services of its own --service-proxy-name) must
// never write, or clean up, each other's chains: a named proxy's chains
// carry a token made from its name.
type Chains struct {
	PortalsContainer, PortalsHost, NodePortContainer, NodePortHost, NodePortNonLocal string
	// Replies (mangle, from PREROUTING) marks the packets that belong to
	// our transparent sockets (--preserve-source-ip); only written when
	// ReplyMark is set.
	Replies string
	// ReplyMark is the packet mark bit of Replies, which a policy route
	// delivers locally (package replyroute); zero when the client's
	// address is not kept.
	ReplyMark uint32
	// name is the proxy name, for the jumps' comments; empty for the
	// default proxy.
	name string
}

// DefaultChains are the chains of the proxy without --service-proxy-name.
var DefaultChains = ChainsFor("")

// ChainsFor returns the chains of the proxy called name
// (--service-proxy-name): the plain names for "", else each followed by
// "-" and Token(name).
func ChainsFor(name string) Chains {
	c := Chains{ChainPortalsContainer, ChainPortalsHost, ChainNodePortContainer, ChainNodePortHost, ChainNodePortNonLocal, ChainReplies, 0, name}
	if name == "" {
		return c
	}
	suffix := "-" + Token(name)
	for _, n := range []*string{&c.PortalsContainer, &c.PortalsHost, &c.NodePortContainer, &c.NodePortHost, &c.NodePortNonLocal, &c.Replies} {
		*n += suffix
	}
	return c
}

// Token is a short, stable token for a proxy name: five hex digits of its
// SHA-256, so any name (up to a label value's 63 characters) fits in a
// chain name or an address label.
func Token(name string) string {
	sum := sha256.Sum256([]byte(name))
	return strings.ToUpper(fmt.Sprintf("%x", sum[:3])[:5])
}

// Kind is what kind of address a Redirect catches.
type Kind int

// The kinds of address a Service is reached at.
const (
	// ClusterIP is the Service's virtual IP (spec.clusterIP).
	ClusterIP Kind = iota
	// LoadBalancerIP is a load balancer's ingress IP
	// (status.loadBalancer.ingress[].ip), caught like the ClusterIP.
	LoadBalancerIP
	// ExternalIP is an address of spec.externalIPs. From the node itself it
	// is caught only when it is one of the node's own addresses.
	ExternalIP
	// NodePort is spec.ports[].nodePort on every local address of the node.
	NodePort
)

// Redirect sends traffic for one frontend of a service port to our listener.
// Say which port: Port is the port clients use (the Service port, or the
// NodePort); ToPort is our listener's port on the node.
type Redirect struct {
	Kind Kind
	// IPv6 says which family the rule is for: a NodePort rule has no IP
	// of its own, and the two halves of a dual-stack Service each have
	// their NodePort rule, one in iptables and one in ip6tables.
	IPv6     bool
	IP       netip.Addr // unused for NodePort
	Port     uint16
	Protocol string // "tcp" or "udp"
	ToPort   uint16
	// NoEndpoints says the service port has no endpoint to send traffic
	// to. The redirect stays, so nothing in nat changes when endpoints
	// come and go, but a new connection or datagram that reaches our
	// listener this way is refused by the filter table (TCP reset, ICMP
	// port unreachable for UDP), as kube-proxy's REJECT rules refuse it:
	// the client sees "connection refused" at once instead of a
	// connection that opens and then breaks.
	NoEndpoints bool
	// Comment names the service port (namespace/name:port). Only letters,
	// digits and ._:/- are kept; anything else becomes '_', so no name from
	// a manifest can change what a rule means.
	Comment string
}

// jump is a rule in a built-in chain that sends packets to one of ours.
type jump struct {
	table, from string
	first       bool // insert at the top, else append
	spec        []string
}

// jumps are the rules that hook our chains into the kernel's. Portal jumps
// go first in PREROUTING and OUTPUT; NodePort jumps go last and only for
// packets to a local address, so a ClusterIP or load-balancer rule always wins
// over a NodePort that happens to use the same port number. The mangle jump
// is there only while the client's address is kept.
func (c Chains) jumps() []jump {
	all := c.allJumps()
	if c.ReplyMark != 0 {
		return all
	}
	return slices.DeleteFunc(all, func(j jump) bool { return j.table == "mangle" })
}

// allJumps are jumps with the mangle one, whatever ReplyMark says: what
// Cleanup removes.
func (c Chains) allJumps() []jump {
	who := "kube-userspace-proxy"
	if c.name != "" {
		who += " " + safeComment(c.name)
	}
	return []jump{
		{"nat", "PREROUTING", true, []string{"-m", "comment", "--comment", who + " service portals", "-j", c.PortalsContainer}},
		{"nat", "OUTPUT", true, []string{"-m", "comment", "--comment", who + " service portals", "-j", c.PortalsHost}},
		{"nat", "PREROUTING", false, []string{"-m", "addrtype", "--dst-type", "LOCAL", "-m", "comment", "--comment", who + " service nodeports; must stay last", "-j", c.NodePortContainer}},
		{"nat", "OUTPUT", false, []string{"-m", "addrtype", "--dst-type", "LOCAL", "-m", "comment", "--comment", who + " service nodeports; must stay last", "-j", c.NodePortHost}},
		{"filter", "INPUT", true, []string{"-m", "comment", "--comment", who + " lets non-local nodeport traffic reach its listeners", "-j", c.NodePortNonLocal}},
		{"mangle", "PREROUTING", true, []string{"-m", "comment", "--comment", who + " replies to its transparent sockets", "-j", c.Replies}},
	}
}

// Render returns the iptables-restore input that sets our chains to exactly
// redirects. bind is --bind-address: the unspecified address (0.0.0.0) means
// our listeners take any local address, so REDIRECT is enough; any other
// address means the listeners are bound there, so packets are DNATed to it.
func (c Chains) Render(redirects []Redirect, bind netip.Addr) []byte {
	var b strings.Builder
	b.WriteString("*nat\n")
	for _, chain := range []string{c.PortalsContainer, c.PortalsHost, c.NodePortContainer, c.NodePortHost} {
		fmt.Fprintf(&b, ":%s - [0:0]\n", chain)
	}
	for _, r := range redirects {
		target := redirectTarget(r, bind)
		match := fmt.Sprintf("-p %s -m comment --comment %q -m %s --dport %d", r.Protocol, safeComment(r.Comment), r.Protocol, r.Port)
		switch r.Kind {
		case ClusterIP, LoadBalancerIP:
			// Pods and the node alike are sent to our listener.
			fmt.Fprintf(&b, "-A %s -d %s %s %s\n", c.PortalsContainer, hostCIDR(r.IP), match, target)
			fmt.Fprintf(&b, "-A %s -d %s %s %s\n", c.PortalsHost, hostCIDR(r.IP), match, target)
		case ExternalIP:
			// Traffic arriving at the node for an external IP is caught.
			// The node's own traffic is caught only when the external IP
			// is one of the node's addresses; otherwise it is routed out
			// to wherever that address really lives.
			fmt.Fprintf(&b, "-A %s -d %s %s %s\n", c.PortalsContainer, hostCIDR(r.IP), match, target)
			fmt.Fprintf(&b, "-A %s -d %s %s -m addrtype --dst-type LOCAL %s\n", c.PortalsHost, hostCIDR(r.IP), match, target)
		case NodePort:
			// The jump into these chains already requires a local
			// destination address.
			fmt.Fprintf(&b, "-A %s %s %s\n", c.NodePortContainer, match, target)
			fmt.Fprintf(&b, "-A %s %s %s\n", c.NodePortHost, match, target)
		}
	}
	b.WriteString("COMMIT\n*filter\n")
	fmt.Fprintf(&b, ":%s - [0:0]\n", c.NodePortNonLocal)
	if c.ReplyMark != 0 {
		// A reply to a transparent socket of ours is addressed to a
		// client's port, which may be the number of a listener port:
		// the guard below is not for it.
		fmt.Fprintf(&b, "-A %s -m mark --mark %#x/%#x -m comment --comment \"kube-userspace-proxy: replies to transparent sockets\" -j RETURN\n", c.NodePortNonLocal, c.ReplyMark, c.ReplyMark)
	}
	// Our listeners bind every address of the node, so a listener port is
	// reachable from anywhere the node is: a ClusterIP-only Service, or the
	// DNS stub (an open resolver), straight from another host. Only traffic
	// that one of our rules redirected may reach it: conntrack marks such
	// a flow DNAT (REDIRECT is a DNAT to the node's own address), and any
	// other packet to a listener port is dropped here, before a socket sees
	// it. The node's own connections to a ClusterIP are redirected in nat
	// OUTPUT, so they carry the mark too.
	//
	// A listener whose service port has no endpoints then refuses new
	// flows, after the redirect has made their destination our listener:
	// the refusal goes back through conntrack, which turns its source back
	// into the address the client asked for. Packets of flows already
	// established (connections still being served while their pods end)
	// pass. UDP gets REJECT's default, ICMP port unreachable (ICMPv6 in
	// ip6tables); TCP gets a reset instead: the kernel rate-limits ICMP
	// errors, and a reset answers every SYN at once with ECONNREFUSED.
	listeners := map[string]bool{}
	for _, r := range redirects {
		key := fmt.Sprintf("%s %d", r.Protocol, r.ToPort)
		if listeners[key] {
			continue
		}
		listeners[key] = true
		fmt.Fprintf(&b, "-A %s -p %s -m comment --comment \"kube-userspace-proxy listener: only redirected traffic\" -m %s --dport %d -m conntrack ! --ctstate DNAT -j DROP\n",
			c.NodePortNonLocal, r.Protocol, r.Protocol, r.ToPort)
		if !r.NoEndpoints {
			continue
		}
		reject := "REJECT"
		if r.Protocol == "tcp" {
			reject = "REJECT --reject-with tcp-reset"
		}
		fmt.Fprintf(&b, "-A %s -p %s -m comment --comment %q -m %s --dport %d -m conntrack --ctstate NEW -j %s\n",
			c.NodePortNonLocal, r.Protocol, safeComment(r.Comment)+" has no endpoints", r.Protocol, r.ToPort, reject)
	}
	for _, r := range redirects {
		if r.Kind != NodePort || r.NoEndpoints {
			continue
		}
		// By the time INPUT sees a NodePort packet it has been redirected,
		// so the rule names our listener's port, not the NodePort.
		fmt.Fprintf(&b, "-A %s -p %s -m comment --comment %q -m %s --dport %d -m conntrack --ctstate NEW -j ACCEPT\n",
			c.NodePortNonLocal, r.Protocol, safeComment(r.Comment), r.Protocol, r.ToPort)
	}
	b.WriteString("COMMIT\n")
	if c.ReplyMark != 0 {
		// --preserve-source-ip: an endpoint answers a connection we made
		// from a client pod's address by sending to that address, which
		// routing would hand to the client pod itself. A packet of a
		// flow in its reply direction that belongs to one of our
		// transparent sockets is marked instead, and the mark's policy
		// route delivers it locally, to that socket.
		fmt.Fprintf(&b, "*mangle\n:%s - [0:0]\n", c.Replies)
		fmt.Fprintf(&b, "-A %s -m conntrack --ctdir REPLY -m socket --transparent -m comment --comment \"kube-userspace-proxy: reply to a connection made from a client's address\" -j MARK --set-xmark %#x/%#x\n",
			c.Replies, c.ReplyMark, c.ReplyMark)
		b.WriteString("COMMIT\n")
	}
	return []byte(b.String())
}

func redirectTarget(r Redirect, bind netip.Addr) string {
	if !bind.IsValid() || bind.IsUnspecified() {
		return fmt.Sprintf("-j REDIRECT --to-ports %d", r.ToPort)
	}
	return fmt.Sprintf("-j DNAT --to-destination %s", netip.AddrPortFrom(bind, r.ToPort))
}

func hostCIDR(ip netip.Addr) string {
	return netip.PrefixFrom(ip, ip.BitLen()).String()
}

// safeComment keeps a rule comment harmless and within the comment match's
// 256-byte limit, whatever it was made from.
func safeComment(s string) string {
	b := []byte(s)
	for i, c := range b {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9',
			c == '.', c == '_', c == ':', c == '/', c == '-':
		default:
			b[i] = '_'
		}
	}
	if len(b) > 255 {
		b = b[:255]
	}
	return string(b)
}
