package userspace

import (
	"errors"
	"io"
	"net"

	"golang.org/x/sys/unix"
)

// spliceChunk is the most one splice(2) call moves: a pipe's default
// capacity (16 pages).
const spliceChunk = 64 << 10

// pipe is a kernel pipe that one direction of one connection splices
// through: socket to pipe, pipe to socket, the bytes never in our memory.
// It is the connection's own, made when the direction starts and closed
// when it ends. (io.Copy between two TCPConns splices too, but through
// pipes from a pool of the runtime's, which only a garbage collection
// closes: after a burst of connections the proxy held thousands of idle
// pipes, two descriptors each, for minutes.)
type pipe struct{ r, w int }

func newPipe() (*pipe, error) {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return nil, err
	}
	return &pipe{r: fds[0], w: fds[1]}, nil
}

func (p *pipe) close() {
	unix.Close(p.r)
	unix.Close(p.w)
}

// splice moves bytes from src to dst through p until src's EOF (a nil
// error, as io.Copy), an error, or src's read deadline. It returns the
// bytes written to dst. The read deadline can only pass while the pipe is
// empty, between chunks: no byte read is ever lost. Without splice (a
// kernel or socket that refuses it), it copies through a buffer.
func splice(dst, src *net.TCPConn, p *pipe) (int64, error) {
	srcRC, err := src.SyscallConn()
	if err != nil {
		return 0, err
	}
	dstRC, err := dst.SyscallConn()
	if err != nil {
		return 0, err
	}
	var written int64
	for {
		// Socket to pipe: as much as the socket holds, up to a chunk.
		var n int64
		var serr error
		err := srcRC.Read(func(fd uintptr) bool {
			n, serr = unix.Splice(int(fd), nil, p.w, nil, spliceChunk, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			return !errors.Is(serr, unix.EAGAIN) && !errors.Is(serr, unix.EINTR)
		})
		switch {
		case err != nil: // the deadline, or the socket closed
			return written, err
		case errors.Is(serr, unix.EINVAL) && written == 0:
			return io.Copy(dst, src) // no splice here: src untouched so far
		case serr != nil:
			return written, &net.OpError{Op: "read", Net: "tcp", Source: src.LocalAddr(), Addr: src.RemoteAddr(), Err: serr}
		case n == 0:
			return written, nil // EOF
		}
		// Pipe to socket: all of it, however many calls that takes.
		for n > 0 {
			var m int64
			var werr error
			err := dstRC.Write(func(fd uintptr) bool {
				m, werr = unix.Splice(p.r, nil, int(fd), nil, int(n), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
				return !errors.Is(werr, unix.EAGAIN) && !errors.Is(werr, unix.EINTR)
			})
			if err != nil {
				return written, err
			}
			if werr != nil {
				return written, &net.OpError{Op: "write", Net: "tcp", Source: dst.LocalAddr(), Addr: dst.RemoteAddr(), Err: werr}
			}
			n -= m
			written += m
		}
	}
}
