package proxy

import (
	"fmt"
	"net/netip"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/iptables"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/userspace"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// A frontend is how Service traffic reaches our listeners: the one part that
// differs between modes. Everything else (sources, snapshots, listeners,
// balancing, splicing) is shared.
type frontend interface {
	// mode is the mode's name, for logs and /proxyMode.
	mode() Mode
	// ipv6 reports whether the IPv6 halves of service ports can be
	// served.
	ipv6() bool
	// binds says where each service port's listener sockets go.
	binds(p *service.Port) []netip.AddrPort
	// dnsListen is where the DNS stub's sockets go for cluster DNS IP ip
	// (a port of 0 means one from the proxy port range).
	dnsListen(ip netip.Addr) netip.AddrPort
	// point makes the Service addresses of s, and the cluster DNS IP when
	// dns is not nil, lead to the sockets that were bound for them. It is
	// called after the sockets are open and before unwanted ones are
	// closed. It may skip writing what it wrote last time, and reports
	// whether it wrote anything.
	point(s service.Snapshot, bound map[service.Key][]netip.AddrPort, dns *dnsTarget) (bool, error)
	// rules lists our rules in the kernel now, with their counters, for
	// explain; none in bind mode.
	rules() ([]iptables.Rule, error)
	// resync forgets what point wrote, so that its next call writes
	// everything again: the periodic pass, which puts back what someone
	// else removed from the kernel.
	resync()
}

// newFrontend makes the frontend for mode. For auto, creating our nat chains
// is the probe: if the kernel or iptables cannot, bind mode is used, and one
// log line says why.
func newFrontend(cfg *Config, log logrus.FieldLogger, listeners *userspace.Listeners, restoreFailures prometheus.Counter) (frontend, error) {
	switch cfg.Mode {
	case "", ModeRedirect:
		f, err := newRedirect(cfg, log, listeners, restoreFailures)
		if err != nil {
			return nil, err
		}
		log.WithFields(logrus.Fields{"iptablesBackend": f.v4.table.Backend(), "ipv6": f.ipv6()}).Info("Mode redirect: iptables sends Service traffic to our listeners")
		return f, nil
	case ModeBind:
		f, err := newBind(cfg, log)
		if err != nil {
			return nil, err
		}
		log.WithField("device", f.device.Name()).Info("Mode bind: Service addresses are local to the node; no netfilter rules")
		dropSourcePreservation(cfg, log, listeners)
		return f, nil
	case ModeAuto:
		f, err := newRedirect(cfg, log, listeners, restoreFailures)
		if err == nil {
			err = f.v4.table.Probe() // our nat chains, their rules untouched
		}
		if err == nil {
			log.WithField("iptablesBackend", f.v4.table.Backend()).Info("Mode auto chose redirect: the kernel can NAT")
			return f, nil
		}
		b, berr := newBind(cfg, log)
		if berr != nil {
			return nil, fmt.Errorf("mode auto: redirect failed (%v) and bind failed: %w", err, berr)
		}
		log.WithError(err).WithField("device", b.device.Name()).Warn("Mode auto chose bind: the kernel cannot NAT (creating our nat chain failed)")
		dropSourcePreservation(cfg, log, listeners)
		return b, nil
	default:
		return nil, fmt.Errorf("--mode %q: want redirect, bind or auto", cfg.Mode)
	}
}

// dropSourcePreservation turns --preserve-source-ip off in bind mode, which
// has no mangle table to send the endpoints' replies back to us, and says
// so: traffic is served from the node's address, as without the flag.
func dropSourcePreservation(cfg *Config, log logrus.FieldLogger, listeners *userspace.Listeners) {
	if !cfg.Listeners.PreserveSource {
		return
	}
	listeners.DropSourcePreservation()
	log.Warn("--preserve-source-ip needs redirect mode (netfilter's mangle table and socket match); in bind mode endpoints see the node's address")
}

// localPodCIDRs says where the local pod CIDRs come from, for the log.
func localPodCIDRs(cfg *Config) string {
	if len(cfg.Listeners.PreserveSourceFrom) == 0 {
		return "the Node's spec.podCIDRs"
	}
	return fmt.Sprint(cfg.Listeners.PreserveSourceFrom)
}

// proxyToken tells one proxy's rules and addresses from another's on the
// same node: "" for the default proxy, so its names stay the plain ones.
func proxyToken(serviceProxyName string) string {
	if serviceProxyName == "" {
		return ""
	}
	return iptables.Token(serviceProxyName)
}
