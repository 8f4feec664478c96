package service

import (
	"net/netip"
	"testing"
)

func TestPortNameString(t *testing.T) {
	for _, tt := range []struct {
		n    PortName
		want string
	}{
		{PortName{"default", "web", "http"}, "default/web:http"},
		{PortName{"default", "web", ""}, "default/web"},
	} {
		if got := tt.n.String(); got != tt.want {
			t.Errorf("%#v.String() = %q, want %q", tt.n, got, tt.want)
		}
	}
}

func TestSnapshotSortsAndLooksUp(t *testing.T) {
	b := Port{Name: PortName{"default", "b", "http"}, Protocol: TCP}
	aUDP := Port{Name: PortName{"default", "a", "dns"}, Protocol: UDP}
	aTCP := Port{Name: PortName{"default", "a", "dns"}, Protocol: TCP}
	s, err := NewSnapshot([]Port{b, aUDP, aTCP})
	if err != nil {
		t.Fatal(err)
	}
	if s.Ports[0].Key() != aTCP.Key() || s.Ports[1].Key() != aUDP.Key() || s.Ports[2].Key() != b.Key() {
		t.Errorf("order = %v %v %v", s.Ports[0].Key(), s.Ports[1].Key(), s.Ports[2].Key())
	}
	for _, p := range []Port{aTCP, aUDP, b} {
		if got, ok := s.Lookup(p.Key()); !ok || got.Key() != p.Key() {
			t.Errorf("Lookup(%v) = %v, %v", p.Key(), got, ok)
		}
	}
	if _, ok := s.Lookup(Key{Name: PortName{"x", "y", ""}, Protocol: TCP}); ok {
		t.Error("Lookup of a missing key succeeded")
	}
	if _, err := NewSnapshot([]Port{b, b}); err == nil {
		t.Error("NewSnapshot accepted one key twice")
	}
}

func TestSameFrontends(t *testing.T) {
	a := Port{ClusterIP: netip.MustParseAddr("10.96.0.1"), Port: 80, Endpoints: []netip.AddrPort{netip.MustParseAddrPort("10.0.0.1:80")}}
	b := a
	b.Endpoints = nil
	if !SameFrontends(&a, &b) {
		t.Error("endpoints are not frontends")
	}
	b.NodePort = 30000
	if SameFrontends(&a, &b) {
		t.Error("a new NodePort is a new frontend")
	}
}
