package dnsstub

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
	"golang.org/x/net/netutil"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/backoff"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/logthrottle"
)

// Defaults of the flags that set the stub: --cluster-domain and --dns-ttl.
const (
	// DefaultDomain is kubelet's and kubeadm's cluster domain.
	DefaultDomain = "cluster.local"
	// DefaultTTL is CoreDNS's kubernetes plugin's.
	DefaultTTL = 5 * time.Second
)

// Config says what the stub answers and where it forwards the rest. Zero
// fields take the defaults their comments give.
type Config struct {
	// Domain is the cluster domain (--cluster-domain). Empty means
	// DefaultDomain.
	Domain string
	// TTL is the TTL of every record, 1s to 1h (--dns-ttl). Zero means
	// DefaultTTL.
	TTL time.Duration
	// Upstreams are the servers names outside the domain go to, as
	// host:port. Empty means none: such names get SERVFAIL.
	Upstreams []string
	// ForwardTimeout bounds one forwarded query over all upstreams. Zero
	// means 2s, so a client (5s by default) sees SERVFAIL, not a timeout.
	ForwardTimeout time.Duration
	// MaxConcurrentForwards bounds the queries waiting on an upstream at
	// once; beyond it a query is answered SERVFAIL at once and counted
	// (CoreDNS forward's max_concurrent). Zero means 1000, CoreDNS's
	// default. Each waiting query holds a goroutine and a socket.
	MaxConcurrentForwards int
	// MaxTCPConnections bounds the TCP connections served at once; more
	// wait in the kernel's accept queue. Zero means 1000.
	MaxTCPConnections int
	// PodRecords is how pod records are answered (--dns-pod-records).
	// Empty means PodsInsecure, as kubeadm's Corefile.
	PodRecords PodRecords
	// Registerer receives the stub's metrics. Nil means none.
	Registerer prometheus.Registerer
	// Log receives what cannot be returned. Nil discards it.
	Log logrus.FieldLogger
}

// Validate reports every setting of c that NewServer cannot take, each
// named by its flag.
func (c Config) Validate() error {
	var errs []error
	if d := c.Domain; d != "" {
		if _, ok := dns.IsDomainName(d); !ok || strings.Trim(d, ".") == "" {
			errs = append(errs, fmt.Errorf("--cluster-domain %q: not a domain name (want such as %s)", d, DefaultDomain))
		}
	}
	if c.TTL != 0 && (c.TTL < time.Second || c.TTL > time.Hour) {
		errs = append(errs, fmt.Errorf("--dns-ttl %s: want 1s to 1h", c.TTL))
	}
	if c.PodRecords != "" {
		if _, err := ParsePodRecords(string(c.PodRecords)); err != nil {
			errs = append(errs, err)
		}
	}
	for _, u := range c.Upstreams {
		if _, err := ParseUpstream(u); err != nil {
			errs = append(errs, err)
		}
	}
	if c.ForwardTimeout < 0 || c.MaxConcurrentForwards < 0 || c.MaxTCPConnections < 0 {
		errs = append(errs, fmt.Errorf("DNS stub bounds: forward timeout %s, %d forwards, %d TCP connections: want 0 (the default) or more", c.ForwardTimeout, c.MaxConcurrentForwards, c.MaxTCPConnections))
	}
	return errors.Join(errs...)
}

// Server is the DNS stub: a dns.Handler that answers from the current Zone.
// It is safe for concurrent use; SetZone swaps the zone whole.
type Server struct {
	origin  string
	ttl     time.Duration
	cfg     Config
	zone    atomic.Pointer[Zone]
	metrics *metrics
	log     logrus.FieldLogger
	// forwards holds a token for each query waiting on an upstream.
	forwards chan struct{}
	// podRecords is Config.PodRecords, defaulted.
	podRecords PodRecords
}

// NewServer returns a stub that answers SERVFAIL for the cluster domain
// until SetZone gives it a zone (a missing zone must not look like a missing
// name).
func NewServer(cfg Config) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.Domain = cmp.Or(cfg.Domain, DefaultDomain)
	cfg.TTL = cmp.Or(cfg.TTL, DefaultTTL)
	if cfg.ForwardTimeout == 0 {
		cfg.ForwardTimeout = 2 * time.Second
	}
	if cfg.MaxConcurrentForwards == 0 {
		cfg.MaxConcurrentForwards = 1000
	}
	if cfg.MaxTCPConnections == 0 {
		cfg.MaxTCPConnections = 1000
	}
	if cfg.PodRecords == "" {
		cfg.PodRecords = PodsInsecure
	}
	s := &Server{podRecords: cfg.PodRecords, origin: dns.Fqdn(strings.ToLower(cfg.Domain)), ttl: cfg.TTL, cfg: cfg, log: cfg.Log,
		forwards: make(chan struct{}, cfg.MaxConcurrentForwards)}
	if s.log == nil {
		s.log = nopLog()
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	s.metrics = m
	return s, nil
}

// Domain is the cluster domain the stub answers, as an FQDN.
func (s *Server) Domain() string { return s.origin }

// TTL is the record TTL.
func (s *Server) TTL() time.Duration { return s.ttl }

// SetZone makes z the zone answered from now on.
func (s *Server) SetZone(z *Zone) { s.zone.Store(z) }

// Serve answers queries on pc (UDP) and ln (TCP) until ctx is done. Either
// may be nil.
func (s *Server) Serve(ctx context.Context, pc net.PacketConn, ln net.Listener) error {
	var servers []*dns.Server
	if pc != nil {
		// UDPSize: miekg reads only 512 bytes of a UDP query by default;
		// EDNS0 queries may be larger.
		servers = append(servers, &dns.Server{PacketConn: pc, Handler: s, UDPSize: dns.MaxMsgSize})
	}
	if ln != nil {
		// MaxTCPQueries: miekg closes a TCP connection after 128 queries
		// by default; resolvers and caches keep theirs open. IdleTimeout
		// ends a connection that sends nothing for 10s.
		//
		// miekg's accept loop retries a temporary error (EMFILE) at once,
		// spinning a core, and returns on any other, which would stop the
		// whole proxy: our listener backs off and never fails but for
		// being closed, and serves a bounded number of connections.
		ln = netutil.LimitListener(&patientListener{Listener: ln, log: s.log, throttle: logthrottle.New(5 * time.Second)}, s.cfg.MaxTCPConnections)
		servers = append(servers, &dns.Server{Listener: ln, Handler: s, MaxTCPQueries: -1, IdleTimeout: func() time.Duration { return 10 * time.Second }})
	}
	errc := make(chan error, len(servers))
	var wg sync.WaitGroup
	for _, srv := range servers {
		wg.Go(func() { errc <- srv.ActivateAndServe() })
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	shutdown, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, srv := range servers {
		srv.ShutdownContext(shutdown)
	}
	// A server that had not started yet when ctx ended refuses Shutdown
	// ("server not started") and would then serve forever: closing its
	// socket ends it all the same.
	if pc != nil {
		pc.Close()
	}
	if ln != nil {
		ln.Close()
	}
	wg.Wait()
	return err
}

// ServeDNS answers one query.
func (s *Server) ServeDNS(w dns.ResponseWriter, r *dns.Msg) {
	start := time.Now()
	_, udp := w.RemoteAddr().(*net.UDPAddr)
	m := s.Answer(r, udp)
	qtype := uint16(0)
	if len(r.Question) == 1 {
		qtype = r.Question[0].Qtype
	}
	s.metrics.observe(qtype, m.Rcode, time.Since(start))
	if err := w.WriteMsg(m); err != nil {
		s.log.WithError(err).Debug("DNS reply not sent")
	}
}

// MaxUDPSize is the largest DNS reply sent over UDP, whatever buffer size
// the client's EDNS0 claims, and the size the stub advertises: the DNS flag
// day 2020 value, which fits an IPv6 packet on any path without
// fragmentation. A larger answer is truncated with TC set, and the client
// asks again over TCP. Without the cap a 60-byte query for a big headless
// Service drew a 32 KB reply: a 500-fold amplifier for spoofed sources.
const MaxUDPSize = 1232

// Answer returns the reply to r, fitted to the client's buffer when it came
// over UDP.
func (s *Server) Answer(r *dns.Msg, udp bool) *dns.Msg {
	m := s.answer(r)
	// Pods use the stub as their recursive resolver: it resolves what it
	// does not own through the upstreams. Saying so keeps stub resolvers
	// (nslookup, glibc) from warning or retrying elsewhere.
	m.RecursionAvailable = true
	size := dns.MaxMsgSize
	if udp {
		// The client's EDNS0 buffer, never below 512 and never above
		// MaxUDPSize; 512 without EDNS0.
		size = dns.MinMsgSize
		if opt := r.IsEdns0(); opt != nil {
			size = min(max(int(opt.UDPSize()), dns.MinMsgSize), MaxUDPSize)
		}
	}
	if opt := r.IsEdns0(); opt != nil {
		// The size we advertise is the size we honour, also in a reply
		// relayed from upstream, whose OPT spoke for the upstream.
		if own := m.IsEdns0(); own != nil {
			own.SetUDPSize(MaxUDPSize)
		} else {
			m.SetEdns0(MaxUDPSize, opt.Do())
		}
	}
	// Truncate keeps whole records only and sets TC when anything was
	// left out; the client then asks again over TCP.
	m.Truncate(size)
	return m
}

func (s *Server) answer(r *dns.Msg) *dns.Msg {
	m := new(dns.Msg)
	if len(r.Question) != 1 || r.Opcode != dns.OpcodeQuery || r.Response {
		return m.SetRcodeFormatError(r)
	}
	q := r.Question[0]
	name := strings.ToLower(q.Name)
	if q.Qclass != dns.ClassINET {
		return m.SetRcode(r, dns.RcodeRefused)
	}
	z := s.zone.Load()
	if inZone(name, s.origin) {
		if q.Qtype == dns.TypeAXFR || q.Qtype == dns.TypeIXFR {
			return m.SetRcode(r, dns.RcodeRefused)
		}
		if z == nil {
			// Not synced yet: say "try again", not "no such name".
			return m.SetRcode(r, dns.RcodeServerFailure)
		}
		return s.authoritative(r, z, name, q.Qtype)
	}
	if z != nil && q.Qtype == dns.TypePTR {
		if rrs, ok := z.reverse(name); ok {
			m.SetReply(r)
			m.Authoritative = true
			m.Answer = rrs
			return m
		}
	}
	// Everything else, including the reverse names of addresses that are
	// not ours, is somebody else's to answer.
	return s.forward(r)
}

// authoritative answers a question for a name in the cluster domain.
// NXDOMAIN means the name has no record of any type; a name that exists
// without the asked type gets NOERROR with no answer and the SOA (NODATA),
// so a resolver walking its search list does not stop there by mistake.
func (s *Server) authoritative(r *dns.Msg, z *Zone, name string, qtype uint16) *dns.Msg {
	m := new(dns.Msg)
	m.SetReply(r)
	m.Authoritative = true
	answer, exists, pod := z.pod(name, qtype, s.podRecords)
	if !pod {
		answer, exists = z.lookup(name, qtype)
	}
	switch {
	case !exists:
		m.Rcode = dns.RcodeNameError
		m.Ns = []dns.RR{z.soa}
	case len(answer) == 0:
		m.Ns = []dns.RR{z.soa}
	default:
		m.Answer = answer
		if cname, ok := answer[0].(*dns.CNAME); ok && (qtype == dns.TypeA || qtype == dns.TypeAAAA) {
			m.Answer = append(m.Answer, s.chase(r, z, cname.Target, qtype)...)
		}
	}
	return m
}

// chase resolves the target of an ExternalName alias, in the zone or
// upstream, so that a stub resolver gets an address and not only a CNAME.
func (s *Server) chase(r *dns.Msg, z *Zone, target string, qtype uint16) []dns.RR {
	target = strings.ToLower(target)
	if inZone(target, s.origin) {
		rrs, _ := z.lookup(target, qtype)
		return rrs
	}
	q := new(dns.Msg)
	q.SetQuestion(target, qtype)
	q.RecursionDesired = true
	reply := s.forward(q)
	if reply.Rcode != dns.RcodeSuccess {
		return nil
	}
	return reply.Answer
}

// patientListener is a net.Listener whose Accept never fails but for the
// listener being closed: any other error (too many open files, a connection
// reset before it was accepted) is retried after a backoff, from 5ms
// doubling to 1s, and logged at most once every 5s.
type patientListener struct {
	net.Listener
	log      logrus.FieldLogger
	throttle *logthrottle.Throttle
	// sleep waits d; nil means time.Sleep.
	sleep func(d time.Duration)
}

func (l *patientListener) Accept() (net.Conn, error) {
	for failures := 0; ; failures++ {
		c, err := l.Listener.Accept()
		if err == nil || errors.Is(err, net.ErrClosed) {
			return c, err
		}
		d := backoff.Accept(failures)
		l.throttle.Log(l.log.WithError(err).WithField("retryIn", d), func(e *logrus.Entry) { e.Warn("DNS stub: TCP accept failed; backing off") })
		if l.sleep != nil {
			l.sleep(d)
		} else {
			time.Sleep(d)
		}
	}
}

// nopLog is a logger that discards everything.
func nopLog() logrus.FieldLogger {
	l := logrus.New()
	l.SetLevel(logrus.PanicLevel)
	return l
}
