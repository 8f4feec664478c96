package userspace

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// fdsPerTCPConnection is what one proxied TCP connection holds: the
// client's socket and ours to the pod. The pipes that bulk is spliced
// through are lent by a pool of their own, bounded by maxPipes (FDBudget.Pipes).
const fdsPerTCPConnection = 2

// FDBudget divides the file descriptors the proxy may open
// (RLIMIT_NOFILE) so that no peer can take them all. A reserve is kept for
// what must always work: a new Service's listener, reconnecting to the API
// server, the health and metrics servers; Other and Pipes are held back for
// the parts with bounds of their own (the DNS stub, the splice pipes); what is left goes, a
// quarter to UDP sessions (one descriptor each) and the rest to proxied TCP
// connections.
type FDBudget struct {
	Limit          int // RLIMIT_NOFILE, raised to its hard limit
	Reserve        int // never handed to peers
	Other          int // held for parts with bounds of their own
	Pipes          int // the splice pipe pool's bound (Config.MaxPipes), two descriptors each
	UDPSessions    int // the UDP session bound it leaves room for
	TCPConnections int // the TCP connection bound it leaves room for
}

// NewFDBudget raises RLIMIT_NOFILE to its hard limit (Go's runtime does so
// too, at start) and divides it, keeping other descriptors for parts with
// bounds of their own.
func NewFDBudget(other int) (FDBudget, error) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return FDBudget{}, fmt.Errorf("read the open file limit: %w", err)
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
			return FDBudget{}, fmt.Errorf("raise the open file limit to %d: %w", lim.Max, err)
		}
	}
	return budgetFor(int(min(lim.Cur, 1<<30)), other), nil
}

// budgetFor divides limit descriptors.
func budgetFor(limit, other int) FDBudget {
	b := FDBudget{Limit: limit, Reserve: max(1024, limit/4), Other: other}
	left := max(0, limit-b.Reserve-other)
	b.Pipes = min(DefaultMaxPipes, left/16) // an eighth of what is left
	left -= 2 * b.Pipes
	b.UDPSessions = min(DefaultUDPMaxSessions, left/4)
	b.TCPConnections = (left - b.UDPSessions) / fdsPerTCPConnection
	return b
}

// Fits reports whether tcp connections and udp sessions fit in the budget's
// share for peers.
func (b FDBudget) Fits(tcp, udp int) bool {
	return tcp*fdsPerTCPConnection+udp <= b.Limit-b.Reserve-b.Other-2*b.Pipes
}
