package integration

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"testing"
)

// TestForwardIntoNamespace: a server on this process's loopback answers,
// through lab.Forward, clients inside a lab namespace, every time.
func TestForwardIntoNamespace(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, "root") })}
	go srv.Serve(ln)
	defer srv.Close()
	l := newLab(t)
	port, err := l.Forward(l.Node, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		got, err := l.Node.Curl(context.Background(), fmt.Sprintf("http://127.0.0.1:%d/", port))
		if err != nil || got != "root" {
			t.Fatalf("request %d through the forward: %q, %v", i, got, err)
		}
	}
}
