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
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/miekg/dns"
	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/dnsstub"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/iptables"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/portalloc"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/userspace"
)

// version is set at build time: -ldflags "-X main.version=v0.1.0".
var version = "v0.0.0-dev"

// options are the command-line flags, as given.
type options struct {
	manifests        string
	bindAddress      string
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
	mode             string
	metricsAddr      string
	healthzAddr      string
	profiling        bool
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
	clusterDNS       string
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
	o := &options{}
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
	f := cmd.Flags()
	f.StringVar(&o.configFile, "config", "", "a KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1), as kubeadm writes it; flags given on the command line win")
	f.StringVar(&o.writeConfigTo, "write-config-to", "", "write the effective settings as a KubeProxyConfiguration to this file and exit")
	f.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig of the cluster to serve (with neither this nor --master nor --manifests: the in-cluster configuration)")
	f.StringVar(&o.master, "master", "", "the API server's address, overriding the kubeconfig's")
	f.Float32Var(&o.apiQPS, "kube-api-qps", 5, "queries per second to the API server, as kube-proxy")
	f.Int32Var(&o.apiBurst, "kube-api-burst", 10, "burst of queries to the API server, as kube-proxy")
	f.StringVar(&o.apiContentType, "kube-api-content-type", "application/vnd.kubernetes.protobuf", "content type of requests to the API server (protobuf decodes large lists several times faster than JSON)")
	f.StringVar(&o.serviceProxyName, "service-proxy-name", "", "serve only the Services labelled service.kubernetes.io/service-proxy-name with this value (default: only those without the label, as kube-proxy)")
	f.DurationVar(&o.minSyncPeriod, "iptables-min-sync-period", time.Second, "the least time between two applies of cluster changes; changes closer together are applied together")
	f.DurationVar(&o.configSync, "config-sync-period", 15*time.Minute, "how often the informers resync their caches")
	f.StringVar(&o.manifests, "manifests", "", "file or directory of YAML/JSON Services, EndpointSlices and Pods to serve; re-read when it changes")
	f.StringVar(&o.bindAddress, "bind-address", "0.0.0.0", "node IPv4 address the listeners bind to; 0.0.0.0 for all (iptables then uses REDIRECT, otherwise DNAT to this address)")
	f.StringVar(&o.proxyPortRange, "proxy-port-range", "", "node ports for our listeners: begin-end, begin+offset, or empty for ports the kernel chooses")
	f.DurationVar(&o.udpTimeout, "udp-timeout", userspace.DefaultUDPTimeout, "how long an idle UDP session lives; raise it for protocols whose replies come slowly (DNS over slow upstreams, game servers)")
	f.DurationVar(&o.tcpIdleTimeout, "tcp-idle-timeout", userspace.DefaultTCPIdleTimeout, "reset a proxied TCP connection that has moved no byte either way for this long (0: never); the default is kube-proxy's conntrack timeout for established connections")
	f.IntVar(&o.tcpMaxConns, "tcp-max-connections", 0, "most proxied TCP connections at once; more are reset (0: what the open file limit leaves after a reserve, logged at start)")
	f.IntVar(&o.tcpMaxPerPort, "tcp-max-connections-per-service-port", 0, "most proxied TCP connections of one service port, so that a flood of one Service leaves room for the others (0: half of --tcp-max-connections)")
	f.IntVar(&o.udpMaxSessions, "udp-max-sessions", 0, "most UDP sessions on the node; a port over its share evicts its least recently used (0: a quarter of what the open file limit leaves, at most 16384)")
	f.IntVar(&o.udpMaxPerPort, "udp-max-sessions-per-service-port", userspace.DefaultUDPMaxSessionsPerPort, "most UDP sessions of one service port; a new client evicts the least recently used")
	f.DurationVar(&o.shutdownGrace, "shutdown-grace-period", proxy.DefaultShutdownGracePeriod, "on SIGTERM, how long established connections may go on finishing before the rest are reset; keep it below the pod's terminationGracePeriodSeconds")
	f.DurationVar(&o.syncPeriod, "iptables-sync-period", 30*time.Second, "how often everything is applied again even without a change, putting back rules someone else deleted")
	f.StringVar(&o.mode, "mode", proxy.ModeRedirect, "how Service traffic reaches the listeners: redirect (iptables REDIRECT), bind (Service IPs made local, no netfilter at all), or auto (redirect if the kernel can NAT, else bind)")
	f.BoolVar(&o.preserveSource, "preserve-source-ip", false, "endpoints see the client's own address and port, not the node's, for connections from this node's pods (--local-pod-cidrs) to a Service: dialed with IP_TRANSPARENT, replies routed back by a mangle rule and a policy route; redirect mode only; other clients are dialed from the node")
	f.StringSliceVar(&o.localPodCIDRs, "local-pod-cidrs", nil, "with --preserve-source-ip, the CIDRs of this node's pods, such as 10.244.1.0/24 (default in a cluster: the Node's spec.podCIDRs, followed as they change; required with --manifests)")
	f.StringSliceVar(&o.nodePortAddrs, "nodeport-addresses", nil, "in bind mode, CIDRs selecting the node addresses NodePorts are served on (default: all)")
	f.StringVar(&o.clusterDNS, "cluster-dns", "", "kubelet's clusterDNS IP (such as 10.96.0.10): the embedded DNS stub answers port 53 there for pods and the node; empty for no stub")
	f.StringVar(&o.clusterDomain, "cluster-domain", "cluster.local", "the cluster's DNS domain")
	f.StringSliceVar(&o.dnsUpstreams, "dns-upstream", nil, "DNS servers (IP or IP:port) for names outside the cluster domain (default: the node's /etc/resolv.conf, loopback servers skipped)")
	f.DurationVar(&o.dnsTTL, "dns-ttl", 5*time.Second, "TTL of the DNS stub's records")
	f.StringVar(&o.dnsPodRecords, "dns-pod-records", string(dnsstub.PodsInsecure), "pod records <a-b-c-d>.<namespace>.pod.<cluster-domain>, as CoreDNS's \"pods\" option: insecure (any address, kubeadm's Corefile), verified (only addresses of pods the proxy knows) or disabled")
	f.StringVar(&o.metricsAddr, "metrics-bind-address", "127.0.0.1:10249", "where /metrics and /proxyMode are served (host:port; empty for nowhere)")
	f.BoolVar(&o.profiling, "profiling", false, "serve Go's /debug/pprof on --metrics-bind-address")
	f.StringVar(&o.healthzAddr, "healthz-bind-address", "0.0.0.0:10256", "where /healthz and /livez are served (host:port; empty for nowhere)")
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

// config checks the flags and turns them into a proxy.Config. Every message
// names the flag, the value and what is allowed.
func (o *options) config(log logrus.FieldLogger) (proxy.Config, error) {
	var errs []error
	bind, err := netip.ParseAddr(o.bindAddress)
	switch {
	case err != nil:
		errs = append(errs, fmt.Errorf("--bind-address %q: not an IP address (want a node IPv4 address, or 0.0.0.0)", o.bindAddress))
	case bind.IsLoopback():
		errs = append(errs, fmt.Errorf("--bind-address %s: %w", bind, userspace.ErrLoopbackBind))
	case !bind.Is4():
		errs = append(errs, fmt.Errorf("--bind-address %s: only IPv4 is supported so far (want a node IPv4 address, or 0.0.0.0)", bind))
	}
	ports, err := portalloc.Parse(o.proxyPortRange)
	if err != nil {
		errs = append(errs, err)
	}
	if ports == nil {
		ports = portalloc.Ephemeral()
	}
	if o.udpTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--udp-timeout %s: must be greater than 0", o.udpTimeout))
	}
	if o.tcpIdleTimeout < 0 {
		errs = append(errs, fmt.Errorf("--tcp-idle-timeout %s: must be 0 (never) or more", o.tcpIdleTimeout))
	}
	if msgs := validation.IsValidLabelValue(o.serviceProxyName); len(msgs) > 0 {
		errs = append(errs, fmt.Errorf("--service-proxy-name %q: not a label value: %s", o.serviceProxyName, strings.Join(msgs, "; ")))
	}
	if o.tcpMaxPerPort < 0 {
		errs = append(errs, fmt.Errorf("--tcp-max-connections-per-service-port %d: want 0 (half of --tcp-max-connections) or more", o.tcpMaxPerPort))
	}
	if o.tcpMaxConns < 0 || o.udpMaxSessions < 0 || o.udpMaxPerPort <= 0 {
		errs = append(errs, fmt.Errorf("--tcp-max-connections %d, --udp-max-sessions %d, --udp-max-sessions-per-service-port %d: want 0 (from the open file limit) or more, and more than 0 per port", o.tcpMaxConns, o.udpMaxSessions, o.udpMaxPerPort))
	}
	if o.shutdownGrace < 0 {
		errs = append(errs, fmt.Errorf("--shutdown-grace-period %s: must be 0 (reset at once) or more", o.shutdownGrace))
	}
	if o.syncPeriod <= 0 {
		errs = append(errs, fmt.Errorf("--iptables-sync-period %s: must be greater than 0", o.syncPeriod))
	}
	var backend iptables.Backend
	switch o.iptablesBackend {
	case "auto":
	case "legacy", "nft":
		backend = iptables.Backend(o.iptablesBackend)
	default:
		errs = append(errs, fmt.Errorf("--iptables-backend %q: want legacy, nft or auto", o.iptablesBackend))
	}
	switch o.mode {
	case proxy.ModeRedirect, proxy.ModeAuto:
	case proxy.ModeBind:
		if bind.IsValid() && !bind.IsUnspecified() {
			errs = append(errs, fmt.Errorf("--bind-address %s: applies to --mode redirect only (in bind mode listeners bind the Service addresses themselves)", bind))
		}
	default:
		errs = append(errs, fmt.Errorf("--mode %q: want redirect, bind or auto", o.mode))
	}
	var nodePortAddrs []netip.Prefix
	for _, c := range o.nodePortAddrs {
		p, err := netip.ParsePrefix(c)
		if err != nil || !p.Addr().Is4() {
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
	switch {
	case o.preserveSource && len(o.localPodCIDRs) == 0 && o.manifests != "":
		errs = append(errs, errors.New("--preserve-source-ip with --manifests needs --local-pod-cidrs: the CIDRs of this node's pods, whose connections can keep their address (in a cluster they come from the Node's spec.podCIDRs)"))
	case !o.preserveSource && len(o.localPodCIDRs) > 0:
		errs = append(errs, errors.New("--local-pod-cidrs is used by --preserve-source-ip only: add that flag, or drop this one"))
	case o.preserveSource && o.serviceProxyName != "":
		errs = append(errs, errors.New("--preserve-source-ip with --service-proxy-name: only the default proxy of a node can keep client addresses (the reply route is one per node)"))
	}
	if !o.preserveSource {
		localPods = nil
	}
	var clusterDNS netip.Addr
	if o.clusterDNS != "" {
		if clusterDNS, err = netip.ParseAddr(o.clusterDNS); err != nil || !clusterDNS.Is4() {
			errs = append(errs, fmt.Errorf("--cluster-dns %q: not an IPv4 address (want kubelet's clusterDNS, such as 10.96.0.10)", o.clusterDNS))
		}
	}
	if _, ok := dns.IsDomainName(o.clusterDomain); !ok || strings.Trim(o.clusterDomain, ".") == "" {
		errs = append(errs, fmt.Errorf("--cluster-domain %q: not a domain name (want such as cluster.local)", o.clusterDomain))
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
	if _, err := dnsstub.ParsePodRecords(o.dnsPodRecords); err != nil {
		errs = append(errs, err)
	}
	if o.dnsTTL < time.Second || o.dnsTTL > time.Hour {
		errs = append(errs, fmt.Errorf("--dns-ttl %s: want 1s to 1h", o.dnsTTL))
	}
	for flag, addr := range map[string]string{"--metrics-bind-address": o.metricsAddr, "--healthz-bind-address": o.healthzAddr} {
		if addr == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			errs = append(errs, fmt.Errorf("%s %q: want host:port, such as 127.0.0.1:10249", flag, addr))
		}
	}
	if o.minSyncPeriod < 0 {
		errs = append(errs, fmt.Errorf("--iptables-min-sync-period %s: must be 0 or more", o.minSyncPeriod))
	}
	if o.configSync <= 0 {
		errs = append(errs, fmt.Errorf("--config-sync-period %s: must be greater than 0", o.configSync))
	}
	if o.apiContentType != "application/json" && o.apiContentType != "application/vnd.kubernetes.protobuf" {
		errs = append(errs, fmt.Errorf("--kube-api-content-type %q: want application/vnd.kubernetes.protobuf or application/json", o.apiContentType))
	}
	if o.apiQPS <= 0 || o.apiBurst <= 0 {
		errs = append(errs, fmt.Errorf("--kube-api-qps %v, --kube-api-burst %d: both must be greater than 0", o.apiQPS, o.apiBurst))
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
	if len(errs) > 0 {
		return proxy.Config{}, errors.Join(errs...)
	}
	// The DNS stub's own bounds: its TCP connections and the queries it
	// forwards, a socket each.
	dnsFDs := 0
	if clusterDNS.IsValid() {
		dnsFDs = 2000
	}
	budget, err := userspace.NewFDBudget(dnsFDs)
	if err != nil {
		return proxy.Config{}, err
	}
	tcpMax, udpMax := o.tcpMaxConns, o.udpMaxSessions
	if tcpMax == 0 {
		tcpMax = budget.TCPConnections
	}
	if udpMax == 0 {
		udpMax = budget.UDPSessions
	}
	if tcpMax == 0 || udpMax == 0 {
		return proxy.Config{}, fmt.Errorf("the open file limit (%d) leaves nothing for connections after a reserve of %d: raise it (ulimit -n, LimitNOFILE) or set --tcp-max-connections and --udp-max-sessions", budget.Limit, budget.Reserve)
	}
	fields := logrus.Fields{"openFileLimit": budget.Limit, "reserve": budget.Reserve, "dnsStub": budget.Other, "splicePipes": budget.Pipes, "tcpMaxConnections": tcpMax, "udpMaxSessions": udpMax}
	if !budget.Fits(tcpMax, udpMax) {
		log.WithFields(fields).Warn("File descriptor budget: these bounds can take more descriptors than the open file limit leaves; a flood could starve new listeners and API reconnects")
	} else {
		log.WithFields(fields).Info("File descriptor budget")
	}
	return proxy.Config{
		Manifests: o.manifests,
		Listeners: userspace.Config{
			BindAddress:              bind,
			Ports:                    ports,
			UDPTimeout:               o.udpTimeout,
			TCPIdleTimeout:           o.tcpIdleTimeout,
			MaxPipes:                 max(1, budget.Pipes),
			TCPMaxConnections:        tcpMax,
			TCPMaxConnectionsPerPort: o.tcpMaxPerPort,
			UDPMaxSessions:           udpMax,
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
		ClusterDNS:          clusterDNS,
		ClusterDomain:       o.clusterDomain,
		DNSUpstreams:        upstreams,
		DNSTTL:              o.dnsTTL,
		DNSPodRecords:       dnsstub.PodRecords(o.dnsPodRecords),
		Backend:             backend,
		NodePortAddresses:   nodePortAddrs,
		NodeName:            nodeName,
		SyncPeriod:          o.syncPeriod,
		Log:                 log,
	}, nil
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
