// Command kube-userspace-proxy makes Kubernetes Services work on a node from
// user space: it listens on a port of its own for every service port, has
// iptables redirect each Service address there, and carries the traffic to
// the Service's pods.
//
//	kube-userspace-proxy --manifests lab.yaml    serve the Services of a manifest
//	kube-userspace-proxy --cleanup               remove our iptables rules and exit
//
// Exit codes: 0 after --version, --help, a clean --cleanup, or a stop by
// SIGTERM or SIGINT; 1 on any error (a bad flag, a manifest that does not
// load, a failed cleanup).
package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/dnsstub"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/iptables"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/portalloc"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/userspace"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/watch"
)

// version is set at build time: -ldflags "-X main.version=v0.1.0".
var version = "v0.0.0-dev"

// options are the command-line flags, as given.
type options struct {
	manifests        string
	bindAddress      netip.Addr
	proxyPortRange   string
	udpTimeout       time.Duration
	tcpIdleTimeout   time.Duration
	tcpMaxConns      int
	tcpMaxPerPort    int
	udpMaxSessions   int
	udpMaxPerPort    int
	shutdownGrace    time.Duration
	syncPeriod       time.Duration
	iptablesBackend  string
	mode             proxy.Mode
	metricsAddr      string
	healthzAddr      string
	profiling        bool
	handoffSocket    string
	readyFile        string
	configFile       string
	kubeconfig       string
	master           string
	apiQPS           float32
	apiBurst         int32
	apiContentType   string
	serviceProxyName string
	minSyncPeriod    time.Duration
	configSync       time.Duration
	writeConfigTo    string
	clusterDNS       netip.Addr
	clusterDomain    string
	dnsUpstreams     []string
	dnsTTL           time.Duration
	dnsPodRecords    string
	nodePortAddrs    []string
	preserveSource   bool
	localPodCIDRs    []string
	hostnameOverride string
	cleanup          bool
	logFormat        string
	verbosity        int
	showVersion      bool
}

func main() {
	if err := newCommand().Execute(); err != nil {
		os.Exit(1)
	}
}

func newCommand() *cobra.Command {
	o := &options{mode: proxy.ModeRedirect, bindAddress: netip.IPv4Unspecified()}
	cmd := &cobra.Command{
		Use:   "kube-userspace-proxy",
		Short: "A userspace Service proxy for Kubernetes nodes",
		Long: `kube-userspace-proxy makes Kubernetes Services work on a node from user space.
For every service port it opens a listener on the node, has iptables redirect
the Service's ClusterIP (and NodePort, external and load-balancer IPs) there,
and carries each connection to one of the Service's pods, round robin.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return fmt.Errorf("%q does not take any arguments, got %q", cmd.CommandPath(), args)
			}
			return nil
		},
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cmd.SilenceUsage = true // from here on, errors are not about usage
			err := o.run(cmd)
			if err != nil {
				fmt.Fprintf(os.Stderr, "Error: %v\n", err)
			}
			return err
		},
	}
	cmd.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		fmt.Fprintf(os.Stderr, "Error: %v\nRun '%s --help' for the flags.\n", err, c.CommandPath())
		return err
	})
	cmd.AddCommand(explainCommand())
	f := cmd.Flags()
	f.StringVar(&o.configFile, "config", "", "a KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1), as kubeadm writes it; flags given on the command line win")
	f.StringVar(&o.writeConfigTo, "write-config-to", "", "write the effective settings as a KubeProxyConfiguration to this file and exit")
	f.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig of the cluster to serve (with neither this nor --master nor --manifests: the in-cluster configuration)")
	f.StringVar(&o.master, "master", "", "the API server's address, overriding the kubeconfig's")
	f.Float32Var(&o.apiQPS, "kube-api-qps", 5, "queries per second to the API server, as kube-proxy")
	f.Int32Var(&o.apiBurst, "kube-api-burst", 10, "burst of queries to the API server, as kube-proxy")
	f.StringVar(&o.apiContentType, "kube-api-content-type", "application/vnd.kubernetes.protobuf", "content type of requests to the API server (protobuf decodes large lists several times faster than JSON)")
	f.StringVar(&o.serviceProxyName, "service-proxy-name", "", "serve only the Services labelled service.kubernetes.io/service-proxy-name with this value (default: only those without the label, as kube-proxy)")
	f.DurationVar(&o.minSyncPeriod, "iptables-min-sync-period", watch.DefaultMinSyncPeriod, "the least time between two applies of cluster changes; changes closer together are applied together")
	f.DurationVar(&o.configSync, "config-sync-period", watch.DefaultResyncPeriod, "how often the informers resync their caches")
	f.StringVar(&o.manifests, "manifests", "", "file or directory of YAML/JSON Services, EndpointSlices and Pods to serve; re-read when it changes")
	f.TextVar(&o.bindAddress, "bind-address", o.bindAddress, "node IPv4 address the listeners bind to; 0.0.0.0 for all (iptables then uses REDIRECT, otherwise DNAT to this address)")
	f.StringVar(&o.proxyPortRange, "proxy-port-range", "", "our listener ports (private plumbing, not NodePorts): begin-end, begin+offset, or empty for ports the kernel chooses")
	f.DurationVar(&o.udpTimeout, "udp-timeout", userspace.DefaultUDPTimeout, "how long an idle UDP session lives; raise it for protocols whose replies come slowly (DNS over slow upstreams, game servers)")
	f.DurationVar(&o.tcpIdleTimeout, "tcp-idle-timeout", userspace.DefaultTCPIdleTimeout, "reset a proxied TCP connection that has moved no byte either way for this long (0: never); the default is kube-proxy's conntrack timeout for established connections")
	f.IntVar(&o.tcpMaxConns, "tcp-max-connections", 0, "most proxied TCP connections at once; more are reset (0: what the open file limit leaves after a reserve, logged at start)")
	f.IntVar(&o.tcpMaxPerPort, "tcp-max-connections-per-service-port", 0, "most proxied TCP connections of one service port, so that a flood of one Service leaves room for the others (0: half of --tcp-max-connections)")
	f.IntVar(&o.udpMaxSessions, "udp-max-sessions", 0, "most UDP sessions on the node; a port over its share evicts its least recently used (0: a quarter of what the open file limit leaves, at most 16384)")
	f.IntVar(&o.udpMaxPerPort, "udp-max-sessions-per-service-port", userspace.DefaultUDPMaxSessionsPerPort, "most UDP sessions of one service port; a new client evicts the least recently used")
	f.DurationVar(&o.shutdownGrace, "shutdown-grace-period", proxy.DefaultShutdownGracePeriod, "on SIGTERM, how long established connections may go on finishing before the rest are reset; keep it below the pod's terminationGracePeriodSeconds")
	f.DurationVar(&o.syncPeriod, "iptables-sync-period", proxy.DefaultSyncPeriod, "how often everything is applied again even without a change, putting back rules someone else deleted")
	f.TextVar(&o.mode, "mode", o.mode, "how Service traffic reaches the listeners: redirect (iptables REDIRECT), bind (Service IPs made local, no netfilter at all), or auto (redirect if the kernel can NAT, else bind)")
	f.BoolVar(&o.preserveSource, "preserve-source-ip", false, "endpoints see the client's own address and port, not the node's, for connections from this node's pods (--local-pod-cidrs) to a Service: dialed with IP_TRANSPARENT, replies routed back by a mangle rule and a policy route; redirect mode only; other clients are dialed from the node")
	f.StringSliceVar(&o.localPodCIDRs, "local-pod-cidrs", nil, "with --preserve-source-ip, the CIDRs of this node's pods, such as 10.244.1.0/24 (default in a cluster: the Node's spec.podCIDRs, followed as they change; required with --manifests)")
	f.StringSliceVar(&o.nodePortAddrs, "nodeport-addresses", nil, "in bind mode, CIDRs selecting the node addresses NodePorts are served on (default: all)")
	f.TextVar(&o.clusterDNS, "cluster-dns", o.clusterDNS, "kubelet's clusterDNS IP (such as 10.96.0.10): the embedded DNS stub answers port 53 there for pods and the node; empty for no stub")
	f.StringVar(&o.clusterDomain, "cluster-domain", dnsstub.DefaultDomain, "the cluster's DNS domain")
	f.StringSliceVar(&o.dnsUpstreams, "dns-upstream", nil, "DNS servers (IP or IP:port) for names outside the cluster domain (default: the node's /etc/resolv.conf, loopback servers skipped)")
	f.DurationVar(&o.dnsTTL, "dns-ttl", dnsstub.DefaultTTL, "TTL of the DNS stub's records")
	f.StringVar(&o.dnsPodRecords, "dns-pod-records", string(dnsstub.PodsInsecure), "pod records <a-b-c-d>.<namespace>.pod.<cluster-domain>, as CoreDNS's \"pods\" option: insecure (any address, kubeadm's Corefile), verified (only addresses of pods the proxy knows) or disabled")
	f.StringVar(&o.metricsAddr, "metrics-bind-address", "127.0.0.1:10249", "where /metrics and /proxyMode are served (host:port; empty for nowhere)")
	f.BoolVar(&o.profiling, "profiling", false, "serve Go's /debug/pprof on --metrics-bind-address")
	f.StringVar(&o.healthzAddr, "healthz-bind-address", "0.0.0.0:10256", "where /healthz, /livez and /readyz are served (host:port; empty for nowhere)")
	f.StringVar(&o.readyFile, "ready-file", "", "a file created once the first sync is applied and removed when stopping, for an exec readiness probe (test -e FILE): during an upgrade the old and new proxy share the health port, so an HTTP probe cannot tell which answered; empty for none")
	f.StringVar(&o.handoffSocket, "handoff-socket", "", "unix socket path (such as /run/kube-userspace-proxy/handoff.sock) where a restarting proxy takes this one's listening sockets over, so that an upgrade refuses and cuts no connection; empty for no hand-over")
	f.StringVar(&o.iptablesBackend, "iptables-backend", "auto", "iptables backend: legacy, nft, or auto (the one the node already uses)")
	f.StringVar(&o.hostnameOverride, "hostname-override", "", "this node's name, for internalTrafficPolicy Local; default the lower-cased hostname")
	f.BoolVar(&o.cleanup, "cleanup", false, "remove our iptables chains and rules from every backend, then exit")
	f.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	f.IntVarP(&o.verbosity, "v", "v", 0, "log verbosity: 0-2 info, 3-4 debug, 5 and up trace")
	f.BoolVar(&o.showVersion, "version", false, "print the version and exit")
	return cmd
}

func (o *options) run(cmd *cobra.Command) error {
	if o.showVersion {
		fmt.Fprintf(cmd.OutOrStdout(), "kube-userspace-proxy %s\n", version)
		return nil
	}
	log, err := o.logger()
	if err != nil {
		return err
	}
	routeKlog(log, o.verbosity)
	if o.configFile != "" {
		if err := o.loadConfig(o.configFile, cmd.Flags(), log); err != nil {
			return err
		}
	}
	if o.cleanup {
		if err := proxy.Cleanup(log, o.serviceProxyName); err != nil {
			return fmt.Errorf("encountered an error while tearing down rules: %w", err)
		}
		return nil
	}
	cfg, err := o.config(log)
	if err != nil && o.configFile != "" {
		return fmt.Errorf("%w\n(flags not given take their values from --config %s: its fields for these flags may be at fault)", err, o.configFile)
	}
	if err != nil {
		return err
	}
	if o.writeConfigTo != "" {
		if err := o.writeConfig(o.writeConfigTo); err != nil {
			return fmt.Errorf("--write-config-to: %w", err)
		}
		return nil
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	return proxy.Run(ctx, cfg)
}

// config turns the flags into a proxy.Config and validates it
// (proxy.Config.Validate holds the rules). What is parsed here is only what
// a flag's type cannot parse itself; every message names the flag, the
// value and what is allowed, and every bad flag is reported at once.
func (o *options) config(log logrus.FieldLogger) (proxy.Config, error) {
	var errs []error
	ports, err := portalloc.Parse(o.proxyPortRange)
	if err != nil {
		errs = append(errs, err)
	}
	if ports == nil {
		ports = portalloc.Ephemeral()
	}
	var backend iptables.Backend
	if o.iptablesBackend != "auto" {
		backend = iptables.Backend(o.iptablesBackend)
	}
	var nodePortAddrs []netip.Prefix
	for _, c := range o.nodePortAddrs {
		p, err := netip.ParsePrefix(c)
		if err != nil {
			errs = append(errs, fmt.Errorf("--nodeport-addresses %q: not an IPv4 CIDR (want e.g. 10.200.0.0/24)", c))
			continue
		}
		nodePortAddrs = append(nodePortAddrs, p.Masked())
	}
	var localPods []netip.Prefix
	for _, c := range o.localPodCIDRs {
		p, err := netip.ParsePrefix(c)
		if err != nil {
			errs = append(errs, fmt.Errorf("--local-pod-cidrs %q: not a CIDR (want this node's pod CIDR, such as 10.244.1.0/24)", c))
			continue
		}
		localPods = append(localPods, p.Masked())
	}
	var upstreams []string
	for _, u := range o.dnsUpstreams {
		up, err := dnsstub.ParseUpstream(u)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		upstreams = append(upstreams, up)
	}
	if o.apiContentType != "application/json" && o.apiContentType != "application/vnd.kubernetes.protobuf" {
		errs = append(errs, fmt.Errorf("--kube-api-content-type %q: want application/vnd.kubernetes.protobuf or application/json", o.apiContentType))
	}
	if o.apiQPS <= 0 || o.apiBurst <= 0 {
		errs = append(errs, fmt.Errorf("--kube-api-qps %v, --kube-api-burst %d: both must be greater than 0", o.apiQPS, o.apiBurst))
	}
	// Zero means "the default" in proxy.Config; on these flags it is a
	// mistake, not a way to ask for the default.
	for flag, d := range map[string]time.Duration{"--udp-timeout": o.udpTimeout, "--iptables-sync-period": o.syncPeriod, "--config-sync-period": o.configSync, "--dns-ttl": o.dnsTTL} {
		if d == 0 {
			errs = append(errs, fmt.Errorf("%s 0s: must be greater than 0", flag))
		}
	}
	if o.udpMaxPerPort == 0 {
		errs = append(errs, errors.New("--udp-max-sessions-per-service-port 0: must be greater than 0"))
	}
	var client kubernetes.Interface
	if o.manifests == "" && o.writeConfigTo == "" {
		c, err := o.kubeClient()
		if err != nil {
			errs = append(errs, err)
		}
		client = c
	}
	nodeName := o.hostnameOverride
	if nodeName == "" {
		h, err := os.Hostname()
		if err != nil {
			errs = append(errs, fmt.Errorf("find the node name: %w (set --hostname-override)", err))
		}
		nodeName = strings.ToLower(h)
	}
	cfg := proxy.Config{
		Manifests: o.manifests,
		Listeners: userspace.Config{
			BindAddress:              o.bindAddress,
			Ports:                    ports,
			UDPTimeout:               o.udpTimeout,
			TCPIdleTimeout:           o.tcpIdleTimeout,
			TCPMaxConnections:        o.tcpMaxConns,
			TCPMaxConnectionsPerPort: o.tcpMaxPerPort,
			UDPMaxSessions:           o.udpMaxSessions,
			UDPMaxSessionsPerPort:    o.udpMaxPerPort,
			PreserveSource:           o.preserveSource,
			PreserveSourceFrom:       localPods,
			Log:                      log,
		},
		ShutdownGracePeriod: o.shutdownGrace,
		Kubernetes:          client,
		ServiceProxyName:    o.serviceProxyName,
		MinSyncPeriod:       o.minSyncPeriod,
		ConfigSyncPeriod:    o.configSync,
		Mode:                o.mode,
		MetricsBindAddress:  o.metricsAddr,
		HealthzBindAddress:  o.healthzAddr,
		Profiling:           o.profiling,
		HandoffSocket:       o.handoffSocket,
		ReadyFile:           o.readyFile,
		ClusterDNS:          o.clusterDNS,
		ClusterDomain:       o.clusterDomain,
		DNSUpstreams:        upstreams,
		DNSTTL:              o.dnsTTL,
		DNSPodRecords:       dnsstub.PodRecords(o.dnsPodRecords),
		Backend:             backend,
		NodePortAddresses:   nodePortAddrs,
		NodeName:            nodeName,
		SyncPeriod:          o.syncPeriod,
		Log:                 log,
	}
	if err := cfg.Validate(); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return proxy.Config{}, errors.Join(errs...)
	}
	// The bounds a peer can fill: what the open file limit leaves, unless
	// given. The DNS stub's own bounds (its TCP connections and the
	// queries it forwards, a socket each) come off the top.
	dnsFDs := 0
	if o.clusterDNS.IsValid() {
		dnsFDs = 2000
	}
	budget, err := userspace.NewFDBudget(dnsFDs)
	if err != nil {
		return proxy.Config{}, err
	}
	l := &cfg.Listeners
	l.TCPMaxConnections = cmp.Or(l.TCPMaxConnections, budget.TCPConnections)
	l.UDPMaxSessions = cmp.Or(l.UDPMaxSessions, budget.UDPSessions)
	l.MaxPipes = max(1, budget.Pipes)
	if l.TCPMaxConnections == 0 || l.UDPMaxSessions == 0 {
		return proxy.Config{}, fmt.Errorf("the open file limit (%d) leaves nothing for connections after a reserve of %d: raise it (ulimit -n, LimitNOFILE) or set --tcp-max-connections and --udp-max-sessions", budget.Limit, budget.Reserve)
	}
	fields := logrus.Fields{"openFileLimit": budget.Limit, "reserve": budget.Reserve, "dnsStub": budget.Other, "splicePipes": budget.Pipes, "tcpMaxConnections": l.TCPMaxConnections, "udpMaxSessions": l.UDPMaxSessions}
	if !budget.Fits(l.TCPMaxConnections, l.UDPMaxSessions) {
		log.WithFields(fields).Warn("File descriptor budget: these bounds can take more descriptors than the open file limit leaves; a flood could starve new listeners and API reconnects")
	} else {
		log.WithFields(fields).Info("File descriptor budget")
	}
	return cfg, nil
}

// kubeClient connects to the cluster named by --kubeconfig and --master, or,
// with neither, to the one the proxy runs in (its ServiceAccount).
func (o *options) kubeClient() (kubernetes.Interface, error) {
	var rc *rest.Config
	var err error
	if o.kubeconfig == "" && o.master == "" {
		if rc, err = rest.InClusterConfig(); err != nil {
			return nil, fmt.Errorf("no source of Services: give --manifests PATH, or --kubeconfig/--master, or run in a cluster (%v)", err)
		}
	} else if rc, err = clientcmd.BuildConfigFromFlags(o.master, o.kubeconfig); err != nil {
		return nil, fmt.Errorf("--kubeconfig %q --master %q: %w", o.kubeconfig, o.master, err)
	}
	rc.UserAgent = "kube-userspace-proxy/" + version
	rc.QPS, rc.Burst, rc.ContentType = o.apiQPS, int(o.apiBurst), o.apiContentType
	c, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("API client: %w", err)
	}
	return c, nil
}
