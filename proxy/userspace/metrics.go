package userspace

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// Metrics are the listeners' Prometheus metrics. Labels are bounded sets
// (protocol, result, direction), never object names, so a cluster with
// thousands of Services still has a handful of series.
type Metrics struct {
	connections *prometheus.CounterVec // protocol, result
	active      *prometheus.GaugeVec   // protocol
	bytes       *prometheus.CounterVec // protocol, direction
	dialErrors  *prometheus.CounterVec // protocol
	dialRetries *prometheus.CounterVec // protocol
	expired     prometheus.Counter     // UDP sessions that timed out
	evicted     prometheus.Counter     // UDP sessions evicted to make room
	refused     prometheus.Counter     // UDP sessions not made: the node was full
	sockets     *prometheus.GaugeVec   // protocol
	acceptErrs  *prometheus.CounterVec // protocol
	// listenFailures: sockets that could not be opened, by protocol and
	// reason (port_in_use, other).
	listenFailures *prometheus.CounterVec
	// sourceIP: connections and sessions dialed with the client's own
	// address (--preserve-source-ip), by result.
	sourceIP *prometheus.CounterVec
}

// Connection results.
const (
	resultOK          = "ok"
	resultNoEndpoints = "no_endpoints"
	resultDialError   = "dial_error"
	resultOverLimit   = "over_limit"
)

// NewMetrics makes the listeners' metrics and registers them with reg
// (nil: not registered anywhere, still counted).
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	const ns = "kube_userspace_proxy"
	m := &Metrics{
		connections: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "connections_total",
			Help: "Connections (TCP) and sessions (UDP) accepted, by result: ok, no_endpoints (refused), dial_error (no endpoint answered), over_limit (reset: --tcp-max-connections reached)."}, []string{"protocol", "result"}),
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "active_connections",
			Help: "Proxied TCP connections and UDP sessions open now."}, []string{"protocol"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "bytes_total",
			Help: "Bytes carried, by direction: to_backend (client to pod) or from_backend."}, []string{"protocol", "direction"}),
		dialErrors: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "endpoint_dial_errors_total",
			Help: "Attempts to reach an endpoint that failed."}, []string{"protocol"}),
		dialRetries: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "endpoint_dial_retries_total",
			Help: "Attempts made on the next endpoint after one failed (failover)."}, []string{"protocol"}),
		expired: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "udp_sessions_expired_total",
			Help: "UDP sessions ended by the idle timeout."}),
		evicted: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "udp_sessions_evicted_total",
			Help: "UDP sessions ended to make room for a new client: the service port or the node had reached its --udp-max-sessions bound."}),
		refused: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "udp_sessions_refused_total",
			Help: "UDP datagrams from new clients dropped because the node had reached --udp-max-sessions and their service port had no session to give up."}),
		sockets: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "listeners",
			Help: "Listening sockets open for Service traffic."}, []string{"protocol"}),
		listenFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "listen_failures_total",
			Help: "Listening sockets for Service traffic that could not be opened (retried every sync), by reason: port_in_use (bind mode: the node already listens on that port), other."}, []string{"protocol", "reason"}),
		sourceIP: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "source_ip_total",
			Help: "With --preserve-source-ip: connections (TCP) and sessions (UDP) by how the endpoint saw the client: preserved (the client's address and port), preserved_other_port (its address, another port: its own was taken towards that endpoint), " +
				"not_local_pod (the node's address: the client is not a pod of this node), same_pod (the node's address: the client reached itself), failed (the node's address: the kernel refused the transparent socket)."}, []string{"protocol", "result"}),
		acceptErrs: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "listener_errors_total",
			Help: "Accept and read errors on listening sockets (such as too many open files); each is retried after a backoff."}, []string{"protocol"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.connections, m.active, m.bytes, m.dialErrors, m.dialRetries, m.expired, m.evicted, m.refused, m.sockets, m.acceptErrs, m.listenFailures, m.sourceIP} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

// protoMetrics are one protocol's series, looked up once so that the data
// path only does atomic adds.
type protoMetrics struct {
	ok, noEndpoints, dialError prometheus.Counter
	overLimit                  prometheus.Counter
	active                     prometheus.Gauge
	toBackend, fromBackend     prometheus.Counter
	dialErrors, dialRetries    prometheus.Counter
	sockets                    prometheus.Gauge
	acceptErrs                 prometheus.Counter
	expired, evicted, refused  prometheus.Counter
}

func (m *Metrics) forProtocol(p service.Protocol) *protoMetrics {
	l := string(p)
	return &protoMetrics{
		ok:          m.connections.WithLabelValues(l, resultOK),
		noEndpoints: m.connections.WithLabelValues(l, resultNoEndpoints),
		dialError:   m.connections.WithLabelValues(l, resultDialError),
		overLimit:   m.connections.WithLabelValues(l, resultOverLimit),
		active:      m.active.WithLabelValues(l),
		toBackend:   m.bytes.WithLabelValues(l, "to_backend"),
		fromBackend: m.bytes.WithLabelValues(l, "from_backend"),
		dialErrors:  m.dialErrors.WithLabelValues(l),
		dialRetries: m.dialRetries.WithLabelValues(l),
		sockets:     m.sockets.WithLabelValues(l),
		acceptErrs:  m.acceptErrs.WithLabelValues(l),
		expired:     m.expired,
		evicted:     m.evicted,
		refused:     m.refused,
	}
}
