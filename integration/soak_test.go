package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

// The soak: one lab, every kind of load at once, good and hostile, for
// SOAK_DURATION (10 minutes by default), and a report of what failed and
// what the proxy held. It is a measurement, not a timed test:
//
//	make soak                     # SOAK_DURATION=10m
//	SOAK_DURATION=2m make soak
//
// Two web pods serve svc-test-1 (never killed) and the flood Service; two
// more serve svc-churn and are killed and restarted in turn every few
// seconds, so only svc-churn's traffic may fail, and each such failure is
// counted as caused by a killed backend. Everything else must not fail.

// soakManifest is the story's Service, svc-churn, and the flood Service
// (NodePort 30090 TCP, 30091 UDP), with the churn pods; extra adds
// svc-extra, which the slow manifest writer toggles.
func soakManifest(churn []lab.WebPod, extra bool) string {
	story := lab.FirstStory()
	m := story.Manifest()
	svc := func(name, ip, selector, tcpNodePort, udpNodePort string) string {
		return fmt.Sprintf(`---
apiVersion: v1
kind: Service
metadata: {name: %s}
spec:
  type: NodePort
  clusterIP: %s
  selector: {app: %s}
  ports:
  - {name: http, port: 80, targetPort: web-port%s}
  - {name: echo, port: 5353, protocol: UDP, targetPort: udp-echo%s}
`, name, ip, selector, tcpNodePort, udpNodePort)
	}
	m += svc("svc-churn", "10.96.0.30", "churn", "", "")
	m += svc("flood", "10.96.0.40", "web-front-end", ", nodePort: 30090", ", nodePort: 30091")
	if extra {
		m += svc("svc-extra", "10.96.0.50", "web-front-end", "", "")
	}
	for _, w := range churn {
		m += strings.Replace(frontPod(w), "app: front", "app: churn", 1)
	}
	return m
}

// soakTally counts outcomes by kind of load and cause, safe for
// concurrent use.
type soakTally struct {
	mu      sync.Mutex
	counts  map[string]int64 // "kind | outcome"
	checked int64            // bytes compared with what was sent
}

func (s *soakTally) add(kind, outcome string, bytes int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.counts[kind+" | "+outcome]++
	s.checked += int64(bytes)
}

// sample is what the proxy holds at one moment.
type sample struct {
	rssMB      float64
	fds        int
	goroutines int
}

func BenchmarkSoak(b *testing.B) {
	duration := 10 * time.Minute
	if d, err := time.ParseDuration(os.Getenv("SOAK_DURATION")); err == nil {
		duration = d
	}
	for range b.N {
		soak(b, duration)
	}
}

func soak(b *testing.B, duration time.Duration) {
	ctx, stop := context.WithTimeout(context.Background(), duration)
	defer stop()
	l, client := benchLab(b)
	story := lab.FirstStory()
	for _, w := range story.Pods {
		if _, err := l.AddWeb(tools, w); err != nil {
			b.Fatal(err)
		}
	}
	churn := []lab.WebPod{lab.NewWebPod(5, "v1", 8080), lab.NewWebPod(6, "v1", 8080)}
	churnPods := make([]*lab.Pod, len(churn))
	churnProcs := make([]*lab.Proc, len(churn))
	var err error
	for i, w := range churn {
		if churnProcs[i], err = l.AddWeb(tools, w); err != nil {
			b.Fatal(err)
		}
		churnPods[i] = l.Pods[len(l.Pods)-1]
	}
	manifest := filepath.Join(b.TempDir(), "soak.yaml")
	if err := os.WriteFile(manifest, []byte(soakManifest(churn, false)), 0o644); err != nil {
		b.Fatal(err)
	}
	proxy, err := l.StartProxy(tools, manifest, "--cluster-dns", "10.96.0.10")
	if err != nil {
		b.Fatal(err)
	}
	greetings := map[string]bool{}
	for _, w := range append(story.Pods, churn...) {
		greetings[w.Greeting()] = true
	}

	tally := &soakTally{counts: map[string]int64{}}
	var samples []sample
	var samplesMu sync.Mutex
	measure := func() sample {
		s := sample{rssMB: rssMB(proxy.PID()), fds: openFDs(proxy.PID()), goroutines: goroutines(l)}
		samplesMu.Lock()
		samples = append(samples, s)
		samplesMu.Unlock()
		return s
	}
	start := measure()

	var wg sync.WaitGroup
	every := func(period time.Duration, f func()) {
		wg.Go(func() {
			t := time.NewTicker(period)
			defer t.Stop()
			for {
				f()
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
			}
		})
	}
	loop := func(n int, f func()) {
		for range n {
			wg.Go(func() {
				for ctx.Err() == nil {
					f()
				}
			})
		}
	}

	// Good traffic, checked byte for byte: the web server answers its
	// greeting, a newline, and the request body.
	keepAlive := soakHTTPClient(client, false)
	perRequest := soakHTTPClient(client, true)
	post := func(kind string, c *http.Client, url string) {
		body := make([]byte, 1024+int(randN(31*1024)))
		rand.Read(body)
		resp, err := c.Post(url, "application/octet-stream", bytes.NewReader(body))
		if err != nil {
			tally.add(kind, "error: "+errCause(err), 0)
			return
		}
		got, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		greeting, rest, _ := bytes.Cut(got, []byte("\n"))
		switch {
		case err != nil:
			tally.add(kind, "error: "+errCause(err), 0)
		case !greetings[string(greeting)] || !bytes.Equal(rest, body):
			tally.add(kind, "corrupted", 0)
		default:
			tally.add(kind, "ok", len(body))
		}
	}
	loop(2, func() { post("http keep-alive", keepAlive, "http://10.96.0.11/") })
	loop(2, func() { post("http per request", perRequest, "http://10.96.0.11/") })
	loop(1, func() { post("churn keep-alive (killed backends)", keepAlive, "http://10.96.0.30/") })
	loop(1, func() { post("churn per request (killed backends)", perRequest, "http://10.96.0.30/") })
	loop(1, func() { soakUDP(tally, client, "udp", "10.96.0.11:5353", greetings) })
	loop(1, func() { soakDNS(tally, client) })

	// Hostile traffic, from the other host.
	nodeAddr := func(port int) string { return net.JoinHostPort(lab.NodeIP.String(), strconv.Itoa(port)) }
	every(2*time.Millisecond, func() { // a UDP spray: a new source port each time
		if c, err := l.Ext.Dial("udp", nodeAddr(30091)); err == nil {
			c.Write([]byte("spray"))
			c.Close()
			tally.add("udp spray (hostile)", "sent", 0)
		}
	})
	var hostileMu sync.Mutex
	var hostile []net.Conn
	hold := func(c net.Conn) {
		hostileMu.Lock()
		hostile = append(hostile, c)
		hostileMu.Unlock()
	}
	wg.Go(func() { // a TCP flood of the flood Service, held open
		for i := 0; i < 1500 && ctx.Err() == nil; i++ {
			c, err := l.Ext.Dial("tcp", nodeAddr(30090))
			if err != nil {
				tally.add("tcp flood (hostile)", "refused: "+errCause(err), 0)
				continue
			}
			tally.add("tcp flood (hostile)", "connected", 0)
			hold(c)
		}
	})
	every(time.Second, func() { // 10 more idle connections to /healthz every second, never closed
		for range 10 {
			if c, err := l.Ext.Dial("tcp", nodeAddr(10256)); err == nil {
				hold(c)
			}
		}
	})
	healthz := soakHTTPClientIn(l.Node, false, 10*time.Second)
	every(time.Second, func() {
		resp, err := healthz.Get("http://127.0.0.1:10256/healthz")
		if err != nil {
			tally.add("healthz probe", "error: "+errCause(err), 0)
			return
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			tally.add("healthz probe", "status "+strconv.Itoa(resp.StatusCode), 0)
			return
		}
		tally.add("healthz probe", "ok", 0)
	})

	// Operator and cluster events: backends killed and restarted in turn,
	// the manifest rewritten slowly.
	kill := 0
	every(3*time.Second, func() {
		i := kill % len(churn)
		kill++
		churnProcs[i].Signal(syscall.SIGKILL)
		time.Sleep(time.Second)
		if p, err := l.StartWeb(churnPods[i], tools, churn[i]); err == nil {
			churnProcs[i] = p
		}
		tally.add("backend kills", "done", 0)
	})
	extra := false
	every(10*time.Second, func() {
		extra = !extra
		content := []byte(soakManifest(churn, extra))
		f, err := os.OpenFile(manifest, os.O_WRONLY|os.O_TRUNC, 0)
		if err != nil {
			return
		}
		f.Write(content[:len(content)/2])
		time.Sleep(500 * time.Millisecond) // a slow writer: half a file for a while
		f.Write(content[len(content)/2:])
		f.Close()
		tally.add("slow manifest rewrites", "done", 0)
	})
	every(time.Second, func() { measure() })

	wg.Wait()
	hostileMu.Lock()
	for _, c := range hostile {
		c.Close()
	}
	hostileMu.Unlock()
	keepAlive.CloseIdleConnections()
	perRequest.CloseIdleConnections()
	end := time.Now()
	var last sample
	for time.Since(end) < 30*time.Second {
		last = measure()
		if last.fds <= start.fds+10 && last.goroutines <= start.goroutines+10 {
			break
		}
		time.Sleep(time.Second)
	}
	settled := time.Since(end).Round(time.Second)

	// The report.
	var lines []string
	var failed, requests int64
	for k, n := range tally.counts {
		lines = append(lines, fmt.Sprintf("%-45s %d", k, n))
		kind, outcome, _ := strings.Cut(k, " | ")
		hostileOrEvent := strings.Contains(kind, "hostile") || strings.Contains(kind, "rewrites") || strings.Contains(kind, "kills")
		if hostileOrEvent {
			continue
		}
		requests += n
		if outcome != "ok" && !strings.Contains(kind, "killed backends") {
			failed += n
		}
	}
	sort.Strings(lines)
	peak := sample{}
	for _, s := range samples {
		peak.rssMB = max(peak.rssMB, s.rssMB)
		peak.fds = max(peak.fds, s.fds)
		peak.goroutines = max(peak.goroutines, s.goroutines)
	}
	fmt.Printf("soak: %s\n%s\n", duration, strings.Join(lines, "\n"))
	fmt.Printf("requests %d, failed (not on killed backends) %d, bytes checked %d\n", requests, failed, tally.checked)
	fmt.Printf("proxy           start    peak     end (%s after the load)\n", settled)
	fmt.Printf("RSS MB          %-8.1f %-8.1f %.1f\n", start.rssMB, peak.rssMB, last.rssMB)
	fmt.Printf("open fds        %-8d %-8d %d\n", start.fds, peak.fds, last.fds)
	fmt.Printf("goroutines      %-8d %-8d %d\n", start.goroutines, peak.goroutines, last.goroutines)
	fmt.Printf("open fds at the end, by kind: %v\n", fdKinds(proxy.PID()))
	b.ReportMetric(float64(requests), "requests")
	b.ReportMetric(float64(failed), "failed")
	b.ReportMetric(peak.rssMB, "peak-RSS-MB")
	if failed > 0 || tally.counts["http keep-alive | corrupted"]+tally.counts["http per request | corrupted"] > 0 {
		b.Errorf("%d requests failed that no killed backend explains", failed)
	}
}

// soakHTTPClient is an HTTP client whose connections start in pod c.
func soakHTTPClient(c *lab.Pod, perRequest bool) *http.Client {
	return soakHTTPClientIn(&c.NS, perRequest, 10*time.Second)
}

func soakHTTPClientIn(ns *lab.NS, perRequest bool, timeout time.Duration) *http.Client {
	return &http.Client{Timeout: timeout, Transport: &http.Transport{
		DisableKeepAlives:   perRequest,
		MaxIdleConnsPerHost: 4,
		DialContext:         func(_ context.Context, network, addr string) (net.Conn, error) { return ns.Dial(network, addr) },
	}}
}

// soakUDP makes one UDP request/response exchange, with up to three tries
// (UDP may lose a datagram; the proxy must not lose them all).
func soakUDP(tally *soakTally, c *lab.Pod, kind, addr string, greetings map[string]bool) {
	conn, err := c.Dial("udp", addr)
	if err != nil {
		tally.add(kind, "error: "+errCause(err), 0)
		return
	}
	defer conn.Close()
	payload := make([]byte, 100+int(randN(1100)))
	rand.Read(payload)
	buf := make([]byte, 2048)
	for range 3 {
		conn.Write(payload)
		conn.SetReadDeadline(time.Now().Add(time.Second))
		n, err := conn.Read(buf)
		if err != nil {
			continue
		}
		greeting, rest, _ := bytes.Cut(buf[:n], []byte("\n"))
		if !greetings[string(greeting)] || !bytes.Equal(rest, payload) {
			tally.add(kind, "corrupted", 0)
			return
		}
		tally.add(kind, "ok", len(payload))
		return
	}
	tally.add(kind, "no reply in 3 tries", 0)
}

// soakDNS asks the DNS stub for svc-test-1, with up to three tries.
func soakDNS(tally *soakTally, c *lab.Pod) {
	conn, err := c.Dial("udp", "10.96.0.10:53")
	if err != nil {
		tally.add("dns", "error: "+errCause(err), 0)
		return
	}
	defer conn.Close()
	dc := &dns.Conn{Conn: conn}
	q := new(dns.Msg).SetQuestion("svc-test-1.default.svc.cluster.local.", dns.TypeA)
	for range 3 {
		dc.WriteMsg(q)
		conn.SetReadDeadline(time.Now().Add(time.Second))
		r, err := dc.ReadMsg()
		if err != nil {
			continue
		}
		if len(r.Answer) != 1 || !strings.HasSuffix(r.Answer[0].String(), "10.96.0.11") {
			tally.add("dns", "wrong answer", 0)
			return
		}
		tally.add("dns", "ok", 0)
		return
	}
	tally.add("dns", "no reply in 3 tries", 0)
}

// errCause names an error by its last, most specific part.
func errCause(err error) string {
	s := err.Error()
	if i := strings.LastIndex(s, ": "); i >= 0 {
		s = s[i+2:]
	}
	return s
}

func randN(n int64) int64 {
	var b [8]byte
	rand.Read(b[:])
	v := int64(0)
	for _, x := range b {
		v = v<<8 | int64(x)
	}
	if v < 0 {
		v = -v
	}
	return v % n
}

// rssMB is process pid's resident memory.
func rssMB(pid int) float64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 64)
			return kb / 1024
		}
	}
	return 0
}

// openFDs counts process pid's open file descriptors.
func openFDs(pid int) int {
	entries, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(entries)
}

// fdKinds counts process pid's open file descriptors by kind: socket,
// pipe, anon_inode...
func fdKinds(pid int) map[string]int {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, _ := os.ReadDir(dir)
	kinds := map[string]int{}
	for _, e := range entries {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		kind, _, _ := strings.Cut(target, ":")
		kinds[kind]++
	}
	return kinds
}

// goroutines reads go_goroutines from the proxy's /metrics in the node.
func goroutines(l *lab.Lab) int {
	c := soakHTTPClientIn(l.Node, true, 5*time.Second)
	resp, err := c.Get("http://127.0.0.1:10249/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "go_goroutines "); ok {
			n, _ := strconv.ParseFloat(rest, 64)
			return int(n)
		}
	}
	return -1
}
