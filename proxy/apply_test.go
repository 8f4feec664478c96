package proxy

import (
	"errors"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/iptables"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/userspace"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/service"
)

// recorder stands in for the listeners, the frontend and the DNS stub of
// one apply, and writes down the order in which the apply loop calls them.
type recorder struct {
	steps    []string
	pointErr error // what point returns
}

func (r *recorder) Sync(s service.Snapshot, binds userspace.Binds) (map[service.Key][]netip.AddrPort, error) {
	r.steps = append(r.steps, "open")
	bound := map[service.Key][]netip.AddrPort{}
	for i := range s.Ports {
		bound[s.Ports[i].Key()] = binds(&s.Ports[i])
	}
	return bound, nil
}

func (r *recorder) CloseUnused() { r.steps = append(r.steps, "close") }

func (r *recorder) mode() Mode { return "recording" }
func (r *recorder) ipv6() bool { return true }
func (r *recorder) binds(*service.Port) []netip.AddrPort {
	return []netip.AddrPort{netip.MustParseAddrPort("0.0.0.0:40000")}
}
func (r *recorder) dnsListen(netip.Addr) netip.AddrPort { return netip.AddrPort{} }
func (r *recorder) point(service.Snapshot, map[service.Key][]netip.AddrPort, *dnsTarget) (bool, error) {
	r.steps = append(r.steps, "point")
	return true, r.pointErr
}
func (r *recorder) rules() ([]iptables.Rule, error) { return nil, nil }
func (r *recorder) resync()                         { r.steps = append(r.steps, "resync") }

func (r *recorder) name(service.Snapshot) { r.steps = append(r.steps, "name") }

func newRecordingProxier(t *testing.T, r *recorder) *proxier {
	t.Helper()
	hm, err := newHealthMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	log, _ := logtest.NewNullLogger()
	log.SetLevel(logrus.DebugLevel)
	return &proxier{log: log, listeners: r, front: r, names: r.name,
		health: &health{timeout: time.Minute, now: time.Now}, stats: &syncStats{metrics: hm}}
}

// TestApplyOrder pins the order of an apply: listeners open before anything
// points at them, names are given once the addresses they name work, and
// sockets close last. When pointing fails, nothing is named or closed: the
// rules still in the kernel may lead to any socket.
func TestApplyOrder(t *testing.T) {
	web := service.Port{Name: service.PortName{Namespace: "default", Name: "web"}, Protocol: service.TCP,
		ClusterIP: netip.MustParseAddr("10.96.0.10"), Port: 80, Endpoints: []netip.AddrPort{netip.MustParseAddrPort("10.244.1.2:8080")}}
	s, err := service.NewSnapshot([]service.Port{web})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name     string
		pointErr error
		want     []string
	}{
		{"point succeeds", nil, []string{"open", "point", "name", "close"}},
		{"point fails", errors.New("iptables-restore: exit status 1"), []string{"open", "point"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := &recorder{pointErr: tt.pointErr}
			p := newRecordingProxier(t, r)
			p.apply(s)
			if !slices.Equal(r.steps, tt.want) {
				t.Errorf("steps = %v; want %v", r.steps, tt.want)
			}
			if served := len(p.current.Ports) == 1; served != (tt.pointErr == nil) {
				t.Errorf("current snapshot has %d ports after the apply; want it replaced only when pointing worked", len(p.current.Ports))
			}
		})
	}
}
