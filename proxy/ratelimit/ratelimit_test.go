package ratelimit

import (
	"testing"
	"time"
)

// TestBucket: sparse runs go at once; a burst gets two at once, then one
// per period.
func TestBucket(t *testing.T) {
	start := time.Unix(1000, 0)
	b := New(2, time.Second, start)
	steps := []struct {
		after time.Duration // since start
		wait  time.Duration
	}{
		{0, 0},
		{10 * time.Millisecond, 0},
		{20 * time.Millisecond, 980 * time.Millisecond}, // third in a burst: waits for a refill
		{5 * time.Second, 0},                            // sparse again: at once
		{5*time.Second + time.Millisecond, 0},
	}
	for i, s := range steps {
		got := b.Take(start.Add(s.after))
		if d := got - s.wait; d > time.Millisecond || d < -time.Millisecond {
			t.Errorf("step %d: wait %s, want %s", i, got, s.wait)
		}
	}
}
