package userspace

import (
	"io"
	"testing"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// TestUse counts, by endpoint, the connections a listener holds and the
// clients pinned by affinity, read from the loops that carry them.
func TestUse(t *testing.T) {
	ls := newSet(t, Config{Loops: 2})
	ep := backend(t, echo)
	p := tcpPort(ep)
	p.Affinity = service.Affinity{ClientIP: true}
	addr := listen(t, ls, snap(t, p), p.Key())
	for range 3 {
		c := dialTCP(t, addr)
		// An echo proves the connection reached the endpoint.
		io.WriteString(c, "x")
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
	}
	u, ok := ls.Use(p.Key())
	if !ok {
		t.Fatal("no listener")
	}
	if u.Connections[ep] != 3 || u.Dialing != 0 || u.Pins[ep] != 1 || len(u.Sockets) != 1 {
		t.Errorf("Use = %+v; want 3 connections and 1 pin (one client IP) to %s, one socket", u, ep)
	}
	if _, ok := ls.Use(service.Key{Name: service.PortName{Namespace: "default", Name: "nope"}, Protocol: service.TCP}); ok {
		t.Error("Use of a port with no listener reported one")
	}
}
