package proxy

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"testing"
	"time"
)

// TestHTTPServersBounded: an idle keep-alive connection to /healthz is
// closed after the idle timeout, one that never sends its headers after the
// header timeout, and no more than the connection bound are served at
// once.
func TestHTTPServersBounded(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lim := defaultHTTPLimits
	lim.connections, lim.idle, lim.header = 2, 300*time.Millisecond, 300*time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	release := make(chan struct{})
	go func() {
		done <- serveHTTPWithin(ctx, ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/block" {
				<-release
			}
			io.WriteString(w, "ok")
		}), lim)
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	}()
	addr := ln.Addr().String()
	send := func(c net.Conn, path string) {
		io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: x\r\n\r\n")
	}
	answer := func(c net.Conn, within time.Duration) error {
		c.SetReadDeadline(time.Now().Add(within))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err == nil {
			resp.Body.Close()
		}
		return err
	}
	dial := func() net.Conn {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	// Two connections whose requests are being served take both places;
	// a third waits, unserved, until they are done and idle out.
	a, b := dial(), dial()
	send(a, "/block")
	send(b, "/block")
	third := dial()
	send(third, "/healthz")
	if err := answer(third, 300*time.Millisecond); err == nil {
		t.Fatal("a third connection was served while two requests held both places")
	}
	close(release)
	for _, c := range []net.Conn{a, b} {
		if err := answer(c, 10*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	// The idle timeout closes both and frees their places.
	for _, c := range []net.Conn{a, b} {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
			t.Errorf("idle keep-alive connection: read = %v; want EOF from the idle timeout", err)
		}
	}
	if err := answer(third, 10*time.Second); err != nil {
		t.Errorf("third connection once places were free: %v", err)
	}
	// A connection that never sends its headers is closed too.
	mute := dial()
	mute.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := mute.Read(make([]byte, 1)); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("a connection that sends nothing was still open after 10s")
	}
}
