package handoff

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// listenFD opens a TCP listener on loopback and returns its own descriptor
// (a dup, as the proxy's listeners are raw descriptors) and its address.
func listenFD(t *testing.T) (int, string) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	raw, _ := ln.(*net.TCPListener).SyscallConn()
	var fd int
	var derr error
	raw.Control(func(f uintptr) { fd, derr = unix.Dup(int(f)) })
	if derr != nil {
		t.Fatal(derr)
	}
	return fd, ln.Addr().String()
}

// serve serves dups of socks at path until the returned stop is called,
// which waits for Serve to return. The socket listens once serve returns.
func serve(t *testing.T, path string, socks []Socket, handed func(int)) (stop func()) {
	t.Helper()
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		l.Serve(ctx, dups(t, socks), handed)
	}()
	return func() {
		cancel()
		<-done
	}
}

func dups(t *testing.T, socks []Socket) func() []Socket {
	return func() []Socket {
		var out []Socket
		for _, s := range socks {
			fd, err := unix.Dup(s.FD)
			if err != nil {
				t.Error(err)
			}
			out = append(out, Socket{Name: s.Name, FD: fd})
		}
		return out
	}
}

// TestQueuedConnectionSurvives: a connection that waits in the old
// process's accept queue when the sockets are handed over, and one made
// after the old process closed its descriptor, are both accepted by the
// taker, with their bytes: the queue itself moved.
func TestQueuedConnectionSurvives(t *testing.T) {
	path := filepath.Join(t.TempDir(), "handoff.sock")
	fd, addr := listenFD(t)
	queued, err := net.Dial("tcp4", addr) // waits in the queue: nobody accepts
	if err != nil {
		t.Fatal(err)
	}
	defer queued.Close()
	queued.Write([]byte("before"))

	handed := make(chan int, 1)
	stop := serve(t, path, []Socket{{Name: "TCP default/web:http 0.0.0.0:0", FD: fd}}, func(n int) { handed <- n })
	socks, err := Take(path, 5*time.Second)
	if err != nil || len(socks) != 1 || socks[0].Name != "TCP default/web:http 0.0.0.0:0" {
		t.Fatalf("Take: %v, %v; want the one socket", socks, err)
	}
	if n := <-handed; n != 1 {
		t.Errorf("handed %d, want 1", n)
	}
	stop()
	unix.Close(fd) // the old process lets go
	after, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatalf("a connection after the old process closed its descriptor: %v", err)
	}
	defer after.Close()
	after.Write([]byte("after"))

	ln, err := net.FileListener(os.NewFile(uintptr(socks[0].FD), "taken"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, want := range []string{"before", "after"} {
		c, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 16)
		n, err := c.Read(buf)
		c.Close()
		if err != nil || string(buf[:n]) != want {
			t.Errorf("accepted %q, %v; want %q", buf[:n], err, want)
		}
	}
}

// TestManySockets: more sockets than one message carries arrive whole,
// names and descriptors in step.
func TestManySockets(t *testing.T) {
	path := filepath.Join(t.TempDir(), "handoff.sock")
	var socks []Socket
	for range 2*maxPerMessage + 17 {
		pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := pc.(*net.UDPConn).SyscallConn()
		var fd int
		raw.Control(func(f uintptr) { fd, _ = unix.Dup(int(f)) })
		socks = append(socks, Socket{Name: fmt.Sprintf("UDP %s", pc.LocalAddr()), FD: fd})
		pc.Close()
	}
	defer func() {
		for _, s := range socks {
			unix.Close(s.FD)
		}
	}()
	defer serve(t, path, socks, func(int) {})()
	got, err := Take(path, 5*time.Second)
	if err != nil || len(got) != len(socks) {
		t.Fatalf("took %d sockets, %v; want %d", len(got), err, len(socks))
	}
	for i, s := range got {
		sa, _ := unix.Getsockname(s.FD)
		port := sa.(*unix.SockaddrInet4).Port
		if want := fmt.Sprintf("UDP 127.0.0.1:%d", port); s.Name != want {
			t.Errorf("socket %d is named %q but bound to %s", i, s.Name, want)
		}
		unix.Close(s.FD)
	}
}

// TestNobodyServes: with no proxy before this one, Take finds nothing,
// and says no error.
func TestNobodyServes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "handoff.sock")
	if socks, err := Take(path, time.Second); socks != nil || err != nil {
		t.Fatalf("Take with no file: %v, %v", socks, err)
	}
	// A file left by a process that is gone: refused, not an error.
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	if socks, err := Take(path, time.Second); socks != nil || err != nil {
		t.Fatalf("Take with a stale file: %v, %v", socks, err)
	}
}
