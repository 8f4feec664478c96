package main

import (
	"fmt"
	"net"
	"strings"

	"github.com/miekg/dns"
	"github.com/spf13/cobra"
)

// dnsCommand is a tiny authoritative DNS server, standing in for the DNS
// server a node forwards outside names to: it answers the names it is given
// and NXDOMAIN for everything else, over UDP and TCP.
func dnsCommand() *cobra.Command {
	var listen string
	var answers []string
	cmd := &cobra.Command{
		Use:   "dns",
		Short: "Answer fixed A records over UDP and TCP (an upstream DNS server for the lab)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			table := map[string]net.IP{}
			for _, a := range answers {
				name, ip, ok := strings.Cut(a, "=")
				if !ok || net.ParseIP(ip).To4() == nil {
					return fmt.Errorf("--answer %q: want name=IPv4", a)
				}
				table[dns.Fqdn(strings.ToLower(name))] = net.ParseIP(ip).To4()
			}
			h := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
				m := new(dns.Msg).SetReply(r)
				q := r.Question[0]
				ip, ok := table[strings.ToLower(q.Name)]
				switch {
				case !ok:
					m.Rcode = dns.RcodeNameError
				case q.Qtype == dns.TypeA:
					m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: ip})
				}
				w.WriteMsg(m)
			})
			pc, ln, err := listenBoth(listen)
			if err != nil {
				return err
			}
			go (&dns.Server{Listener: ln, Handler: h}).ActivateAndServe()
			fmt.Printf("serving DNS on %s\n", listen)
			return (&dns.Server{PacketConn: pc, Handler: h}).ActivateAndServe()
		},
	}
	cmd.Flags().StringVar(&listen, "listen", "0.0.0.0:53", "address to listen on, UDP and TCP")
	cmd.Flags().StringSliceVar(&answers, "answer", nil, "name=IPv4 to answer (repeatable)")
	return cmd
}
