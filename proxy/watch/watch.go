// Package watch is the proxy's source in a cluster: Services and
// EndpointSlices from the API server, as kube-proxy watches them (its
// cmd/kube-proxy/app/server.go and pkg/proxy/config).
//
// A client-go reflector lists every object of a kind once, then watches for
// changes, and keeps the latest copy of each object in a store. Our stores
// only say "something changed"; one loop then reads both whole stores and
// hands them on, so a burst of events becomes one apply, and a delete, an
// endpoint moving from one slice to another or a missed event can never
// leave stale state: the state is always rebuilt from the stores, which
// are keyed per object (per slice name).
//
// We run reflectors directly rather than client-go's shared informers for
// one reason: informers do not let us set how reflectors retry, and their
// default backs off to 30-60s while the API server is down, so a change made
// just after an outage could wait half a minute. See reconnect.
package watch

import (
	"cmp"
	"context"
	"errors"
	"math"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/time/rate"
	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/apimachinery/pkg/util/wait"
	apiwatch "k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// LabelServiceProxyName is the label that hands a Service to a particular
// proxy: kube-proxy ignores Services that carry it, and a proxy started with
// --service-proxy-name NAME serves exactly those with that value.
const LabelServiceProxyName = "service.kubernetes.io/service-proxy-name"

// ServiceSelector selects the Services the proxy called proxyName serves,
// as kube-proxy selects its own: those labelled
// service.kubernetes.io/service-proxy-name=proxyName (without the label
// when proxyName is empty), and none labelled service.kubernetes.io/headless.
// Both sources use it: the cluster source asks the API server for just
// these, the manifest source keeps just these.
func ServiceSelector(proxyName string) labels.Selector {
	op, values := selection.DoesNotExist, []string(nil)
	if proxyName != "" {
		op, values = selection.Equals, []string{proxyName}
	}
	byName, err1 := labels.NewRequirement(LabelServiceProxyName, op, values)
	notHeadless, err2 := labels.NewRequirement(v1.IsHeadlessService, selection.DoesNotExist, nil)
	if err := errors.Join(err1, err2); err != nil {
		// Only an invalid label value gets here; the command checks it.
		return labels.Nothing()
	}
	return labels.NewSelector().Add(*byName, *notHeadless)
}

// reconnect is how our reflectors retry when a list or watch fails: 0.5s,
// growing to 1s, each wait stretched by up to 40%, so that the nodes whose
// watches all broke at the same instant (an API server restart) drift apart
// instead of retrying in step: after a few retries, 5,000 nodes arrive
// spread over a second and more rather than together. After an API server
// outage of any length, a change made once it is back reaches us within
// about 1.4s plus one list, and that relist is served from the API server's
// watch cache (the reflector lists at the resourceVersion it last saw,
// never a quorum read from etcd, unless that version has expired). The cost
// while the API server is away is a connection attempt per second and a bit
// per watched kind: 2.4 per second for Services, EndpointSlices and the
// Node (BenchmarkAPIOutageLoad); a refused connection costs the server
// nothing, and one that is up but overloaded answers 429 with Retry-After,
// which client-go's REST client honours on its own.
var reconnect = wait.Backoff{
	Duration: 500 * time.Millisecond,
	Factor:   1.5,
	Jitter:   0.4,
	Steps:    math.MaxInt32,
	Cap:      time.Second,
}

// Defaults, kube-proxy's: the flags and Config use them.
const (
	// DefaultResyncPeriod is --config-sync-period's default.
	DefaultResyncPeriod = 15 * time.Minute
	// DefaultMinSyncPeriod is --iptables-min-sync-period's default.
	DefaultMinSyncPeriod = time.Second
	// DefaultEndpointMinSyncPeriod bounds EndpointSlice changes alone.
	DefaultEndpointMinSyncPeriod = 100 * time.Millisecond
	// DefaultWaitReport is how often Run says it still waits for the
	// first lists.
	DefaultWaitReport = 10 * time.Second
)

// Config says what to watch. Zero fields take the defaults their comments
// give.
type Config struct {
	Client kubernetes.Interface
	// ServiceProxyName, when set, selects the Services labelled
	// service.kubernetes.io/service-proxy-name=<it>; empty selects the
	// Services without that label, as kube-proxy does.
	ServiceProxyName string
	// Headless also watches the EndpointSlices of headless Services,
	// which only DNS uses.
	Headless bool
	// ResyncPeriod is how often everything is handed on again even
	// without a change (--config-sync-period, the informers' resync in
	// kube-proxy). Zero means DefaultResyncPeriod.
	ResyncPeriod time.Duration
	// MinSyncPeriod bounds how often Service changes are applied
	// (--iptables-min-sync-period): a sparse change is applied at once, a
	// burst at most two at once and then one per period, later changes
	// waiting and being applied together. Only Services decide rules;
	// EndpointSlice changes touch no rule (they only change where our
	// listeners send connections), so they are bounded by the much shorter
	// EndpointMinSyncPeriod instead. Zero means DefaultMinSyncPeriod.
	MinSyncPeriod time.Duration
	// EndpointMinSyncPeriod bounds how often EndpointSlice changes alone
	// are applied, the same way. Zero means DefaultEndpointMinSyncPeriod.
	EndpointMinSyncPeriod time.Duration
	// WaitReport is how often a line says that the first lists have not
	// arrived yet, with the last error. Zero means DefaultWaitReport.
	WaitReport time.Duration
	// NodeName and NodeEligible: when both are set, this node's Node
	// object is watched and NodeEligible is told whether the node can take
	// load-balancer traffic: not when it is being deleted or carries the
	// cluster autoscaler's ToBeDeletedByClusterAutoscaler taint (kube-proxy's
	// /healthz rule, KEP-3836).
	NodeName     string
	NodeEligible func(bool)
	// NodePodCIDRs, when set with NodeName, is told this node's pod CIDRs
	// (spec.podCIDRs) whenever the Node is seen.
	NodePodCIDRs func([]netip.Prefix)
	// Changed, when set, is told of every Service or EndpointSlice change
	// as it arrives, before it is applied (kube-proxy's *_changes_total
	// and *_changes_pending metrics).
	Changed func(service bool, n int)
	Log     logrus.FieldLogger
}

// Update is the whole watched state at one moment.
type Update struct {
	Services       []*v1.Service
	EndpointSlices []*discovery.EndpointSlice
	// Pods are a manifest's Pods; the cluster source watches none (the
	// proxy's role may not read them).
	Pods []*v1.Pod
	// ServiceChanges and EndpointSliceChanges count the object changes
	// since the previous Update: what this Update applies.
	ServiceChanges, EndpointSliceChanges int
	// Triggers are the last-change-trigger-time annotations of the slices
	// that changed since the previous Update: when the change that led to
	// each slice write happened (a pod became ready, say). The time from
	// there to the change being applied is kube-proxy's network
	// programming latency.
	Triggers []time.Time
}

// podCIDRs are n's pod CIDRs (spec.podCIDRs, else spec.podCIDR), the
// unparsable left out.
func podCIDRs(n *v1.Node) []netip.Prefix {
	cidrs := n.Spec.PodCIDRs
	if len(cidrs) == 0 && n.Spec.PodCIDR != "" {
		cidrs = []string{n.Spec.PodCIDR}
	}
	var out []netip.Prefix
	for _, c := range cidrs {
		if p, err := netip.ParsePrefix(c); err == nil {
			out = append(out, p.Masked())
		}
	}
	return out
}

// TaintToBeDeleted is the cluster autoscaler's mark on a node it drains.
const TaintToBeDeleted = "ToBeDeletedByClusterAutoscaler"

func eligible(n *v1.Node) bool {
	if n.DeletionTimestamp != nil {
		return false
	}
	for _, t := range n.Spec.Taints {
		if t.Key == TaintToBeDeleted {
			return false
		}
	}
	return true
}

// Run starts the reflectors and waits until both Services and
// EndpointSlices have their first full list (nothing is applied from a
// half-known cluster), saying every WaitReport why not yet; then calls apply
// with every Service and EndpointSlice: once, and again after changes,
// never more often than MinSyncPeriod allows, never concurrently. It
// returns when ctx is done.
func Run(ctx context.Context, cfg Config, apply func(Update)) {
	resync := cmp.Or(cfg.ResyncPeriod, DefaultResyncPeriod)
	minSync := cmp.Or(cfg.MinSyncPeriod, DefaultMinSyncPeriod)
	endpointMinSync := cmp.Or(cfg.EndpointMinSyncPeriod, DefaultEndpointMinSyncPeriod)
	log := cfg.Log
	if log == nil {
		log = logrus.StandardLogger()
	}
	selector := ServiceSelector(cfg.ServiceProxyName).String()

	changed := make(chan struct{}, 1)
	nudge := func() {
		select {
		case changed <- struct{}{}:
		default: // a sync is already pending
		}
	}
	// Services: only ours. Headless Services are watched too (kube-proxy
	// skips them) because the DNS stub answers for them.
	var servicesChanged atomic.Bool
	services := newStore[*v1.Service](func() { servicesChanged.Store(true); nudge() })
	// EndpointSlices: kube-proxy leaves out those of headless Services
	// (labelled service.kubernetes.io/headless), which it never proxies;
	// the DNS stub needs them, so they are watched too when Headless is
	// set. The snapshot ignores slices of Services it does not proxy.
	slices := newStore[*discovery.EndpointSlice](nudge)
	sliceSelector := "!" + v1.IsHeadlessService
	if cfg.Headless {
		sliceSelector = ""
	}
	slices.triggers = &triggers{since: time.Now()}
	if cfg.Changed != nil {
		services.counted = func(n int) { cfg.Changed(true, n) }
		slices.counted = func(n int) { cfg.Changed(false, n) }
	}

	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel() // runs first: stops the reflectors, then wg waits for them
	// The last error of any list or watch, for the line that says why the
	// first lists have not arrived.
	var lastErr atomic.Pointer[error]
	failed := func(err error) { lastErr.Store(&err) }
	run := func(lw cache.ListerWatcher, typ runtime.Object, store cache.ReflectorStore) {
		r := cache.NewReflectorWithOptions(lw, typ, store, cache.ReflectorOptions{
			ResyncPeriod: resync,
			Backoff:      &reconnect,
		})
		wg.Go(func() { r.RunWithContext(ctx) })
	}
	core, disc := cfg.Client.CoreV1(), cfg.Client.DiscoveryV1()
	run(listWatch(failed, func(o *metav1.ListOptions) { o.LabelSelector = selector },
		core.Services(metav1.NamespaceAll).List, core.Services(metav1.NamespaceAll).Watch),
		&v1.Service{}, services)
	run(listWatch(failed, func(o *metav1.ListOptions) { o.LabelSelector = sliceSelector },
		disc.EndpointSlices(metav1.NamespaceAll).List, disc.EndpointSlices(metav1.NamespaceAll).Watch),
		&discovery.EndpointSlice{}, slices)
	if cfg.NodeName != "" && (cfg.NodeEligible != nil || cfg.NodePodCIDRs != nil) {
		// One Node: ours. Its store reports on every change; a Node not
		// created yet leaves the node eligible, a deleted one does not.
		var node *store[*v1.Node]
		var seen atomic.Bool
		node = newStore[*v1.Node](func() {
			n, ok := node.get(cfg.NodeName)
			if (ok || seen.Load()) && cfg.NodeEligible != nil {
				cfg.NodeEligible(ok && eligible(n))
			}
			seen.Store(seen.Load() || ok)
			if ok && cfg.NodePodCIDRs != nil {
				cfg.NodePodCIDRs(podCIDRs(n))
			}
		})
		run(listWatch(failed, func(o *metav1.ListOptions) { o.FieldSelector = "metadata.name=" + cfg.NodeName },
			core.Nodes().List, core.Nodes().Watch),
			&v1.Node{}, node)
	}

	log.Info("Waiting for the first lists of Services and EndpointSlices")
	report := time.Now().Add(cmp.Or(cfg.WaitReport, DefaultWaitReport))
	synced := func(context.Context) (bool, error) {
		if services.hasSynced() && slices.hasSynced() {
			return true, nil
		}
		if now := time.Now(); now.After(report) {
			report = now.Add(cmp.Or(cfg.WaitReport, DefaultWaitReport))
			l := log
			if err := lastErr.Load(); err != nil {
				l = l.WithError(*err)
			}
			l.Warn("Still waiting for the first lists of Services and EndpointSlices; nothing is served until both arrive")
		}
		return false, nil
	}
	if wait.PollUntilContextCancel(ctx, 100*time.Millisecond, true, synced) != nil {
		return // ctx is done
	}

	// Changes are applied at once while they are sparse, and bounded when
	// they come in bursts: token buckets of two, as kube-proxy's
	// BoundedFrequencyRunner (minSyncPeriod, burst 2). A Service change
	// spends a token of rules as well as one of changes. (One that lands
	// while we wait for a token rides along and is counted next time.)
	changes := rate.NewLimiter(rate.Every(endpointMinSync), 2)
	rules := rate.NewLimiter(rate.Every(minSync), 2)
	for {
		// Counts first: every change counted is then in the lists.
		u := Update{ServiceChanges: services.takeChanges(), EndpointSliceChanges: slices.takeChanges(), Triggers: slices.triggers.take()}
		u.Services, u.EndpointSlices = services.list(), slices.list()
		apply(u)
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
		// A reservation spends its token now, even when it has to wait
		// for it: the wait is the delay it reports.
		now := time.Now()
		delay := changes.ReserveN(now, 1).DelayFrom(now)
		if servicesChanged.Swap(false) {
			delay = max(delay, rules.ReserveN(now, 1).DelayFrom(now))
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
	}
}

// listWatch lists and watches with the typed client's List and Watch,
// after tweak sets the selectors, and tells failed of each error.
func listWatch[L runtime.Object](failed func(error), tweak func(*metav1.ListOptions),
	list func(context.Context, metav1.ListOptions) (L, error),
	watch func(context.Context, metav1.ListOptions) (apiwatch.Interface, error),
) cache.ListerWatcher {
	if tweak == nil {
		tweak = func(*metav1.ListOptions) {}
	}
	return &plainList{ListWatch: cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			tweak(&o)
			l, err := list(ctx, o)
			if err != nil {
				failed(err)
			}
			return l, err
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (apiwatch.Interface, error) {
			tweak(&o)
			w, err := watch(ctx, o)
			if err != nil {
				failed(err)
			}
			return w, err
		},
	}}
}

// plainList makes the reflector start with one List rather than a
// streamed watch-list (client-go's WatchListClient, on by default), which
// sends every object as an event of its own: with 10,000 Services that took
// 1.07s here against 0.13s for a List served from the API server's cache,
// and no Service works on a new node until the first list is in. The
// API server builds the whole List in memory, which the streamed form
// avoids; for Services that is a few megabytes.
type plainList struct{ cache.ListWatch }

// IsWatchListSemanticsUnSupported is the reflector's hook
// (watchlist.DoesClientNotSupportWatchListSemantics) for asking for a List.
func (*plainList) IsWatchListSemanticsUnSupported() bool { return true }
