package userspace

import (
	"sync"

	"golang.org/x/sys/unix"
)

// pipe is a kernel pipe that splice(2) moves bytes through: socket to
// pipe, pipe to socket, the bytes never in our memory. splice needs a pipe
// on one side of every call; there is no socket-to-socket splice.
type pipe struct {
	r, w int
	size int // its capacity: the most one splice from a socket moves
}

// pipeSize is the capacity asked for each pipe (F_SETPIPE_SZ), as Go's own
// splice does: 16 times the kernel's default, so that bulk costs a sixteenth
// of the system calls. The kernel allocates a pipe's pages only while
// bytes are in it. An unprivileged process may be held to
// fs.pipe-max-size; then the pipe keeps the size it got.
const pipeSize = 1 << 20

// pipePool lends pipes to the connections that are moving bulk right now.
// A connection holds no pipe while it is idle or moving small messages
// (those are copied through a buffer, see loop.go): it borrows one when a
// read fills its buffer, and gives it back, empty, as soon as its socket
// has nothing more to read. So the pipes in use follow the bulk transfers
// in flight, not the connections open; the pool keeps a few idle ones for
// the next burst and never opens more than max at once. When it is at
// max, a connection copies through its buffer instead: slower for bulk,
// never wrong.
//
// (io.Copy between two TCPConns splices too, through a pool of the
// runtime's that only a garbage collection shrinks: after a burst of
// connections the proxy held thousands of idle pipes, two descriptors
// each, for minutes.)
type pipePool struct {
	mu      sync.Mutex
	idle    []*pipe
	open    int // pipes open: idle and lent
	max     int
	maxIdle int
	closed  bool
	peak    int // the most open at once
	lends   int // pipes lent so far
}

// Bounds of the pipe pool: at most Config.MaxPipes open (two descriptors
// each, counted in FDBudget), DefaultMaxPipes unless set, and maxIdlePipes
// kept open while nobody uses them.
const (
	DefaultMaxPipes = 256
	maxIdlePipes    = 32
)

func newPipePool(max, maxIdle int) *pipePool {
	return &pipePool{max: max, maxIdle: maxIdle}
}

// get lends an empty pipe, or returns nil when max are open (or the
// kernel refuses a new one): the caller copies through a buffer.
func (pp *pipePool) get() *pipe {
	pp.mu.Lock()
	if n := len(pp.idle); n > 0 {
		p := pp.idle[n-1]
		pp.idle = pp.idle[:n-1]
		pp.lends++
		pp.mu.Unlock()
		return p
	}
	if pp.open >= pp.max || pp.closed {
		pp.mu.Unlock()
		return nil
	}
	pp.open++
	pp.lends++
	pp.peak = max(pp.peak, pp.open)
	pp.mu.Unlock()
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		pp.mu.Lock()
		pp.open--
		pp.mu.Unlock()
		return nil
	}
	size, err := unix.FcntlInt(uintptr(fds[1]), unix.F_SETPIPE_SZ, pipeSize)
	if err != nil {
		if size, err = unix.FcntlInt(uintptr(fds[1]), unix.F_GETPIPE_SZ, 0); err != nil {
			size = 64 << 10 // the kernel's default
		}
	}
	return &pipe{r: fds[0], w: fds[1], size: size}
}

// put takes back an empty pipe.
func (pp *pipePool) put(p *pipe) {
	pp.mu.Lock()
	if len(pp.idle) < pp.maxIdle && !pp.closed {
		pp.idle = append(pp.idle, p)
		pp.mu.Unlock()
		return
	}
	pp.open--
	pp.mu.Unlock()
	p.close()
}

// discard closes a pipe that may still hold bytes (its connection failed
// in the middle of a chunk): such a pipe must never be lent again.
func (pp *pipePool) discard(p *pipe) {
	pp.mu.Lock()
	pp.open--
	pp.mu.Unlock()
	p.close()
}

// pipeStats is what a pool has done, for tests and benchmarks.
type pipeStats struct{ open, lent, idle, peak, lends int }

func (pp *pipePool) stats() pipeStats {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	return pipeStats{open: pp.open, lent: pp.open - len(pp.idle), idle: len(pp.idle), peak: pp.peak, lends: pp.lends}
}

// close closes the idle pipes; those lent are closed when they come back.
func (pp *pipePool) close() {
	pp.mu.Lock()
	idle := pp.idle
	pp.idle, pp.closed = nil, true
	pp.open -= len(idle)
	pp.mu.Unlock()
	for _, p := range idle {
		p.close()
	}
}

func (p *pipe) close() {
	unix.Close(p.r)
	unix.Close(p.w)
}
