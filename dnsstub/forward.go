package dnsstub

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/miekg/dns"
)

// forward sends r to the upstream servers in turn until one answers, within
// Config.ForwardTimeout in all, and relays the answer as it is. A reply cut
// short over UDP (TC) is asked for again over TCP. When no upstream answers
// the client gets SERVFAIL, never silence.
func (s *Server) forward(r *dns.Msg) *dns.Msg {
	select {
	case s.forwards <- struct{}{}:
		defer func() { <-s.forwards }()
	default:
		// Too many queries already wait on the upstreams (a slow
		// upstream, or a flood of names outside the cluster): say so at
		// once rather than hold more goroutines and sockets.
		s.metrics.forwardsRefused.Inc()
		return new(dns.Msg).SetRcode(r, dns.RcodeServerFailure)
	}
	s.metrics.forwarded.Inc()
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.ForwardTimeout)
	defer cancel()
	for _, up := range s.cfg.Upstreams {
		reply, err := exchange(ctx, r, up)
		if err != nil {
			s.metrics.upstreamErrors.Inc()
			s.log.WithError(err).WithField("upstream", up).Debug("Upstream DNS server did not answer")
			if ctx.Err() != nil {
				break
			}
			continue
		}
		reply.Id = r.Id
		return reply
	}
	return new(dns.Msg).SetRcode(r, dns.RcodeServerFailure)
}

func exchange(ctx context.Context, r *dns.Msg, upstream string) (*dns.Msg, error) {
	c := &dns.Client{Net: "udp", UDPSize: dns.MaxMsgSize}
	q := r.Copy()
	reply, _, err := c.ExchangeContext(ctx, q, upstream)
	if err == nil && reply.Truncated {
		c = &dns.Client{Net: "tcp"}
		reply, _, err = c.ExchangeContext(ctx, q, upstream)
	}
	if err != nil {
		return nil, err
	}
	if len(reply.Question) != 1 || !strings.EqualFold(reply.Question[0].Name, r.Question[0].Name) {
		return nil, fmt.Errorf("upstream %s answered another question", upstream)
	}
	return reply, nil
}

// Upstreams reads the nameservers of a resolv.conf file as host:port,
// leaving out loopback addresses: a local stub resolver such as
// systemd-resolved's 127.0.0.53 would send cluster names back to us, a loop
// (CoreDNS has its loop plugin for this).
func Upstreams(resolvConf string) ([]string, error) {
	f, err := os.Open(resolvConf)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var ups []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		ip, err := netip.ParseAddr(fields[1])
		if err != nil || ip.IsLoopback() {
			continue
		}
		ups = append(ups, net.JoinHostPort(ip.String(), "53"))
	}
	return ups, sc.Err()
}

// ParseUpstream reads an --dns-upstream value: an IP, or IP:port.
func ParseUpstream(s string) (string, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.String(), nil
	}
	if ip, err := netip.ParseAddr(s); err == nil {
		return net.JoinHostPort(ip.String(), "53"), nil
	}
	return "", fmt.Errorf("--dns-upstream %q: want an IP address or IP:port", s)
}
