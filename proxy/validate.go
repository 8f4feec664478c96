package proxy

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/dnsstub"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/iptables"
)

// Mode is how Service traffic reaches our listeners (--mode).
type Mode string

// The modes.
const (
	// ModeRedirect: iptables nat rules redirect each Service address to a
	// listener on a port of its own. The default; the legacy userspace mode.
	ModeRedirect Mode = "redirect"
	// ModeBind: no netfilter at all. Service addresses become addresses of
	// the node and the listeners bind them directly.
	ModeBind Mode = "bind"
	// ModeAuto: redirect when the kernel can NAT, else bind.
	ModeAuto Mode = "auto"
)

// UnmarshalText takes a mode's name, so --mode is parsed where it is
// defined (pflag's TextVar).
func (m *Mode) UnmarshalText(b []byte) error {
	switch v := Mode(b); v {
	case ModeRedirect, ModeBind, ModeAuto:
		*m = v
		return nil
	default:
		return fmt.Errorf("--mode %q: want redirect, bind or auto", v)
	}
}

// MarshalText gives the mode's name, the flag's default as --help shows it.
func (m Mode) MarshalText() ([]byte, error) { return []byte(m), nil }

// DefaultSyncPeriod is --iptables-sync-period's default, kube-proxy's.
const DefaultSyncPeriod = 30 * time.Second

// Validate reports every setting of c that Run cannot take, each named by
// its flag, all at once. Zero fields stand for their defaults and are
// valid. Run calls it; the command calls it first, to report bad flags
// before anything starts.
func (c *Config) Validate() error {
	errs := []error{c.Listeners.Validate(), c.dnsConfig(c.DNSUpstreams).Validate()}
	if c.Mode != "" {
		m := c.Mode
		errs = append(errs, m.UnmarshalText([]byte(m)))
	}
	if c.Mode == ModeBind {
		errs = append(errs, bindAddressFits(c))
	}
	switch c.Backend {
	case "", iptables.Legacy, iptables.NFT:
	default:
		errs = append(errs, fmt.Errorf("--iptables-backend %q: want legacy, nft or auto", c.Backend))
	}
	for flag, d := range map[string]time.Duration{"--iptables-sync-period": c.SyncPeriod, "--config-sync-period": c.ConfigSyncPeriod} {
		if d < 0 {
			errs = append(errs, fmt.Errorf("%s %s: must be greater than 0", flag, d))
		}
	}
	for flag, d := range map[string]time.Duration{"--iptables-min-sync-period": c.MinSyncPeriod, "--shutdown-grace-period": c.ShutdownGracePeriod} {
		if d < 0 {
			errs = append(errs, fmt.Errorf("%s %s: must be 0 or more", flag, d))
		}
	}
	if msgs := validation.IsValidLabelValue(c.ServiceProxyName); len(msgs) > 0 {
		errs = append(errs, fmt.Errorf("--service-proxy-name %q: not a label value: %s", c.ServiceProxyName, strings.Join(msgs, "; ")))
	}
	for _, p := range c.NodePortAddresses {
		if !p.Addr().Is4() {
			errs = append(errs, fmt.Errorf("--nodeport-addresses %s: not an IPv4 CIDR (want e.g. 10.200.0.0/24)", p))
		}
	}
	switch l := &c.Listeners; {
	case l.PreserveSource && len(l.PreserveSourceFrom) == 0 && c.Manifests != "":
		errs = append(errs, errors.New("--preserve-source-ip with --manifests needs --local-pod-cidrs: the CIDRs of this node's pods, whose connections can keep their address (in a cluster they come from the Node's spec.podCIDRs)"))
	case l.PreserveSource && c.ServiceProxyName != "":
		errs = append(errs, errors.New("--preserve-source-ip with --service-proxy-name: only the default proxy of a node can keep client addresses (the reply route is one per node)"))
	}
	if ip := c.ClusterDNS; ip.IsValid() && !ip.Is4() {
		errs = append(errs, fmt.Errorf("--cluster-dns %s: only IPv4 is supported so far (want kubelet's clusterDNS, such as 10.96.0.10)", ip))
	}
	for flag, addr := range map[string]string{"--metrics-bind-address": c.MetricsBindAddress, "--healthz-bind-address": c.HealthzBindAddress} {
		if addr == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			errs = append(errs, fmt.Errorf("%s %q: want host:port, such as 127.0.0.1:10249", flag, addr))
		}
	}
	return errors.Join(errs...)
}

// bindAddressFits says whether bind mode can serve with c's bind address:
// only with none, since its listeners bind the Service addresses
// themselves. Validate asks for --mode bind, newBind when auto falls back.
func bindAddressFits(c *Config) error {
	if a := c.Listeners.BindAddress; a.IsValid() && !a.IsUnspecified() {
		return fmt.Errorf("--bind-address %s: applies to --mode redirect only (in bind mode listeners bind the Service addresses themselves)", a)
	}
	return nil
}

// dnsConfig is the DNS stub's configuration, forwarding to upstreams.
func (c *Config) dnsConfig(upstreams []string) dnsstub.Config {
	return dnsstub.Config{
		Domain:     c.ClusterDomain,
		TTL:        c.DNSTTL,
		PodRecords: c.DNSPodRecords,
		Upstreams:  upstreams,
		Registerer: c.Registry,
		Log:        c.log(),
	}
}
