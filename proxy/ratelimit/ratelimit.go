// Package ratelimit holds the token bucket that bounds how often the proxy
// rebuilds its state and rewrites its rules: kube-proxy's
// BoundedFrequencyRunner, which lets sparse changes through at once and
// spreads bursts out.
package ratelimit

import "time"

// Bucket is a token bucket: one token per run, refilled at one per Every,
// holding at most Burst. Build it with New; it is not safe for concurrent
// use.
type Bucket struct {
	burst float64
	every time.Duration
	have  float64
	at    time.Time
}

// New returns a full bucket of burst tokens, refilled one per every.
func New(burst int, every time.Duration, now time.Time) *Bucket {
	return &Bucket{burst: float64(burst), every: every, have: float64(burst), at: now}
}

// Take spends a token and returns how long to wait for it: zero when one
// was there.
func (b *Bucket) Take(now time.Time) time.Duration {
	b.have = min(b.burst, b.have+float64(now.Sub(b.at))/float64(b.every))
	b.at = now
	b.have--
	if b.have >= 0 {
		return 0
	}
	return time.Duration(-b.have * float64(b.every))
}
