package proxy

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
)

// health is kube-proxy's staleness rule (pkg/proxy/healthcheck): the proxy
// is unhealthy when a change has waited longer than timeout (2 x the sync
// period) to be applied; healthy while starting and whenever nothing waits.
type health struct {
	timeout time.Duration
	now     func() time.Time

	mu          sync.Mutex
	lastQueued  time.Time // oldest change not applied yet; zero when none
	lastUpdated time.Time // last successful apply
	ineligible  bool      // the Node is being deleted or drained
}

// setNodeEligible records whether this node may take load-balancer traffic.
func (h *health) setNodeEligible(ok bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.ineligible = !ok
}

func (h *health) nodeEligible() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return !h.ineligible
}

// queued records that a change waits to be applied.
func (h *health) queued() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.lastQueued.IsZero() {
		h.lastQueued = h.now()
	}
}

// updated records a successful apply of everything queued so far.
func (h *health) updated() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lastQueued = time.Time{}
	h.lastUpdated = h.now()
}

// status reports whether the proxy is healthy, with the times to show.
func (h *health) status() (healthy bool, lastUpdated, now time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	now = h.now()
	healthy = h.lastQueued.IsZero() || now.Sub(h.lastQueued) <= h.timeout
	return healthy, h.lastUpdated, now
}

// healthMetrics are kube-proxy's probe counters and sync metrics, with
// kube-proxy's names and buckets so that its dashboards work.
type healthMetrics struct {
	healthz, livez *prometheus.CounterVec
	syncDuration   prometheus.Histogram
	lastSync       prometheus.Gauge
	lastQueued     prometheus.Gauge
	// networkProgramming is kube-proxy's SLI: from the change behind an
	// EndpointSlice write (its last-change-trigger-time annotation) to
	// that change being served.
	networkProgramming prometheus.Histogram
	// Changes received, and not applied yet, by kind.
	serviceChanges, endpointChanges               prometheus.Counter
	serviceChangesPending, endpointChangesPending prometheus.Gauge
	// noLocalEndpoints counts Services whose internalTrafficPolicy is
	// Local and that have no endpoint on this node.
	noLocalEndpoints *prometheus.GaugeVec
	// restoreFailures counts failed iptables-restore runs.
	restoreFailures prometheus.Counter
}

func newHealthMetrics(reg prometheus.Registerer) (*healthMetrics, error) {
	m := &healthMetrics{
		healthz: prometheus.NewCounterVec(prometheus.CounterOpts{Subsystem: "kubeproxy", Name: "proxy_healthz_total",
			Help: "Cumulative proxy healthz HTTP status"}, []string{"code"}),
		livez: prometheus.NewCounterVec(prometheus.CounterOpts{Subsystem: "kubeproxy", Name: "proxy_livez_total",
			Help: "Cumulative proxy livez HTTP status"}, []string{"code"}),
		syncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Subsystem: "kubeproxy", Name: "sync_proxy_rules_duration_seconds",
			Help: "SyncProxyRules latency in seconds", Buckets: prometheus.ExponentialBuckets(0.001, 2, 15)}),
		lastSync: prometheus.NewGauge(prometheus.GaugeOpts{Subsystem: "kubeproxy", Name: "sync_proxy_rules_last_timestamp_seconds",
			Help: "The last time proxy rules were successfully synced"}),
		lastQueued: prometheus.NewGauge(prometheus.GaugeOpts{Subsystem: "kubeproxy", Name: "sync_proxy_rules_last_queued_timestamp_seconds",
			Help: "The last time a sync of proxy rules was queued"}),
		networkProgramming: prometheus.NewHistogram(prometheus.HistogramOpts{Subsystem: "kubeproxy", Name: "network_programming_duration_seconds",
			Help: "In Cluster Network Programming Latency in seconds", Buckets: slices.Concat(
				prometheus.LinearBuckets(0.25, 0.25, 2), // 0.25s, 0.5s
				prometheus.LinearBuckets(1, 1, 59),      // 1s ... 59s
				prometheus.LinearBuckets(60, 5, 12),     // 60s ... 115s
				prometheus.LinearBuckets(120, 30, 7),    // 2min ... 5min
			)}),
		serviceChanges: prometheus.NewCounter(prometheus.CounterOpts{Subsystem: "kubeproxy", Name: "sync_proxy_rules_service_changes_total",
			Help: "Cumulative proxy rules Service changes"}),
		endpointChanges: prometheus.NewCounter(prometheus.CounterOpts{Subsystem: "kubeproxy", Name: "sync_proxy_rules_endpoint_changes_total",
			Help: "Cumulative proxy rules Endpoint changes"}),
		serviceChangesPending: prometheus.NewGauge(prometheus.GaugeOpts{Subsystem: "kubeproxy", Name: "sync_proxy_rules_service_changes_pending",
			Help: "Pending proxy rules Service changes"}),
		endpointChangesPending: prometheus.NewGauge(prometheus.GaugeOpts{Subsystem: "kubeproxy", Name: "sync_proxy_rules_endpoint_changes_pending",
			Help: "Pending proxy rules Endpoint changes"}),
		noLocalEndpoints: prometheus.NewGaugeVec(prometheus.GaugeOpts{Subsystem: "kubeproxy", Name: "sync_proxy_rules_no_local_endpoints_total",
			Help: "Number of services with a Local traffic policy and no endpoints"}, []string{"traffic_policy"}),
		restoreFailures: prometheus.NewCounter(prometheus.CounterOpts{Subsystem: "kubeproxy", Name: "sync_proxy_rules_iptables_restore_failures_total",
			Help: "Cumulative proxy iptables restore failures"}),
	}
	for _, c := range []prometheus.Collector{m.healthz, m.livez, m.syncDuration, m.lastSync, m.lastQueued, m.networkProgramming,
		m.serviceChanges, m.endpointChanges, m.serviceChangesPending, m.endpointChangesPending, m.noLocalEndpoints, m.restoreFailures} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// changed counts n Service or EndpointSlice changes, received and pending.
func (m *healthMetrics) changed(service bool, n int) {
	if service {
		m.serviceChanges.Add(float64(n))
		m.serviceChangesPending.Add(float64(n))
	} else {
		m.endpointChanges.Add(float64(n))
		m.endpointChangesPending.Add(float64(n))
	}
}

// serveHealth serves /healthz, /livez and /readyz on ln until ctx is done, with
// kube-proxy's JSON bodies. /healthz also fails while the Node is being
// deleted or drained, so that load balancers move away from it; /livez,
// for liveness probes, does not. Without a Node to watch (the manifest
// source) the node is always eligible.
func serveHealth(ctx context.Context, ln net.Listener, h *health, m *healthMetrics, log logrus.FieldLogger) error {
	probe := func(counter *prometheus.CounterVec, withNode bool) http.HandlerFunc {
		return func(w http.ResponseWriter, _ *http.Request) {
			healthy, last, now := h.status()
			body := map[string]any{"lastUpdated": last, "currentTime": now}
			if withNode {
				eligible := h.nodeEligible()
				body["nodeEligible"] = eligible
				healthy = healthy && eligible
			}
			code := http.StatusOK
			if !healthy {
				code = http.StatusServiceUnavailable
			}
			counter.WithLabelValues(strconv.Itoa(code)).Inc()
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("X-Content-Type-Options", "nosniff")
			w.WriteHeader(code)
			json.NewEncoder(w).Encode(body)
		}
	}
	mux := http.NewServeMux()
	mux.Handle("/healthz", probe(m.healthz, true))
	mux.Handle("/livez", probe(m.livez, false))
	// /readyz is ours (kube-proxy has none): ready once the first sync
	// is applied, for a DaemonSet's readiness probe, so that an upgrade
	// moves on only when the new proxy serves.
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		healthy, last, _ := h.status()
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if !healthy || last.IsZero() {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, "not ready: no sync applied yet, or a change waits too long")
			return
		}
		fmt.Fprintln(w, "ok")
	})
	log.WithField("address", ln.Addr().String()).Info("Serving /healthz, /livez and /readyz")
	return serveHTTP(ctx, ln, mux)
}
