// Package logthrottle keeps failure paths from flooding the log. A failure
// that a peer can cause at will (a dial to a dead pod, an accept at the
// open file limit) would otherwise log a line each time: a flood of
// connections becomes a flood of lines, and upstream's proxier once wrote
// 37 GB of them (kubernetes#4112). A Throttle logs the first of a kind at
// once, then at most one per interval, and says how many it left out.
package logthrottle

import (
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/time/rate"
)

// Throttle logs at most one line per interval. The zero value is not
// usable; make one with New.
type Throttle struct {
	sometimes rate.Sometimes
	skipped   atomic.Int64
}

// New returns a Throttle that logs at most one line per interval.
func New(interval time.Duration) *Throttle {
	return &Throttle{sometimes: rate.Sometimes{Interval: interval}}
}

// Log calls emit with entry, given a "suppressed" field counting the lines
// left out since the last one, unless a line was logged less than an
// interval ago; then it only counts this one.
func (t *Throttle) Log(entry *logrus.Entry, emit func(*logrus.Entry)) {
	ran := false
	t.sometimes.Do(func() {
		ran = true
		if n := t.skipped.Swap(0); n > 0 {
			entry = entry.WithField("suppressed", n)
		}
		emit(entry)
	})
	if !ran {
		t.skipped.Add(1)
	}
}
