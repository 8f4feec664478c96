// Package handoff carries listening sockets from a running proxy to the
// one that replaces it, so that an upgrade drops no connection.
//
// A listening socket is a queue in the kernel: connections the kernel has
// accepted (the handshake is done) wait in it until a process calls
// accept. When a proxy stops and a new one opens new sockets, every
// connection that arrives in between is refused, and every one still in
// the old queue is reset. Passing the socket itself over a unix socket
// (SCM_RIGHTS) gives the new process a descriptor of the very same queue:
// both processes can accept from it, and when the old one closes its
// descriptor, the queue lives on in the new one. No port changes, so the
// iptables rules that point at the old listeners stay right.
//
// The old process serves (Listen, Serve) on a unix socket at a path both
// see (a hostPath directory in a DaemonSet); the new one connects (Take)
// before it opens anything. The exchange is SOCK_SEQPACKET: each message is a
// JSON list of names with the descriptors of the same sockets attached,
// at most maxPerMessage at a time, the last one marked; the new process
// answers "taken" once it holds them all.
package handoff

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/backoff"
)

// Socket is a listening socket's descriptor and the name its owner knows
// it by, such as "TCP default/web:http 0.0.0.0:0" or "healthz
// 0.0.0.0:10256". A raw descriptor, not an *os.File: asking an os.File for
// its descriptor makes the socket blocking, for every process that shares
// it, and the proxy's event loops need it non-blocking.
type Socket struct {
	Name string
	FD   int
}

// maxPerMessage is how many descriptors one message carries: the kernel
// takes at most 253 (SCM_MAX_FD).
const maxPerMessage = 200

// maxMessage bounds one message's JSON: 200 names of a Service port key
// and an address each.
const maxMessage = 256 << 10

type message struct {
	Names []string `json:"names"`
	Last  bool     `json:"last"`
}

const taken = "taken"

// Listener is the running proxy's end of the hand-over: a unix socket
// that new processes connect to.
type Listener struct {
	ln   *net.UnixListener
	path string
}

// Listen makes the hand-over socket at path, replacing a stale socket
// file from an earlier process (whoever served there has handed over
// already, Take having run first, or is gone).
func Listen(path string) (*Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("hand-over socket %s: %w", path, err)
	}
	os.Remove(path)
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("hand-over socket %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false) // a successor may have bound the path again
	os.Chmod(path, 0o600)
	return &Listener{ln: ln, path: path}, nil
}

// Serve hands the sockets that list returns to each process that
// connects, as the same user, until ctx is done, and then closes l. After
// each complete hand-over, handed is called with the number handed over.
// list gives Serve descriptors of its own (dup'd: a socket the owner
// closes meanwhile must not become another file under the same number),
// which Serve closes once sent.
func (l *Listener) Serve(ctx context.Context, list func() []Socket, handed func(n int)) {
	stop := context.AfterFunc(ctx, func() { l.ln.Close() })
	defer stop()
	defer l.ln.Close()
	failures := 0
	for {
		c, err := l.ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// EMFILE and the like: wait and try again, never spin.
			time.Sleep(backoff.Accept(failures))
			failures++
			continue
		}
		failures = 0
		socks := list()
		n, err := give(c, socks)
		for _, s := range socks {
			unix.Close(s.FD)
		}
		c.Close()
		if err == nil {
			handed(n)
		}
	}
}

// give sends socks over c, then waits for the taker's word.
func give(c *net.UnixConn, socks []Socket) (int, error) {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := samePeer(c); err != nil {
		return 0, err
	}
	for start := 0; ; start += maxPerMessage {
		end := min(start+maxPerMessage, len(socks))
		m := message{Last: end == len(socks)}
		var fds []int
		for _, s := range socks[start:end] {
			m.Names = append(m.Names, s.Name)
			fds = append(fds, s.FD)
		}
		data, _ := json.Marshal(m)
		var oob []byte
		if len(fds) > 0 {
			oob = unix.UnixRights(fds...)
		}
		if _, _, err := c.WriteMsgUnix(data, oob, nil); err != nil {
			return 0, err
		}
		if m.Last {
			break
		}
	}
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if err != nil || string(buf[:n]) != taken {
		return 0, fmt.Errorf("the new process did not confirm: %v", err)
	}
	return len(socks), nil
}

// samePeer refuses a peer that is not the same user as this process: only
// a proxy of the same node agent may take its sockets.
func samePeer(c *net.UnixConn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	raw.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	if cerr != nil {
		return cerr
	}
	if int(cred.Uid) != os.Geteuid() {
		return fmt.Errorf("peer pid %d is user %d, not %d", cred.Pid, cred.Uid, os.Geteuid())
	}
	return nil
}

// Take connects to the proxy serving at path and receives its sockets.
// It returns none, and no error, when nobody serves there: the first
// start on a node, or after a crash.
func Take(path string, timeout time.Duration) ([]Socket, error) {
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("hand-over socket %s: %w", path, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	var socks []Socket
	fail := func(err error) ([]Socket, error) {
		for _, s := range socks {
			unix.Close(s.FD)
		}
		return nil, fmt.Errorf("taking the sockets over from %s: %w", path, err)
	}
	buf := make([]byte, maxMessage)
	oob := make([]byte, unix.CmsgSpace(maxPerMessage*4))
	for {
		n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
		if err != nil {
			return fail(err)
		}
		var fds []int
		if oobn > 0 {
			cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn])
			if err != nil {
				return fail(err)
			}
			for _, cm := range cmsgs {
				got, err := unix.ParseUnixRights(&cm)
				if err != nil {
					return fail(err)
				}
				fds = append(fds, got...)
			}
		}
		var m message
		jerr := json.Unmarshal(buf[:n], &m)
		switch {
		case flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || jerr != nil || len(m.Names) != len(fds):
			for _, fd := range fds {
				unix.Close(fd)
			}
			return fail(fmt.Errorf("a malformed message (%d names, %d descriptors, flags %#x, %v)", len(m.Names), len(fds), flags, jerr))
		}
		for i, fd := range fds {
			unix.CloseOnExec(fd)
			socks = append(socks, Socket{Name: m.Names[i], FD: fd})
		}
		if m.Last {
			break
		}
	}
	if _, err := c.Write([]byte(taken)); err != nil {
		return fail(err)
	}
	return socks, nil
}
