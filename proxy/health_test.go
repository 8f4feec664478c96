package proxy

import (
	"context"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	logtest "github.com/sirupsen/logrus/hooks/test"
)

// TestHealthStaleness is kube-proxy's rule: healthy at start and whenever
// nothing waits; unhealthy once a change has waited longer than the timeout;
// healthy again when it is applied.
func TestHealthStaleness(t *testing.T) {
	now := time.Unix(1000, 0)
	h := &health{timeout: 60 * time.Second, now: func() time.Time { return now }}
	steps := []struct {
		do   func()
		want bool
	}{
		{func() {}, true}, // starting
		{h.queued, true},  // a change waits
		{func() { now = now.Add(59 * time.Second) }, true},
		{h.queued, true}, // a later change does not restart the clock
		{func() { now = now.Add(2 * time.Second) }, false},
		{h.updated, true},
		{func() { now = now.Add(time.Hour) }, true}, // idle is healthy
	}
	for i, s := range steps {
		s.do()
		if got, _, _ := h.status(); got != s.want {
			t.Errorf("step %d: healthy = %v, want %v", i, got, s.want)
		}
	}
}

// TestReadyz: /readyz says 503 until the first sync is applied, then 200,
// and 503 again while a change waits too long; /healthz is 200 from the
// start, as kube-proxy's.
func TestReadyz(t *testing.T) {
	now := time.Unix(1000, 0)
	h := &health{timeout: 60 * time.Second, now: func() time.Time { return now }}
	m, err := newHealthMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	log, _ := logtest.NewNullLogger()
	go func() { done <- serveHealth(ctx, ln, h, m, log) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	code := func(path string) int {
		t.Helper()
		resp, err := http.Get("http://" + ln.Addr().String() + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if got := code("/readyz"); got != http.StatusServiceUnavailable {
		t.Errorf("/readyz before the first sync: %d", got)
	}
	if got := code("/healthz"); got != http.StatusOK {
		t.Errorf("/healthz before the first sync: %d", got)
	}
	h.updated()
	if got := code("/readyz"); got != http.StatusOK {
		t.Errorf("/readyz after the first sync: %d", got)
	}
	h.queued()
	now = now.Add(2 * time.Minute)
	if got := code("/readyz"); got != http.StatusServiceUnavailable {
		t.Errorf("/readyz with a change waiting 2m: %d", got)
	}
}
