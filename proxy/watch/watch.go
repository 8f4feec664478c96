// Package watch is the proxy's source in a cluster: client-go informers on
// Services and EndpointSlices, as kube-proxy has them (its
// cmd/kube-proxy/app/server.go and pkg/proxy/config).
//
// Informers keep a local cache of every object, updated by a watch on the
// API server. Event handlers here only say "something changed"; one loop
// then reads the whole cache and hands it on, so a burst of events becomes
// one apply, and a delete, an endpoint moving from one slice to another or
// a missed event can never leave stale state: the state is always rebuilt
// from the cache, which is keyed per object (per slice name).
package watch

import (
	"context"
	"errors"
	"time"

	"github.com/sirupsen/logrus"
	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// LabelServiceProxyName is the label that hands a Service to a particular
// proxy: kube-proxy ignores Services that carry it, and a proxy started with
// --service-proxy-name NAME serves exactly those with that value.
const LabelServiceProxyName = "service.kubernetes.io/service-proxy-name"

// Config says what to watch. Zero fields take the defaults their comments
// give.
type Config struct {
	Client kubernetes.Interface
	// ServiceProxyName, when set, selects the Services labelled
	// service.kubernetes.io/service-proxy-name=<it>; empty selects the
	// Services without that label, as kube-proxy does.
	ServiceProxyName string
	// ResyncPeriod is the informers' resync (--config-sync-period). Zero
	// means 15m, kube-proxy's default.
	ResyncPeriod time.Duration
	// MinSyncPeriod bounds how often changes are applied
	// (--iptables-min-sync-period): a sparse change is applied at once, a
	// burst at most two at once and then one per period, later changes
	// waiting and being applied together. Zero means 1s.
	MinSyncPeriod time.Duration
	// NodeName and NodeEligible: when both are set, this node's Node
	// object is watched and NodeEligible is told whether the node can take
	// load-balancer traffic: not when it is being deleted or carries the
	// cluster autoscaler's ToBeDeletedByClusterAutoscaler taint (kube-proxy's
	// /healthz rule, KEP-3836).
	NodeName     string
	NodeEligible func(bool)
	Log          logrus.FieldLogger
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

// Run starts the informers and waits until both have their first full list
// (nothing is applied from a half-known cluster), then calls apply with
// every Service and EndpointSlice: once, and again after changes, never
// more often than MinSyncPeriod, never concurrently. It returns when ctx is
// done, or with an error if the caches cannot sync.
func Run(ctx context.Context, cfg Config, apply func([]*v1.Service, []*discovery.EndpointSlice)) error {
	resync := cfg.ResyncPeriod
	if resync == 0 {
		resync = 15 * time.Minute
	}
	minSync := cfg.MinSyncPeriod
	if minSync == 0 {
		minSync = time.Second
	}
	selector := "!" + LabelServiceProxyName
	if cfg.ServiceProxyName != "" {
		selector = LabelServiceProxyName + "=" + cfg.ServiceProxyName
	}

	ctx, cancel := context.WithCancel(ctx)
	// Services: only ours. Headless Services are watched too (kube-proxy
	// skips them) because the DNS stub answers for them.
	svcFactory := informers.NewSharedInformerFactoryWithOptions(cfg.Client, resync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = selector }))
	// EndpointSlices: all of them, headless ones included, for the same
	// reason; the snapshot ignores those of Services it does not proxy.
	sliceFactory := informers.NewSharedInformerFactory(cfg.Client, resync)
	defer svcFactory.Shutdown()
	defer sliceFactory.Shutdown()
	defer cancel() // runs first: stops the informers, then Shutdown waits for them

	changed := make(chan struct{}, 1)
	nudge := func() {
		select {
		case changed <- struct{}{}:
		default: // a sync is already pending
		}
	}
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { nudge() },
		UpdateFunc: func(any, any) { nudge() },
		DeleteFunc: func(any) { nudge() },
	}
	services := svcFactory.Core().V1().Services()
	slices := sliceFactory.Discovery().V1().EndpointSlices()
	if _, err := services.Informer().AddEventHandler(handler); err != nil {
		return err
	}
	if _, err := slices.Informer().AddEventHandler(handler); err != nil {
		return err
	}
	if cfg.NodeName != "" && cfg.NodeEligible != nil {
		nodeFactory := informers.NewSharedInformerFactoryWithOptions(cfg.Client, resync,
			informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.FieldSelector = "metadata.name=" + cfg.NodeName }))
		defer nodeFactory.Shutdown()
		report := func(obj any) {
			if n, ok := obj.(*v1.Node); ok {
				cfg.NodeEligible(eligible(n))
			}
		}
		if _, err := nodeFactory.Core().V1().Nodes().Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    report,
			UpdateFunc: func(_, n any) { report(n) },
			DeleteFunc: func(any) { cfg.NodeEligible(false) },
		}); err != nil {
			return err
		}
		nodeFactory.Start(ctx.Done())
	}
	svcFactory.Start(ctx.Done())
	sliceFactory.Start(ctx.Done())
	if cfg.Log != nil {
		cfg.Log.Info("Waiting for the Service and EndpointSlice caches to sync")
	}
	if !cache.WaitForCacheSync(ctx.Done(), services.Informer().HasSynced, slices.Informer().HasSynced) {
		if ctx.Err() != nil {
			return nil
		}
		return errors.New("the Service and EndpointSlice caches did not sync")
	}

	// Changes are applied at once while they are sparse, and at most once
	// per MinSyncPeriod when they come in bursts: a token bucket of two, as
	// kube-proxy's BoundedFrequencyRunner (minSyncPeriod, burst 2).
	bucket := &tokens{burst: 2, every: minSync, have: 2, at: time.Now()}
	for {
		svcs, err := services.Lister().List(labels.Everything())
		if err != nil {
			return err
		}
		eps, err := slices.Lister().List(labels.Everything())
		if err != nil {
			return err
		}
		apply(svcs, eps)
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(bucket.take(time.Now())):
		}
	}
}

// tokens is a token bucket: one token per apply, refilled at one per
// every, holding at most burst.
type tokens struct {
	burst float64
	every time.Duration
	have  float64
	at    time.Time
}

// take spends a token and returns how long to wait for it.
func (b *tokens) take(now time.Time) time.Duration {
	b.have = min(b.burst, b.have+float64(now.Sub(b.at))/float64(b.every))
	b.at = now
	b.have--
	if b.have >= 0 {
		return 0
	}
	return time.Duration(-b.have * float64(b.every))
}
