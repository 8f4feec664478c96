package userspace

import (
	"net/netip"
	"testing"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// TestCarriedListenersKeepTheirPorts: a second set of listeners that
// adopts the first one's sockets serves the same ports (so the rules that
// point at them stay right), a connection waiting in the queue when the
// first set stops is served by the second, and the first set's draining
// connection finishes on its own.
func TestCarriedListenersKeepTheirPorts(t *testing.T) {
	be := backend(t, echo)
	s := snap(t, tcpPort(be), udpPort(udpBackend(t, "pod")))
	tcpKey, udpKey := s.Ports[0].Key(), s.Ports[1].Key()
	if s.Ports[0].Protocol != service.TCP {
		tcpKey, udpKey = udpKey, tcpKey
	}
	old := newSet(t, Config{})
	addr := listen(t, old, s, tcpKey)
	inFlight := dialTCP(t, addr)
	if got := exchangeTCP(t, inFlight, "one"); got != "one" {
		t.Fatalf("through the old set: %q", got)
	}

	carried := old.Carry()
	if len(carried) != 2 {
		t.Fatalf("carried %v; want the TCP and the UDP socket", carried)
	}
	next := newSet(t, Config{})
	next.Adopt(carried)
	// A client arrives while the old set still accepts, another while
	// nobody does yet: both wait in the one queue if not accepted.
	queued := dialTCP(t, addr)
	bound, err := next.Sync(s, next.RedirectBinds)
	if err != nil {
		t.Fatal(err)
	}
	next.CloseUnused()
	if got := bound[tcpKey][0]; got.Port() != mustPort(t, addr) {
		t.Fatalf("the new set listens on %s; want the old port of %s", got, addr)
	}
	oldUDP, _ := old.Sync(s, old.RedirectBinds)
	if bound[udpKey][0].Port() != oldUDP[udpKey][0].Port() {
		t.Fatalf("UDP: new %s, old %s", bound[udpKey][0], oldUDP[udpKey][0])
	}
	old.StopAccepting()
	if got := exchangeTCP(t, queued, "two"); got != "two" {
		t.Fatalf("the queued connection: %q", got)
	}
	if got := exchangeTCP(t, inFlight, "three"); got != "three" {
		t.Fatalf("the old set's connection after it stopped accepting: %q", got)
	}
	after := dialTCP(t, addr)
	if got := exchangeTCP(t, after, "four"); got != "four" {
		t.Fatalf("a connection after the old set stopped: %q", got)
	}
	uc := dialUDP(t, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), bound[udpKey][0].Port()).String())
	if got := exchange(t, uc, []byte("five")); got != "pod" {
		t.Fatalf("UDP through the new set answered by %q", got)
	}
}

// TestAdoptedButUnwantedIsClosed: a carried socket whose Service is gone
// is closed by the first CloseUnused, so its port refuses.
func TestAdoptedButUnwantedIsClosed(t *testing.T) {
	be := backend(t, echo)
	s := snap(t, tcpPort(be))
	old := newSet(t, Config{})
	addr := listen(t, old, s, s.Ports[0].Key())
	carried := old.Carry()
	old.Close()
	next := newSet(t, Config{})
	next.Adopt(carried)
	if _, err := next.Sync(snap(t), next.RedirectBinds); err != nil {
		t.Fatal(err)
	}
	next.CloseUnused()
	waitRefused(t, addr)
}

func mustPort(t *testing.T, addr string) uint16 {
	t.Helper()
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	return ap.Port()
}
