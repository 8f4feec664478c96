// Package proxy puts the parts together: a source of Services (a manifest,
// package manifest, or the API server, package watch), the listeners that
// carry their traffic (package userspace), the frontend that leads Service
// addresses to those listeners (iptables rules in redirect mode, local
// addresses in bind mode), and the DNS stub. It owns the one loop that
// applies each new Snapshot, and the order in which a change is applied:
//
//	open before you point: new listeners are opened before any rule sends
//	traffic to them;
//	name once it works: the DNS stub gets the new names only after the
//	addresses they give lead somewhere;
//	unpoint before you close: a listener is closed only after the rules no
//	longer send traffic to it.
//
// It also serves /healthz, /livez, /metrics and /explain. docs/architecture.md
// draws the whole picture.
package proxy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/sirupsen/logrus"
	"golang.org/x/sync/errgroup"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/dnsstub"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/iptables"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/localaddr"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/manifest"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/snapshot"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/userspace"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/watch"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/replyroute"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// Config is everything Run needs. Zero fields take the defaults their
// comments give.
type Config struct {
	// Manifests is the file or directory of Services, EndpointSlices and
	// Pods to serve (--manifests). When empty, Kubernetes is watched.
	Manifests string
	// Kubernetes is the API server's client, when the source is a cluster.
	Kubernetes kubernetes.Interface
	// ServiceProxyName selects the Services labelled
	// service.kubernetes.io/service-proxy-name with it; empty selects those
	// without the label (--service-proxy-name).
	ServiceProxyName string
	// MinSyncPeriod is the least time between two applies of cluster
	// changes (--iptables-min-sync-period). Zero means
	// watch.DefaultMinSyncPeriod.
	MinSyncPeriod time.Duration
	// ConfigSyncPeriod is the informers' resync (--config-sync-period).
	// Zero means watch.DefaultResyncPeriod.
	ConfigSyncPeriod time.Duration
	// Listeners configures the listeners: bind address, port range,
	// timeouts.
	Listeners userspace.Config
	// Mode is how Service traffic reaches the listeners: ModeRedirect (the
	// default when empty), ModeBind or ModeAuto (--mode).
	Mode Mode
	// Backend is the iptables backend to write to in redirect mode; empty
	// means detect it.
	Backend iptables.Backend
	// NodePortAddresses selects the node addresses NodePorts are served on
	// in bind mode (--nodeport-addresses); empty means all.
	NodePortAddresses []netip.Prefix
	// NodeName is this node's name, for internalTrafficPolicy Local.
	NodeName string
	// SyncPeriod is how often everything is applied again even without a
	// change, which puts back rules that someone else deleted and forgets
	// stale affinity pins (--iptables-sync-period). Zero means
	// DefaultSyncPeriod.
	SyncPeriod time.Duration
	// ClusterDNS is the cluster DNS IP (kubelet's clusterDNS, --cluster-dns):
	// when set, the embedded DNS stub answers port 53 there, UDP and TCP,
	// for pods and for the node. Unset means no DNS stub.
	ClusterDNS netip.Addr
	// ClusterDomain is the DNS domain of the cluster (--cluster-domain).
	// Empty means dnsstub.DefaultDomain.
	ClusterDomain string
	// DNSUpstreams are the servers other names are forwarded to, host:port
	// (--dns-upstream). Empty means the node's /etc/resolv.conf.
	DNSUpstreams []string
	// DNSTTL is the TTL of the stub's records (--dns-ttl). Zero means
	// dnsstub.DefaultTTL.
	DNSTTL time.Duration
	// DNSPodRecords is how the stub answers pod records
	// (--dns-pod-records). Empty means insecure, as kubeadm's CoreDNS.
	DNSPodRecords dnsstub.PodRecords
	// Registry collects the proxy's metrics, served on /metrics. Nil means
	// a new one.
	Registry *prometheus.Registry
	// HealthzBindAddress is where /healthz and /livez are served
	// (--healthz-bind-address, kube-proxy's 0.0.0.0:10256); empty means
	// nowhere.
	HealthzBindAddress string
	// MetricsBindAddress is where /proxyMode is served
	// (--metrics-bind-address, kube-proxy's 127.0.0.1:10249); empty means
	// nowhere.
	MetricsBindAddress string
	// ShutdownGracePeriod is how long established connections may go on
	// after ctx is done, before the rest are reset
	// (--shutdown-grace-period). Zero resets them at once.
	ShutdownGracePeriod time.Duration
	// Profiling serves Go's /debug/pprof next to /metrics (--profiling).
	Profiling bool
	// ReadyFile is a path created once the first sync is applied and
	// removed when the proxy starts stopping (--ready-file): for an exec
	// readiness probe that asks this very process. An HTTP probe cannot:
	// during an upgrade the old and the new proxy share the health port.
	// Empty means none.
	ReadyFile string
	// HandoffSocket is the unix socket path (--handoff-socket) where a
	// new proxy takes this one's listening sockets over, and where this
	// one first takes them from a proxy still running (carry.go). Empty
	// means no hand-over.
	HandoffSocket string
	// Log is where the proxy logs. Nil means logrus' standard logger.
	Log logrus.FieldLogger
}

// DefaultShutdownGracePeriod is --shutdown-grace-period's default: below
// the 30s a pod gets between SIGTERM and SIGKILL by default
// (terminationGracePeriodSeconds).
const DefaultShutdownGracePeriod = 10 * time.Second

func (c *Config) syncPeriod() time.Duration {
	return cmp.Or(c.SyncPeriod, DefaultSyncPeriod)
}

func (c *Config) log() logrus.FieldLogger {
	if c.Log != nil {
		return c.Log
	}
	return logrus.StandardLogger()
}

// Run serves the Services of cfg.Manifests until ctx is done. It returns an
// error only for what stops the proxy from starting: a bad flag value, a
// manifest that does not load, no iptables. Later failures are logged and
// retried on the next change or sync.
func Run(ctx context.Context, cfg Config) error {
	log := cfg.log()
	if cfg.Manifests == "" && cfg.Kubernetes == nil {
		return errors.New("no source of Services: give --manifests PATH, or a cluster (--kubeconfig, --master, or in-cluster)")
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	if cfg.Registry == nil {
		// kube-proxy's own go_* and process_* metrics too: goroutines,
		// memory, open file descriptors against their limit.
		cfg.Registry = prometheus.NewRegistry()
		cfg.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	stub, err := newDNS(&cfg)
	if err != nil {
		return err
	}
	if cfg.Listeners.Metrics == nil {
		if cfg.Listeners.Metrics, err = userspace.NewMetrics(cfg.Registry); err != nil {
			return err
		}
	}
	hm, err := newHealthMetrics(cfg.Registry)
	if err != nil {
		return err
	}
	hl := &health{timeout: 2 * cfg.syncPeriod(), now: time.Now}
	// Before anything is opened: the sockets of the proxy before this
	// one (carry.go).
	carry := newCarrier(log, cfg.HandoffSocket)
	defer carry.close()
	listeners, err := userspace.New(cfg.Listeners)
	if err != nil {
		return err
	}
	defer listeners.Close()
	front, err := newFrontend(&cfg, log, listeners, hm.restoreFailures)
	if err != nil {
		return err
	}
	if rf, ok := front.(*redirectFrontend); ok && !carry.took {
		// Nothing handed over: after a crash, the rules still point at
		// the ports of the listeners before.
		carry.adopt(rf.reopenFromRules())
	}
	listeners.Adopt(carry.services())
	var healthLn, statusLn net.Listener
	if cfg.HealthzBindAddress != "" {
		if healthLn, err = carry.listen("healthz", cfg.HealthzBindAddress); err != nil && !errors.Is(err, syscall.EADDRINUSE) {
			return fmt.Errorf("--healthz-bind-address %s: %w", cfg.HealthzBindAddress, err)
		}
	}
	if cfg.MetricsBindAddress != "" {
		if statusLn, err = carry.listen("metrics", cfg.MetricsBindAddress); err != nil && !errors.Is(err, syscall.EADDRINUSE) {
			if healthLn != nil {
				healthLn.Close()
			}
			return fmt.Errorf("--metrics-bind-address %s: %w", cfg.MetricsBindAddress, err)
		}
	}
	var dns *dnsTarget
	var dnsPC net.PacketConn
	var dnsLn net.Listener
	if stub != nil {
		if dnsPC, dnsLn, err = openDNS(&cfg, front.dnsListen(cfg.ClusterDNS), carry); err != nil {
			return err
		}
		dns = &dnsTarget{ip: cfg.ClusterDNS, listen: dnsPC.LocalAddr().(*net.UDPAddr).AddrPort()}
		log.WithFields(logrus.Fields{"clusterDNS": cfg.ClusterDNS, "domain": stub.Domain(), "listen": dns.listen.String()}).Info("DNS stub answers the cluster domain")
	}
	log.WithFields(logrus.Fields{
		"mode":           front.mode(),
		"bindAddress":    bindString(cfg.Listeners.BindAddress),
		"proxyPortRange": cfg.Listeners.Ports.String(),
		"source":         sourceName(&cfg),
	}).Info("Starting kube-userspace-proxy")

	ex := &explainer{listeners: listeners, front: front}
	firstApply := make(chan struct{})
	p := &proxier{log: log, listeners: listeners, front: front, dns: dns, health: hl, stats: &syncStats{metrics: hm}, published: &ex.state,
		retired: carry.retired, firstApply: firstApply}
	if stub != nil {
		p.names = func(s service.Snapshot) { stub.SetZone(dnsstub.NewZone(stub.Domain(), stub.TTL(), s)) }
		ex.domain = stub.Domain()
	}
	snaps := make(chan change, 1)
	g, ctx := errgroup.WithContext(ctx)
	// Both sources end in the same place: Services and EndpointSlices,
	// turned into one snapshot and offered to the apply loop.
	publish := func(u watch.Update) {
		hl.queued()
		hm.lastQueued.SetToCurrentTime()
		offer(snaps, change{snap: p.build(u, cfg.NodeName), triggers: u.Triggers,
			serviceChanges: u.ServiceChanges, endpointChanges: u.EndpointSliceChanges})
	}
	g.Go(func() error {
		if cfg.Manifests == "" {
			watch.Run(ctx, watch.Config{
				Client:           cfg.Kubernetes,
				ServiceProxyName: cfg.ServiceProxyName,
				Headless:         stub != nil,
				ResyncPeriod:     cfg.ConfigSyncPeriod,
				MinSyncPeriod:    cfg.MinSyncPeriod,
				NodeName:         cfg.NodeName,
				NodeEligible:     hl.setNodeEligible,
				NodePodCIDRs:     nodePodCIDRs(&cfg, log, listeners),
				Changed:          hm.changed,
				Log:              log,
			}, publish)
			return nil
		}
		w := &manifest.Watcher{Path: cfg.Manifests, Log: log}
		selector := watch.ServiceSelector(cfg.ServiceProxyName)
		err := w.Run(ctx, func(objs *manifest.Objects) {
			// Only the Services this proxy serves, as the cluster source
			// asks the API server for; Pods become EndpointSlices as a
			// cluster's controller would make them.
			services := slices.DeleteFunc(slices.Clone(objs.Services), func(s *v1.Service) bool {
				return !selector.Matches(labels.Set(s.Labels))
			})
			publish(watch.Update{
				Services:       services,
				EndpointSlices: slices.Concat(objs.EndpointSlices, manifest.PodSlices(services, objs.Pods)),
				Pods:           objs.Pods,
			})
		})
		if err != nil {
			return fmt.Errorf("manifest %s: %w", cfg.Manifests, err)
		}
		return nil
	})
	g.Go(func() error {
		p.loop(ctx, snaps, cfg.syncPeriod())
		return nil
	})
	if stub != nil {
		g.Go(func() error {
			if !carry.waitServing(ctx, firstApply) {
				return nil
			}
			return stub.Serve(ctx, dnsPC, dnsLn)
		})
	}
	// Once a new proxy took the sockets over, it answers the probes.
	httpCtx, stopHTTP := carry.untilRetired(ctx)
	defer stopHTTP()
	if cfg.HealthzBindAddress != "" {
		g.Go(func() error {
			ln := carry.listenWhenFree(httpCtx, healthLn, "healthz", cfg.HealthzBindAddress, "--healthz-bind-address")
			if ln == nil || !carry.waitServing(httpCtx, firstApply) {
				return nil
			}
			return serveHealth(httpCtx, ln, hl, hm, log)
		})
	}
	if cfg.MetricsBindAddress != "" {
		g.Go(func() error {
			ln := carry.listenWhenFree(httpCtx, statusLn, "metrics", cfg.MetricsBindAddress, "--metrics-bind-address")
			if ln == nil || !carry.waitServing(httpCtx, firstApply) {
				return nil
			}
			return serveStatus(httpCtx, ln, front.mode(), cfg.Registry, cfg.Profiling, ex, log)
		})
	}
	g.Go(func() error { return carry.serve(ctx, listeners, firstApply) })
	if cfg.ReadyFile != "" {
		g.Go(func() error {
			select {
			case <-firstApply:
			case <-ctx.Done():
				return nil
			}
			if err := os.WriteFile(cfg.ReadyFile, []byte("ready\n"), 0o644); err != nil {
				log.WithError(err).Error("Could not write --ready-file: the readiness probe will fail")
			}
			return nil
		})
	}
	err = g.Wait()
	if cfg.ReadyFile != "" {
		os.Remove(cfg.ReadyFile) // not ready from the first moment of stopping
	}
	// Stopping: the listeners close, so the kernel refuses new
	// connections; the established ones get the grace period to finish.
	if n := listeners.StopAccepting(); n > 0 {
		log.WithFields(logrus.Fields{"connections": n, "gracePeriod": cfg.ShutdownGracePeriod}).Info("Stopping: letting established connections finish")
	}
	if n := listeners.Shutdown(cfg.ShutdownGracePeriod); n > 0 {
		log.WithField("connections", n).Warn("Grace period over: reset the connections still open")
	}
	log.Info("Stopped; rules and addresses stay in place until the next start or --cleanup")
	return err
}

// nodePodCIDRs follows the Node's pod CIDRs for --preserve-source-ip when
// no --local-pod-cidrs were given: nil (not watched) otherwise.
func nodePodCIDRs(cfg *Config, log logrus.FieldLogger, listeners *userspace.Listeners) func([]netip.Prefix) {
	if !cfg.Listeners.PreserveSource || len(cfg.Listeners.PreserveSourceFrom) > 0 {
		return nil
	}
	var last []netip.Prefix
	seen := false
	return func(cidrs []netip.Prefix) {
		if seen && slices.Equal(cidrs, last) {
			return
		}
		seen, last = true, slices.Clone(cidrs)
		listeners.SetLocalPodCIDRs(cidrs)
		log.WithField("podCIDRs", cidrs).Info("This node's pod CIDRs (from its Node): their clients keep their address")
	}
}

// change is what the apply loop is offered: the new desired state, and when
// the changes that led to it happened, for the network programming
// latency.
type change struct {
	snap     service.Snapshot
	triggers []time.Time
	// The object changes it applies, for the *_changes_pending metrics.
	serviceChanges, endpointChanges int
}

// offer hands c to the apply loop, replacing a change the loop has not
// taken yet: only the newest state matters, but the trigger times of both
// are kept. There is one sender.
func offer(ch chan change, c change) {
	select {
	case old := <-ch:
		c.triggers = addTriggers(old.triggers, c.triggers)
		c.serviceChanges += old.serviceChanges
		c.endpointChanges += old.endpointChanges
	default:
	}
	ch <- c
}

// maxTriggers bounds the trigger times kept for changes not applied yet:
// while syncs keep failing, changes keep coming, and each brings its times.
const maxTriggers = 1000

// addTriggers appends more to ts, keeping at most maxTriggers. The oldest
// are kept: they are the ones the network programming latency is about.
func addTriggers(ts, more []time.Time) []time.Time {
	room := maxTriggers - len(ts)
	if room <= 0 {
		return ts
	}
	return append(ts, more[:min(room, len(more))]...)
}

// Cleanup removes what any mode of the proxy called serviceProxyName added
// to the node (--cleanup): its rules and chains from every iptables backend
// the node has, so that a node is clean whichever backend it last used, and
// its Service addresses. Another proxy's (another --service-proxy-name) are
// left alone.
func Cleanup(log logrus.FieldLogger, serviceProxyName string) error {
	var errs []error
	if err := localaddr.Cleanup(proxyToken(serviceProxyName)); err != nil {
		errs = append(errs, fmt.Errorf("service addresses: %w", err))
	} else {
		log.Info("Removed our Service addresses")
	}
	if serviceProxyName == "" {
		// --preserve-source-ip's reply route (one per node: only the
		// default proxy keeps client addresses).
		if err := replyroute.Default.Cleanup(); err != nil {
			errs = append(errs, err)
		}
	}
	for _, family := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
		for _, b := range iptables.Available(family) {
			t, err := iptables.New(b, family, netip.Addr{}, iptables.ChainsFor(serviceProxyName))
			if err == nil {
				err = t.Cleanup()
			}
			switch {
			case err != nil && family == iptables.IPv6:
				// A node without IPv6 NAT never had IPv6 rules of ours.
				log.WithError(err).WithField("iptablesBackend", b).Warn("Could not clean ip6tables")
			case err != nil:
				errs = append(errs, fmt.Errorf("iptables %s: %w", b, err))
			default:
				log.WithFields(logrus.Fields{"iptablesBackend": b, "family": family}).Info("Removed our iptables chains and jumps")
			}
		}
	}
	return errors.Join(errs...)
}

func bindString(a netip.Addr) string {
	if !a.IsValid() {
		return "0.0.0.0"
	}
	return a.String()
}

// proxier applies snapshots. Only its loop goroutine touches it.
type proxier struct {
	log       logrus.FieldLogger
	listeners sockets
	front     frontend
	dns       *dnsTarget             // nil without a DNS stub
	names     func(service.Snapshot) // gives the DNS stub its zone; nil without one
	health    *health
	stats     *syncStats
	current   service.Snapshot
	bound     map[service.Key][]netip.AddrPort
	// published is where explain reads what the last apply made the
	// node serve; nil for none.
	published *atomic.Pointer[applied]
	// retired is closed once a new proxy took the sockets over: the
	// rules are its to write from then on (nil: never).
	retired <-chan struct{}
	// firstApply is closed after the first successful apply (nil: not
	// wanted).
	firstApply chan struct{}
}

// sockets is what the apply loop asks of the listeners (userspace.Listeners):
// open what a snapshot needs, and later close what nothing leads to.
type sockets interface {
	Sync(s service.Snapshot, binds userspace.Binds) (map[service.Key][]netip.AddrPort, error)
	CloseUnused()
}

// build makes the Snapshot for an update from either source. IPv6 halves
// of service ports are left out when the frontend cannot serve them (it
// said so once, at start).
func (p *proxier) build(u watch.Update, nodeName string) service.Snapshot {
	s, warnings := snapshot.Build(u.Services, u.EndpointSlices, nodeName)
	for _, w := range warnings {
		p.log.WithError(w).Warn("Service not served as written")
	}
	s = snapshot.WithPods(s, u.Pods)
	if !p.front.ipv6() {
		s.Ports = slices.DeleteFunc(s.Ports, func(sp service.Port) bool { return sp.ClusterIP.Is6() })
	}
	return s
}

func (p *proxier) loop(ctx context.Context, changes <-chan change, period time.Duration) {
	tick := time.NewTicker(period)
	defer tick.Stop()
	synced := false
	for {
		select {
		case <-ctx.Done():
			return
		case c := <-changes:
			if p.isRetired() {
				continue
			}
			p.stats.taken(c)
			p.apply(c.snap)
			synced = true
		case <-tick.C:
			if synced && !p.isRetired() {
				p.front.resync()
				p.apply(p.current)
			}
		}
	}
}

// isRetired reports whether a new proxy took over: this one then keeps
// its connections and listeners as they are, and writes no rule that
// would undo the new one's.
func (p *proxier) isRetired() bool {
	select {
	case <-p.retired:
		return true
	default:
		return false
	}
}

// apply makes the node serve s, in the order that never lets a packet find
// nothing: open, point, name, close.
func (p *proxier) apply(s service.Snapshot) {
	start := time.Now()
	// 1. Open the sockets new service ports and new addresses need, and
	// give every listener its current endpoints. Old sockets keep serving
	// meanwhile.
	bound, err := p.listeners.Sync(s, p.binds)
	if err != nil {
		p.log.WithError(err).Error("Some Service addresses have no listener and are not served")
	}
	// 2. Point the Service addresses at the sockets: rules, or local
	// addresses.
	opened := time.Now()
	wrote, err := p.front.point(s, bound, p.dns)
	pointed := time.Now()
	if err != nil {
		// Keep every socket open: what is still in the kernel may lead
		// to any of them. The next change or sync tries again.
		p.log.WithError(err).Error("Could not point Service addresses at the listeners; will retry")
		return
	}
	// 3. Names resolve once the addresses they give work.
	if p.names != nil {
		p.names(s)
	}
	// 4. Nothing leads to the sockets of removed ports and addresses any
	// more.
	p.listeners.CloseUnused()
	p.logChanges(s, bound)
	p.current, p.bound = s, bound
	if p.published != nil {
		p.published.Store(&applied{snap: s, bound: bound})
	}
	p.health.updated()
	p.stats.applied(start, s)
	if p.firstApply != nil {
		close(p.firstApply)
		p.firstApply = nil
	}
	p.log.WithFields(logrus.Fields{"servicePorts": len(s.Ports), "rulesWritten": wrote, "duration": time.Since(start).Round(time.Microsecond),
		"listenersDuration": opened.Sub(start).Round(time.Microsecond), "pointDuration": pointed.Sub(opened).Round(time.Microsecond)}).Debug("Synced")
}

// syncStats keeps the apply loop's metrics: how long syncs take, how many
// changes wait, and the network programming latency of each change. Only
// the loop goroutine touches it.
type syncStats struct {
	metrics *healthMetrics
	// triggers are the trigger times of changes not applied yet, and
	// pending counts those changes.
	triggers                       []time.Time
	pendingServices, pendingSlices int
}

// taken records a change the loop took and is about to apply.
func (st *syncStats) taken(c change) {
	st.triggers = addTriggers(st.triggers, c.triggers)
	st.pendingServices += c.serviceChanges
	st.pendingSlices += c.endpointChanges
}

// applied records a successful apply of s that began at start: everything
// taken so far is served.
func (st *syncStats) applied(start time.Time, s service.Snapshot) {
	m := st.metrics
	m.syncDuration.Observe(time.Since(start).Seconds())
	m.lastSync.SetToCurrentTime()
	for _, t := range st.triggers {
		m.networkProgramming.Observe(time.Since(t).Seconds())
	}
	st.triggers = nil
	m.serviceChangesPending.Sub(float64(st.pendingServices))
	m.endpointChangesPending.Sub(float64(st.pendingSlices))
	st.pendingServices, st.pendingSlices = 0, 0
	m.noLocalEndpoints.WithLabelValues("internal").Set(float64(noLocalEndpoints(s)))
}

// noLocalEndpoints counts the Services of s whose internalTrafficPolicy is
// Local and that have no endpoint on this node (their clients on this node
// are refused, by design).
func noLocalEndpoints(s service.Snapshot) int {
	empty := map[[2]string]bool{}
	for i := range s.Ports {
		if p := &s.Ports[i]; p.InternalLocal && len(p.Endpoints) == 0 {
			empty[[2]string{p.Name.Namespace, p.Name.Name}] = true
		}
	}
	return len(empty)
}

// logChanges logs one line per service port added, changed or removed.
func (p *proxier) logChanges(s service.Snapshot, bound map[service.Key][]netip.AddrPort) {
	for i := range s.Ports {
		n := &s.Ports[i]
		fields := logrus.Fields{
			"service":   n.Name.String(),
			"protocol":  n.Protocol,
			"clusterIP": n.ClusterIP.String(),
			"port":      n.Port,
			"listener":  listenerString(bound[n.Key()]),
			"endpoints": len(n.Endpoints),
		}
		if n.NodePort != 0 {
			fields["nodePort"] = n.NodePort
		}
		old, ok := p.current.Lookup(n.Key())
		switch {
		case !ok:
			p.log.WithFields(fields).Info("Added service port")
		case !service.SameFrontends(old, n) || old.Affinity != n.Affinity || !slices.Equal(old.Endpoints, n.Endpoints) || !slices.Equal(p.bound[n.Key()], bound[n.Key()]):
			p.log.WithFields(fields).Info("Updated service port")
		}
	}
	for i := range p.current.Ports {
		o := &p.current.Ports[i]
		if _, ok := s.Lookup(o.Key()); !ok {
			p.log.WithFields(logrus.Fields{"service": o.Name.String(), "protocol": o.Protocol, "clusterIP": o.ClusterIP.String(), "port": o.Port, "listener": listenerString(p.bound[o.Key()])}).Info("Removed service port")
		}
	}
}

// binds is where the frontend puts each service port's sockets, less port
// 53 of the cluster DNS IP, which is the DNS stub's.
func (p *proxier) binds(sp *service.Port) []netip.AddrPort {
	addrs := p.front.binds(sp)
	if p.dns == nil {
		return addrs
	}
	return slices.DeleteFunc(addrs, func(a netip.AddrPort) bool { return p.dns.claims(a.Addr(), a.Port()) })
}

// listenerString describes where a service port listens: the port alone
// for the one socket of redirect mode (its address is the bind address),
// else every address.
func listenerString(addrs []netip.AddrPort) string {
	if len(addrs) == 1 && addrs[0].Addr().IsUnspecified() {
		return strconv.Itoa(int(addrs[0].Port()))
	}
	parts := make([]string, len(addrs))
	for i, a := range addrs {
		parts[i] = a.String()
	}
	return strings.Join(parts, ",")
}

func sourceName(cfg *Config) string {
	if cfg.Manifests != "" {
		return "manifests " + cfg.Manifests
	}
	return "kubernetes"
}
