package proxy

import (
	"testing"
	"time"
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
