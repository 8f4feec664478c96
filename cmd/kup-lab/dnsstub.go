package main

import (
	"context"
	"fmt"
	"os/signal"
	"slices"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/dnsstub"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/manifest"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/snapshot"
)

// dnsStubCommand runs the proxy's DNS stub alone on one address, answering
// from a manifest: what the DNS benchmark (hack/dnsperf.sh) measures.
func dnsStubCommand() *cobra.Command {
	var listen, manifestPath, domain string
	cmd := &cobra.Command{
		Use:   "dns-stub",
		Short: "Run the DNS stub alone, answering a manifest's Services (for benchmarks)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			objs, err := manifest.Load(manifestPath)
			if err != nil {
				return err
			}
			all := slices.Concat(objs.EndpointSlices, manifest.PodSlices(objs.Services, objs.Pods))
			snap, _ := snapshot.Build(objs.Services, all, "")
			s, err := dnsstub.NewServer(dnsstub.Config{Domain: domain})
			if err != nil {
				return err
			}
			s.SetZone(dnsstub.NewZone(domain, s.TTL(), snap))
			pc, ln, err := listenBoth(listen)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			fmt.Printf("serving DNS on %s\n", listen)
			return s.Serve(ctx, pc, ln)
		},
	}
	cmd.Flags().StringVar(&listen, "listen", "127.0.0.1:5301", "address to listen on, UDP and TCP")
	cmd.Flags().StringVar(&manifestPath, "manifest", "docs/examples/lab.yaml", "Services to answer")
	cmd.Flags().StringVar(&domain, "domain", dnsstub.DefaultDomain, "cluster domain")
	return cmd
}
