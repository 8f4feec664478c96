// Package backoff says how long a server loop waits after an error it
// cannot return: an accept or read that fails (too many open files, a
// connection reset before it was accepted) is retried, never allowed to
// spin a core or to stop the server.
package backoff

import "time"

// Accept returns how long to wait after the n-th accept or read error in
// a row (n from 0): from 5ms doubling up to 1s, so a broken socket never
// spins and never floods the log (kubernetes#4112 wrote 37 GB of logs).
func Accept(n int) time.Duration {
	return min(5*time.Millisecond<<min(n, 8), time.Second)
}
