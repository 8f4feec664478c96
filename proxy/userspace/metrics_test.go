package userspace

import (
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestMetricsCount: proxied connections, a refused one and a failover are
// counted, with the bytes each way and the open listeners.
func TestMetricsCount(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	ls := newSet(t, Config{Metrics: m})
	dead, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().(*net.TCPAddr).AddrPort()
	dead.Close()
	p := tcpPort(deadAddr, backend(t, echo))
	none := tcpPort()
	none.Name.Name = "none"
	s := snap(t, p, none)
	addr := listen(t, ls, s, p.Key())

	// Two connections: round robin sends one of them to the dead endpoint
	// first, and it fails over.
	for range 2 {
		c := dialTCP(t, addr)
		io.WriteString(c, "12345")
		c.CloseWrite()
		if got, err := io.ReadAll(c); err != nil || string(got) != "12345" {
			t.Fatalf("echo = %q, %v", got, err)
		}
	}
	// One refused: no endpoints.
	// The refusal (a RST right after accept) can reach the client before
	// its connect returns; either way it is one refused connection.
	if c, err := net.Dial("tcp", listen(t, ls, s, none.Key())); err == nil {
		c.Read(make([]byte, 1))
		c.Close()
	}

	// The handlers count as their connections end; wait for that.
	deadline := time.Now().Add(5 * time.Second)
	for testutil.ToFloat64(m.active.WithLabelValues("TCP")) != 0 || testutil.ToFloat64(m.connections.WithLabelValues("TCP", resultNoEndpoints)) != 1 {
		if time.Now().After(deadline) {
			t.Fatal("connections still counted as active after 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	want := `
# HELP kube_userspace_proxy_connections_total Connections (TCP) and sessions (UDP) accepted, by result: ok, no_endpoints (refused), dial_error (no endpoint answered), over_limit (reset: --tcp-max-connections reached).
# TYPE kube_userspace_proxy_connections_total counter
kube_userspace_proxy_connections_total{protocol="TCP",result="dial_error"} 0
kube_userspace_proxy_connections_total{protocol="TCP",result="no_endpoints"} 1
kube_userspace_proxy_connections_total{protocol="TCP",result="ok"} 2
kube_userspace_proxy_connections_total{protocol="TCP",result="over_limit"} 0
# HELP kube_userspace_proxy_bytes_total Bytes carried, by direction: to_backend (client to pod) or from_backend.
# TYPE kube_userspace_proxy_bytes_total counter
kube_userspace_proxy_bytes_total{direction="from_backend",protocol="TCP"} 10
kube_userspace_proxy_bytes_total{direction="to_backend",protocol="TCP"} 10
# HELP kube_userspace_proxy_endpoint_dial_errors_total Attempts to reach an endpoint that failed.
# TYPE kube_userspace_proxy_endpoint_dial_errors_total counter
kube_userspace_proxy_endpoint_dial_errors_total{protocol="TCP"} 1
# HELP kube_userspace_proxy_endpoint_dial_retries_total Attempts made on the next endpoint after one failed (failover).
# TYPE kube_userspace_proxy_endpoint_dial_retries_total counter
kube_userspace_proxy_endpoint_dial_retries_total{protocol="TCP"} 1
# HELP kube_userspace_proxy_listeners Listening sockets open for Service traffic.
# TYPE kube_userspace_proxy_listeners gauge
kube_userspace_proxy_listeners{protocol="TCP"} 2
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"kube_userspace_proxy_connections_total", "kube_userspace_proxy_bytes_total",
		"kube_userspace_proxy_endpoint_dial_errors_total", "kube_userspace_proxy_endpoint_dial_retries_total",
		"kube_userspace_proxy_listeners"); err != nil {
		t.Error(err)
	}
}
