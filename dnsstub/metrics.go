package dnsstub

import (
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the stub's Prometheus metrics, under our prefix.
type metrics struct {
	requests       *prometheus.CounterVec
	duration       prometheus.Histogram
	forwarded      prometheus.Counter
	upstreamErrors prometheus.Counter
	// forwardsRefused counts queries answered SERVFAIL because
	// MaxConcurrentForwards were already waiting.
	forwardsRefused prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kube_userspace_proxy_dns_requests_total",
			Help: "DNS queries answered, by query type and response code.",
		}, []string{"qtype", "rcode"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kube_userspace_proxy_dns_request_duration_seconds",
			Help:    "Time to answer a DNS query, forwarding included.",
			Buckets: []float64{0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1, 2.5},
		}),
		forwarded: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kube_userspace_proxy_dns_forwarded_total",
			Help: "DNS queries sent upstream: names outside the cluster domain.",
		}),
		upstreamErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kube_userspace_proxy_dns_upstream_errors_total",
			Help: "Upstream DNS exchanges that failed (timeout, refused, bad reply).",
		}),
		forwardsRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kube_userspace_proxy_dns_forwards_refused_total",
			Help: "Queries answered SERVFAIL without forwarding: the maximum of concurrent forwarded queries was reached.",
		}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.requests, m.duration, m.forwarded, m.upstreamErrors, m.forwardsRefused} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

func (m *metrics) observe(qtype uint16, rcode int, d time.Duration) {
	t, ok := dns.TypeToString[qtype]
	if !ok {
		t = "other"
	}
	m.requests.WithLabelValues(t, dns.RcodeToString[rcode]).Inc()
	m.duration.Observe(d.Seconds())
}
