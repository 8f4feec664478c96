package dnsstub

import (
	"errors"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/logthrottle"
)

// silentUpstream is a UDP server that reads queries and never answers. Each
// query it reads is sent on the returned channel.
func silentUpstream(t *testing.T) (string, <-chan struct{}) {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan struct{}, 100)
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 512)
		for {
			if _, _, err := pc.ReadFrom(buf); err != nil {
				return
			}
			got <- struct{}{}
		}
	}()
	t.Cleanup(func() {
		pc.Close()
		<-done
	})
	return pc.LocalAddr().String(), got
}

// TestForwardsBounded: once MaxConcurrentForwards queries wait on a silent
// upstream, the next one is answered SERVFAIL at once, without being sent.
func TestForwardsBounded(t *testing.T) {
	up, seen := silentUpstream(t)
	reg := prometheus.NewRegistry()
	s, addr := stub(t, Config{Domain: domain, Upstreams: []string{up}, MaxConcurrentForwards: 2, ForwardTimeout: 5 * time.Second, Registerer: reg}, true)
	waiting := make(chan int, 2)
	for range 2 {
		go func() {
			r, _, err := (&dns.Client{Net: "udp", Timeout: 10 * time.Second}).Exchange(new(dns.Msg).SetQuestion("slow.example.org.", dns.TypeA), addr)
			if err != nil {
				waiting <- -1
				return
			}
			waiting <- r.Rcode
		}()
	}
	for range 2 {
		select {
		case <-seen:
		case <-time.After(10 * time.Second):
			t.Fatal("the upstream never saw the first two queries")
		}
	}
	r := ask(t, addr, "udp", "third.example.org.", dns.TypeA, 0)
	if r.Rcode != dns.RcodeServerFailure {
		t.Errorf("third query while two wait upstream: %s; want SERVFAIL", dns.RcodeToString[r.Rcode])
	}
	if n := testutil.ToFloat64(s.metrics.forwardsRefused); n != 1 {
		t.Errorf("forwards refused = %v, want 1", n)
	}
	select {
	case <-seen:
		t.Error("the third query was sent upstream")
	default:
	}
	// The two that waited end in SERVFAIL at the forward timeout, and
	// free their places.
	for range 2 {
		if rc := <-waiting; rc != dns.RcodeServerFailure {
			t.Errorf("a query to a silent upstream ended with %d; want SERVFAIL", rc)
		}
	}
}

// TestTCPConnectionsBounded: beyond MaxTCPConnections a new TCP
// connection waits, unserved, until one of the others closes.
func TestTCPConnectionsBounded(t *testing.T) {
	_, addr := stub(t, Config{Domain: domain, MaxTCPConnections: 2}, true)
	q := new(dns.Msg).SetQuestion("svc-test-1.default.svc."+domain+".", dns.TypeA)
	c := &dns.Client{Net: "tcp", Timeout: 10 * time.Second}
	var conns []*dns.Conn
	for i := range 2 {
		conn, err := c.Dial(addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, _, err := c.ExchangeWithConn(q, conn); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		conns = append(conns, conn)
	}
	third, err := net.Dial("tcp", addr) // the kernel completes the handshake
	if err != nil {
		t.Fatal(err)
	}
	defer third.Close()
	tc := &dns.Conn{Conn: third}
	if err := tc.WriteMsg(q); err != nil {
		t.Fatal(err)
	}
	third.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := tc.ReadMsg(); err == nil {
		t.Fatal("a third TCP connection was served while two were open; want it to wait")
	}
	conns[0].Close()
	third.SetReadDeadline(time.Now().Add(10 * time.Second))
	if r, err := tc.ReadMsg(); err != nil || len(r.Answer) != 1 {
		t.Fatalf("third connection after one closed: %v, %v; want its answer", r, err)
	}
}

// failingListener fails Accept with err n times, then hands out conn.
type failingListener struct {
	net.Listener
	err  error
	n    int
	conn net.Conn
}

func (l *failingListener) Accept() (net.Conn, error) {
	if l.n > 0 {
		l.n--
		return nil, l.err
	}
	return l.conn, nil
}

// TestAcceptBacksOff: accept errors are retried with a growing backoff,
// never returned (miekg would spin on a temporary one and stop the proxy
// on any other).
func TestAcceptBacksOff(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	var slept []time.Duration
	l := &patientListener{
		Listener: &failingListener{err: &net.OpError{Op: "accept", Err: syscall.EMFILE}, n: 10, conn: a},
		log:      nopLog(),
		throttle: logthrottle.New(time.Second),
		sleep:    func(d time.Duration) { slept = append(slept, d) },
	}
	c, err := l.Accept()
	if err != nil || c != a {
		t.Fatalf("Accept after 10 failures = %v, %v; want the connection", c, err)
	}
	want := []time.Duration{5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000}
	for i := range want {
		want[i] *= time.Millisecond
	}
	if len(slept) != len(want) {
		t.Fatalf("backoffs = %v, want %v", slept, want)
	}
	for i := range want {
		if slept[i] != want[i] {
			t.Fatalf("backoffs = %v, want %v", slept, want)
		}
	}
	closed := &patientListener{Listener: &failingListener{err: net.ErrClosed, n: 1}, log: nopLog(), throttle: logthrottle.New(time.Second)}
	if _, err := closed.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept on a closed listener = %v, want net.ErrClosed", err)
	}
}
