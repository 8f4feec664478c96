package logthrottle

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

// TestThrottle: a thousand failures in a burst make one line; the next
// line after the interval says how many were left out.
func TestThrottle(t *testing.T) {
	var out bytes.Buffer
	log := logrus.New()
	log.Out = &out
	th := New(time.Hour)
	for range 1000 {
		th.Log(logrus.NewEntry(log), func(e *logrus.Entry) { e.Warn("Dial failed") })
	}
	if n := strings.Count(out.String(), "Dial failed"); n != 1 {
		t.Fatalf("1000 failures in a burst logged %d lines, want 1:\n%s", n, out.String())
	}
	th.sometimes.Interval = time.Nanosecond // the interval has passed
	th.Log(logrus.NewEntry(log), func(e *logrus.Entry) { e.Warn("Dial failed") })
	if !strings.Contains(out.String(), "suppressed=999") {
		t.Errorf("the line after the interval does not count the 999 left out:\n%s", out.String())
	}
}
