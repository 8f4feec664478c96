package userspace

import (
	"errors"
	"runtime"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// How the bytes of an established TCP connection cross the proxy.
//
// A proxied connection is two sockets: the client's, which we accepted,
// and ours to the pod. Once both exist (tcp.go), they are handed to a loop:
// one goroutine, locked to its thread, that waits in epoll_wait for any of
// its connections' sockets to become readable or writable and then moves
// what it can, without blocking, for every socket that woke. The proxy runs
// one loop per core. This is how HAProxy and nginx carry bytes, and it is
// much cheaper than a goroutine per direction on a small node: a wakeup
// across cores costs tens of microseconds in a VM, and a loop that finds
// several sockets ready serves them all in one wakeup, where goroutines
// would each be woken, scheduled and parked on their own. An idle
// connection costs its two sockets and a few hundred bytes here: no
// goroutine, no buffer, no pipe.
//
// Each direction (client to pod, pod to client) decides by what it sees how
// to move its bytes, as HAProxy's splice-auto does. Small messages (an HTTP
// request, its short reply, a query) are read into a buffer and written
// out: two system calls. A read that fills the buffer means bulk is
// arriving, and the next reads splice(2): the bytes go from the socket into
// a kernel pipe borrowed from a pool (pipePool) and from the pipe into the
// other socket, 64 KiB at a time, never copied into our memory. A splice
// that moves less than a buffer's worth means the burst is over and the
// direction goes back to the buffer. The buffer and the pipe go back the
// moment a direction has nothing left to move.
//
// The sockets are registered edge-triggered: epoll says once that a socket
// became readable (or writable), and the loop remembers it (canRead,
// canWrite) until a call finds it empty (EAGAIN). A read that returns less
// than it asked for has emptied the socket too, so the loop does not spend
// a system call on an EAGAIN to learn it: any byte arriving later wakes
// epoll again. (Not after the peer's FIN, whose event came with the bytes:
// then the loop reads on until EOF.)
//
// How a connection ends is passed on as it happened. A FIN (EOF on one
// socket) is forwarded as a FIN: the write side of the other socket is
// shut and the other direction goes on, so a client that sends its request
// and shuts its write side still gets the whole reply. An error (a RST from
// either peer, a write that fails) resets both sockets (SO_LINGER 0): a
// truncated transfer must never look complete to the other side. A
// connection that has moved no byte either way for Config.TCPIdleTimeout,
// or for Config.HalfCloseTimeout once one direction has finished
// (kubernetes#18354), is reset too; the loop checks every tick.

// bufSize is the buffer a direction reads small messages into, and the
// size of read that counts as bulk. HAProxy's default bufsize too.
const bufSize = 16 << 10

// buffers are shared by every direction of every connection; a direction
// holds one only while bytes it read are on their way out.
var buffers = sync.Pool{New: func() any { return new([bufSize]byte) }}

// loop carries the sockets handed to it: established TCP connections, and
// UDP service sockets with their sessions (udp.go). Only its own goroutine
// touches those sockets and their state; other goroutines add entries
// (add) and ask it to run things (post, do).
type loop struct {
	pipes *pipePool
	epfd  int
	wake  int           // an eventfd: commands are waiting
	tick  time.Duration // how often idle entries are looked for

	mu       sync.Mutex
	slots    []slot // by slot number; a free slot has no entry
	free     []int32
	cmds     []func(*loop)
	stopped  bool
	stopping bool // set by the stop command, on the loop's goroutine

	dialing []*tcpConn // connections whose dial is under way, for their deadlines

	now   time.Time // when epoll_wait last returned
	again []entry   // stopped by their fair share with more to move: served again before the next wait
	udp   udpBatch  // the buffers UDP datagrams are read into, one socket at a time
}

// entry is what a loop carries: a TCP connection, a UDP service socket, a
// UDP session. Its methods run on the loop's goroutine.
type entry interface {
	// event handles what epoll said of the entry's socket side.
	event(l *loop, side int, events uint32)
	// resume goes on with work cut short by the fair share.
	resume(l *loop)
	// tick is called every loop tick: an idle entry ends itself.
	tick(l *loop)
	// stop ends the entry: the loop is stopping.
	stop(l *loop)
}

type slot struct {
	e   entry
	gen int32 // which use of the slot: stale events carry an older one
}

// key is the epoll key of side of the entry in slot; wakeKey is the
// eventfd's.
func key(slot int32, side int) int32 { return slot<<1 | int32(side) }

const wakeKey = -1

// fairShare is how many reads one entry makes per turn: a stream that
// never lets its socket run dry must not starve the loop's other
// connections (edge-triggered epoll would not mention it again, so the
// loop keeps it on its again list).
const fairShare = 16

func newLoop(pipes *pipePool, tick time.Duration) (*loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	wake, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(epfd)
		return nil, err
	}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wake, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: wakeKey}); err != nil {
		unix.Close(epfd)
		unix.Close(wake)
		return nil, err
	}
	return &loop{pipes: pipes, epfd: epfd, wake: wake, tick: tick}, nil
}

// add registers e, whose sockets are fds (side 0, side 1...), for events
// (edge-triggered). set is called first, under the loop's lock, with e's
// slot and generation, so e knows them before any event; from the moment
// add returns, the loop may call e. It reports false, having registered
// nothing, when the loop has stopped or epoll refuses a socket.
func (l *loop) add(e entry, events uint32, set func(slot, gen int32), fds ...int) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped {
		return false
	}
	var n int32
	if k := len(l.free); k > 0 {
		n = l.free[k-1]
		l.free = l.free[:k-1]
	} else {
		n = int32(len(l.slots))
		l.slots = append(l.slots, slot{})
	}
	l.slots[n].e = e
	l.slots[n].gen++
	set(n, l.slots[n].gen)
	for side, fd := range fds {
		ev := unix.EpollEvent{Events: events | unix.EPOLLET, Fd: key(n, side), Pad: l.slots[n].gen}
		if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
			for _, added := range fds[:side] {
				unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, added, nil)
			}
			l.slots[n].e = nil
			l.free = append(l.free, n)
			return false
		}
	}
	return true
}

// remove frees the slot of an entry that has ended; its sockets are closed
// already, which took them out of the epoll set.
func (l *loop) remove(n int32) {
	l.mu.Lock()
	l.slots[n].e = nil
	l.free = append(l.free, n)
	l.mu.Unlock()
}

// post asks the loop to run f on its goroutine, from any goroutine.
func (l *loop) post(f func(*loop)) {
	l.mu.Lock()
	first := len(l.cmds) == 0
	l.cmds = append(l.cmds, f)
	l.mu.Unlock()
	if first {
		one := [8]byte{1}
		unix.Write(l.wake, one[:])
	}
}

// do runs f on the loop's goroutine and waits for it, or runs it here if
// the loop has stopped (then nothing else touches the loop's entries).
func (l *loop) do(f func(*loop)) {
	l.mu.Lock()
	stopped := l.stopped
	l.mu.Unlock()
	if stopped {
		f(l)
		return
	}
	done := make(chan struct{})
	l.post(func(l *loop) {
		defer close(done)
		f(l)
	})
	<-done
}

// run is the loop's goroutine, until a stop command.
func (l *loop) run() {
	runtime.LockOSThread() // the thread ends with the goroutine
	defer func() {
		unix.Close(l.epfd)
		unix.Close(l.wake)
	}()
	events := make([]unix.EpollEvent, 256)
	l.now = time.Now()
	nextTick := l.now.Add(l.tick)
	for {
		wake := nextTick
		if d := l.dials(); d.Before(wake) {
			wake = d
		}
		timeout := int(max(0, wake.Sub(l.now).Milliseconds()+1))
		if len(l.again) > 0 {
			timeout = 0 // only collect what is ready meanwhile
		}
		n, err := unix.EpollWait(l.epfd, events, timeout)
		if err != nil && !errors.Is(err, unix.EINTR) {
			panic("epoll_wait: " + err.Error()) // only a bad epoll fd or buffer: a bug
		}
		l.now = time.Now()
		for _, ev := range events[:max(n, 0)] {
			if ev.Fd == wakeKey {
				if l.commands() {
					return
				}
				continue
			}
			if e := l.lookup(ev); e != nil {
				e.event(l, int(ev.Fd&1), ev.Events)
			}
		}
		again := l.again
		l.again = nil
		for _, e := range again {
			e.resume(l)
		}
		if !l.now.Before(nextTick) {
			l.ticks()
			nextTick = l.now.Add(l.tick)
		}
	}
}

// dials gives up the dial attempts past their deadline, going on to the
// next endpoint, and returns the next deadline (or a time far off).
func (l *loop) dials() time.Time {
	live := l.dialing[:0]
	var late []*tcpConn
	next := l.now.Add(time.Hour)
	for _, c := range l.dialing {
		switch {
		case c.ended || !c.connecting:
			continue // done: off the list
		case !l.now.Before(c.dialDeadline):
			late = append(late, c)
		default:
			if c.dialDeadline.Before(next) {
				next = c.dialDeadline
			}
		}
		live = append(live, c)
	}
	clear(l.dialing[len(live):])
	l.dialing = live
	for _, c := range late {
		c.dialFailed(c.endpoint, errDialTimeout)
		l.redial(c)
		if c.connecting && !c.ended && c.dialDeadline.Before(next) {
			next = c.dialDeadline
		}
	}
	return next
}

// errDialTimeout is a dial attempt that outlived its timeout.
var errDialTimeout = errors.New("i/o timeout")

// connectDone handles the end of c's dial attempt, which epoll reports as
// the socket becoming writable (or failing).
func (l *loop) connectDone(c *tcpConn) {
	errno, err := unix.GetsockoptInt(c.fds[fromBackend], unix.SOL_SOCKET, unix.SO_ERROR)
	switch {
	case err != nil:
		c.dialFailed(c.endpoint, err)
	case errno != 0:
		c.dialFailed(c.endpoint, unix.Errno(errno))
	default:
		c.connected()
		return
	}
	l.redial(c)
}

// redial starts c's next dial attempt, or resets the client when none is
// left.
func (l *loop) redial(c *tcpConn) {
	c.redialAt = l.now
	if !c.dialNext(l.now) {
		c.dropped()
		l.end(c, true)
		return
	}
	ev := unix.EpollEvent{Events: tcpEvents | unix.EPOLLET, Fd: key(c.slot, fromBackend), Pad: c.gen}
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, c.fds[fromBackend], &ev); err != nil {
		c.dialFailed(c.endpoint, err)
		l.redial(c)
	}
}

// lookup is the entry an event is for, or nil if it has ended.
func (l *loop) lookup(ev unix.EpollEvent) entry {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := ev.Fd >> 1
	if int(n) >= len(l.slots) || l.slots[n].gen != ev.Pad {
		return nil
	}
	return l.slots[n].e
}

// commands runs what other goroutines asked for. It reports whether the
// loop must stop; stopping ends whatever is still open.
func (l *loop) commands() (stop bool) {
	var buf [8]byte
	unix.Read(l.wake, buf[:])
	l.mu.Lock()
	cmds := l.cmds
	l.cmds = nil
	l.mu.Unlock()
	for _, f := range cmds {
		f(l)
	}
	if !l.stopping {
		return false
	}
	l.mu.Lock()
	l.stopped = true
	cmds = l.cmds // posted after the stop: run here, nothing will wake for them
	l.cmds = nil
	l.mu.Unlock()
	for _, f := range cmds {
		f(l)
	}
	for _, e := range l.entries() {
		e.stop(l)
	}
	return true
}

// stop asks the loop to end everything it carries and return.
func (l *loop) stop() {
	l.post(func(l *loop) { l.stopping = true })
}

// entries are the entries the loop carries now.
func (l *loop) entries() []entry {
	l.mu.Lock()
	defer l.mu.Unlock()
	es := make([]entry, 0, len(l.slots)-len(l.free))
	for _, s := range l.slots {
		if s.e != nil {
			es = append(es, s.e)
		}
	}
	return es
}

// ticks lets every entry end itself if it has been idle too long.
func (l *loop) ticks() {
	for _, e := range l.entries() {
		e.tick(l)
	}
}

// queue puts e on the again list, once.
func (l *loop) queue(e entry, queued *bool) {
	if !*queued {
		*queued = true
		l.again = append(l.again, e)
	}
}

// event: epoll's news of one socket of the connection. Both directions
// may move now: one reads this socket, the other writes it.
func (c *tcpConn) event(l *loop, side int, events uint32) {
	if c.connecting && side == fromBackend {
		if c.redialAt == l.now {
			// Harvested before this attempt's socket existed: the
			// news of the one it replaced.
			return
		}
		l.connectDone(c)
		if c.connecting || c.ended {
			return // the next attempt is under way, or none was left
		}
	}
	if events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		c.canRead[side] = true
	}
	if events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		c.drain[side] = true
	}
	if events&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		c.canWrite[side] = true
	}
	l.pump(c, side)
	l.pump(c, 1-side)
}

func (c *tcpConn) resume(l *loop) {
	c.queued = false
	l.pump(c, toBackend)
	l.pump(c, fromBackend)
}

func (c *tcpConn) tick(l *loop) {
	if c.expired(l.now) {
		l.end(c, true)
	}
}

func (c *tcpConn) stop(l *loop) { l.end(c, true) }

// pump moves what it can of direction d of c without blocking: the bytes
// read earlier and not yet written, then new bytes as long as its source
// has some and its destination takes them.
func (l *loop) pump(c *tcpConn, d int) {
	if c.connecting {
		return // the client's bytes wait in its socket until the pod's is connected
	}
	f := &c.dirs[d]
	src, dst := c.fds[d], c.fds[1-d]
	for reads := 0; !c.ended && !f.finished; {
		if f.start < f.end { // bytes waiting to go out
			if !c.canWrite[1-d] {
				return // epoll says when dst takes more
			}
			n, err := f.write(dst)
			switch {
			case err == unix.EAGAIN:
				c.canWrite[1-d] = false
				return
			case err != nil:
				l.end(c, true)
				return
			}
			f.start += n
			f.moved += int64(n)
			c.active = l.now
			continue
		}
		if !c.canRead[d] {
			f.release(l.pipes) // nothing in flight: hold nothing while waiting
			return
		}
		if reads++; reads > fairShare {
			l.queue(c, &c.queued)
			return
		}
		n, err := f.read(src, l.pipes)
		switch {
		case err == unix.EAGAIN:
			c.canRead[d] = false
			f.release(l.pipes)
			return
		case err != nil:
			l.end(c, true)
			return
		case n == 0: // EOF: the peer's FIN, forwarded as ours
			f.release(l.pipes)
			f.finished = true
			if c.dirs[1-d].finished {
				l.end(c, false) // the close sends our FIN
				return
			}
			if unix.Shutdown(dst, unix.SHUT_WR) != nil {
				l.end(c, true)
				return
			}
			c.active = l.now // the other direction's half-close period starts now
			return
		}
		f.start, f.end = 0, n
		f.bulk = n >= bufSize
		if !f.bulk && !c.drain[d] {
			c.canRead[d] = false // a short read emptied the socket
		}
	}
}

// end closes both sockets of c, with a reset unless both directions ended
// cleanly, and reports its end.
func (l *loop) end(c *tcpConn, reset bool) {
	if c.ended {
		return
	}
	c.ended = true
	for side, fd := range c.fds {
		switch {
		case fd < 0:
		case reset:
			resetClose(fd) // which takes it out of the epoll set too
		default:
			unix.Close(fd)
		}
		c.dirs[side].drop(l.pipes)
	}
	l.remove(c.slot)
	c.over(c.dirs[toBackend].moved, c.dirs[fromBackend].moved)
}

// flow is one direction of a connection: bytes read from its source
// socket, on their way to the other one.
type flow struct {
	buf        *[bufSize]byte // borrowed from buffers, or nil
	pipe       *pipe          // borrowed from the pool, or nil
	start, end int            // bytes start..end of buf, or of what the pipe holds, are still to be written
	inPipe     bool           // the bytes in flight are in the pipe
	bulk       bool           // the last read filled a buffer: splice the next one
	noSplice   bool           // the kernel refused to splice this socket
	finished   bool           // its FIN was forwarded
	moved      int64          // bytes written to the destination
}

// read reads from fd into the buffer, or, while the direction moves bulk,
// splices into a pipe. It returns the bytes read, 0 at EOF.
func (f *flow) read(fd int, pipes *pipePool) (int, error) {
	if f.bulk && !f.noSplice {
		if f.pipe == nil {
			f.pipe = pipes.get() // nil: the pool is at its bound, copy this one
		}
		if f.pipe != nil {
			n, err := rawSplice(fd, f.pipe.w, f.pipe.size)
			if err != unix.EINVAL {
				f.inPipe = true
				return n, err
			}
			f.noSplice = true // nothing was read: read it into the buffer
		}
	}
	if f.pipe != nil {
		pipes.put(f.pipe) // empty: every pipe is drained before the next read
		f.pipe = nil
	}
	if f.buf == nil {
		f.buf = buffers.Get().(*[bufSize]byte)
	}
	f.inPipe = false
	return rawRW(unix.SYS_READ, fd, f.buf[:])
}

// write writes what is in flight to fd, or as much of it as fd takes.
func (f *flow) write(fd int) (int, error) {
	if f.inPipe {
		return rawSplice(f.pipe.r, fd, f.end-f.start)
	}
	return rawRW(unix.SYS_WRITE, fd, f.buf[f.start:f.end])
}

// release gives back the buffer and the pipe of a direction with nothing
// in flight (so the pipe is empty).
func (f *flow) release(pipes *pipePool) {
	if f.buf != nil {
		buffers.Put(f.buf)
		f.buf = nil
	}
	if f.pipe != nil {
		pipes.put(f.pipe)
		f.pipe = nil
	}
}

// drop gives back what a direction holds when its connection ends: the
// buffer, and the pipe closed if it may still hold bytes.
func (f *flow) drop(pipes *pipePool) {
	if f.pipe != nil && f.inPipe && f.start < f.end {
		pipes.discard(f.pipe)
		f.pipe = nil
	}
	f.release(pipes)
}

// The loop's reads, writes and splices are raw system calls: they never
// block (every descriptor is non-blocking), so the Go scheduler need not
// know of them. A call through syscall.Syscall would tell it, and one that
// the kernel stretched (the write woke the peer, which took our CPU for a
// while) could then lose the loop its P to sysmon and cost a thread
// handoff to get it back.

// raw makes system call trap without telling the scheduler, again when a
// signal interrupted it (EINTR).
func raw(trap, a1, a2, a3, a4, a5, a6 uintptr) (uintptr, error) {
	for {
		r, _, errno := unix.RawSyscall6(trap, a1, a2, a3, a4, a5, a6)
		switch errno {
		case 0:
			return r, nil
		case unix.EINTR:
			continue
		}
		return 0, errno
	}
}

// rawRW is read(2) or write(2) on fd.
func rawRW(trap uintptr, fd int, p []byte) (int, error) {
	n, err := raw(trap, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(len(p)), 0, 0, 0)
	return int(n), err
}

// rawSplice moves up to n bytes from in to out without blocking; one of
// them is a pipe.
func rawSplice(in, out, n int) (int, error) {
	m, err := raw(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(n), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
	return int(m), err
}
