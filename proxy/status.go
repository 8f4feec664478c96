package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sirupsen/logrus"
	"golang.org/x/net/netutil"
)

// ProxyModeName is what /proxyMode answers for each mode. kube-proxy answers
// its mode's name there ("iptables", "ipvs"); the legacy userspace mode
// answered "userspace", which our redirect mode is.
func ProxyModeName(mode Mode) string {
	if mode == ModeRedirect {
		return "userspace"
	}
	return string(mode)
}

// serveStatus serves kube-proxy's /proxyMode, and our /metrics, on addr
// until ctx is done; with profiling, Go's /debug/pprof too (kube-proxy's
// --profiling).
func serveStatus(ctx context.Context, ln net.Listener, mode Mode, reg *prometheus.Registry, profiling bool, explain http.Handler, log logrus.FieldLogger) error {
	mux := http.NewServeMux()
	mux.HandleFunc("/proxyMode", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, ProxyModeName(mode))
	})
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	// A Service's whole path through the node, for
	// `kube-userspace-proxy explain`: on the metrics address, which is
	// loopback by default, as it names every Service and endpoint.
	mux.Handle("/explain", explain)
	if profiling {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	log.WithField("address", ln.Addr().String()).Info("Serving /proxyMode, /metrics and /explain")
	return serveHTTP(ctx, ln, mux)
}

// httpLimits bound what one peer can make the health and metrics servers
// hold. /healthz listens on every node address (kubelet and load balancers
// probe it), so anyone who can reach the node can open connections to it:
// without bounds, 300 idle keep-alive connections from off the node held
// 300 descriptors forever.
type httpLimits struct {
	connections int           // served at once; more wait in the kernel's queue
	header      time.Duration // to send the request headers
	read        time.Duration // to send the whole request
	write       time.Duration // to take the whole reply (a 30s CPU profile fits)
	idle        time.Duration // a keep-alive connection may wait for its next request
	headerBytes int
}

var defaultHTTPLimits = httpLimits{connections: 64, header: 5 * time.Second, read: 10 * time.Second,
	write: 2 * time.Minute, idle: 5 * time.Second, headerBytes: 16 << 10}

// serveHTTP serves h on ln until ctx is done, within defaultHTTPLimits.
func serveHTTP(ctx context.Context, ln net.Listener, h http.Handler) error {
	return serveHTTPWithin(ctx, ln, h, defaultHTTPLimits)
}

func serveHTTPWithin(ctx context.Context, ln net.Listener, h http.Handler, lim httpLimits) error {
	ln = netutil.LimitListener(ln, lim.connections)
	srv := &http.Server{Handler: h, ReadHeaderTimeout: lim.header, ReadTimeout: lim.read,
		WriteTimeout: lim.write, IdleTimeout: lim.idle, MaxHeaderBytes: lim.headerBytes}
	stop := context.AfterFunc(ctx, func() { srv.Close() })
	defer stop()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
