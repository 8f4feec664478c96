package integration

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/iptables"
)

// logField returns field of the first JSON log line of proc, from line
// from on, whose msg is msg and whose fields include match.
func logField(t testing.TB, proc *lab.Proc, msg string, match map[string]string, field string) string {
	t.Helper()
	i, err := proc.WaitFor(0, 15*time.Second, func(line string) bool {
		if !lab.LogMessage(msg)(line) {
			return false
		}
		e := lab.LogEntry(line)
		for k, v := range match {
			if fmt.Sprint(e[k]) != v {
				return false
			}
		}
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprint(lab.LogEntry(proc.Lines(i)[0])[field])
}

// TestListenersOnlyForRedirectedTraffic: our listeners and the DNS stub
// bind every node address on ports of their own, but only traffic our
// rules redirected may reach them. From another host, a raw listener port
// must not reach a ClusterIP-only Service, nor the stub's port give an
// open resolver; the ClusterIP, the NodePort and the cluster DNS IP still
// work from where they should.
func TestListenersOnlyForRedirectedTraffic(t *testing.T) {
	ctx := context.Background()
	l, client, manifest := firstStoryLab(t, "")
	proxy, err := l.StartProxy(tools, manifest, "--cluster-dns", "10.96.0.10")
	if err != nil {
		t.Fatal(err)
	}
	tcpListener := logField(t, proxy, "Added service port", map[string]string{"protocol": "TCP"}, "listener")
	stub := logField(t, proxy, "DNS stub answers the cluster domain", nil, "listen")
	_, stubPort, _ := strings.Cut(stub, ":")

	// What must keep working: the Service from a pod and from the node,
	// its NodePort from the other host, the cluster DNS IP from a pod.
	want := lab.FirstStory().Pods[0].Greeting()
	for _, c := range []struct {
		from *lab.NS
		url  string
	}{
		{&client.NS, "http://10.96.0.11/"},
		{l.Node, "http://10.96.0.11/"},
		{l.Ext, fmt.Sprintf("http://%s:%d/", lab.NodeIP, lab.NodePort)},
	} {
		if got, err := c.from.Curl(ctx, c.url); err != nil || got != want {
			t.Errorf("curl %s from %s = %q, %v; want %q", c.url, c.from.Name, got, err, want)
		}
	}
	out, err := client.Run(ctx, "dig", "+short", "+tries=1", "+time=3", "@10.96.0.10", "svc-test-1.default.svc.cluster.local")
	if err != nil || strings.TrimSpace(string(out)) != "10.96.0.11" {
		t.Errorf("dig @10.96.0.10 from a pod = %q, %v; want 10.96.0.11", out, err)
	}

	// What must not: the raw ports, from the other host and from a pod.
	for _, from := range []*lab.NS{l.Ext, &client.NS} {
		url := fmt.Sprintf("http://%s:%s/", lab.NodeIP, tcpListener)
		if got, err := from.Run(ctx, "curl", "-sS", "--max-time", "2", url); err == nil {
			t.Errorf("curl %s (our raw listener port) from %s = %q; want no answer", url, from.Name, got)
		}
		out, err := from.Run(ctx, "dig", "+tries=1", "+time=2", "-p", stubPort, "@"+lab.NodeIP.String(), "www.example.org")
		if err == nil || strings.Contains(string(out), "status:") {
			t.Errorf("dig @%s -p %s (the stub's raw port) from %s answered; want no answer:\n%s", lab.NodeIP, stubPort, from.Name, out)
		}
	}
}

// TestRestartKeepsTheRules: a proxy that restarts and cannot load its
// Services yet (the API server is down) must leave the rules of the run
// before in place until its first sync; wiping them turns a short restart
// into an outage of every ClusterIP. --mode auto runs both start-up
// probes (NAT, and IPv6 NAT).
func TestRestartKeepsTheRules(t *testing.T) {
	ctx := context.Background()
	l, client, manifest := firstStoryLab(t, "")
	first, err := l.StartProxy(tools, manifest, "--mode", "auto")
	if err != nil {
		t.Fatal(err)
	}
	if got, err := client.Curl(ctx, "http://10.96.0.11/"); err != nil || !strings.HasPrefix(got, "This is Web Server") {
		t.Fatalf("before the restart: %q, %v", got, err)
	}
	before, err := l.OurRules(ctx)
	if err != nil {
		t.Fatal(err)
	}
	first.Signal(syscall.SIGKILL)

	second, err := l.Start(l.Node, tools.Proxy, "--log-format", "json", "-v", "3", "--mode", "auto", "--kubeconfig", downKubeconfig(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := second.WaitFor(0, 15*time.Second, lab.LogMessage("Starting kube-userspace-proxy")); err != nil {
		t.Fatal(err)
	}
	// Past the probes, and failing to list: the rules must be as they were.
	if _, err := second.WaitFor(0, 15*time.Second, func(s string) bool { return strings.Contains(s, "connection refused") }); err != nil {
		t.Fatal(err)
	}
	after, err := l.OurRules(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(after, "-d 10.96.0.11/32") || after != before {
		t.Errorf("rules after a restart that has not loaded yet:\n%s\nwant those of the run before:\n%s", after, before)
	}
}

// TestConnectionFloodLeavesRoom: a proxy with a small open file limit
// (2048) flooded with connections to one Service resets what is over that
// port's share, never runs out of descriptors, and still opens a new
// Service's listener, serves it, and answers /healthz.
func TestConnectionFloodLeavesRoom(t *testing.T) {
	ctx := context.Background()
	l, client, manifest := firstStoryLab(t, "")
	proxy, err := l.Start(l.Node, "prlimit", "--nofile=2048:2048", tools.Proxy, "--log-format", "json", "-v", "3", "--manifests", manifest)
	if err != nil {
		t.Fatal(err)
	}
	// 2048 descriptors: 1024 reserved, 64 splice pipes (128), 224 for UDP
	// sessions, 336 TCP connections (2 sockets each), 168 for one service
	// port.
	budget := logField(t, proxy, "File descriptor budget", nil, "tcpMaxConnections")
	if budget != "336" {
		t.Fatalf("TCP connection bound from a limit of 2048 = %s, want 336", budget)
	}
	const share = 168
	if _, err := proxy.WaitFor(0, 15*time.Second, lab.LogMessage("Synced")); err != nil {
		t.Fatal(err)
	}

	const flood = 250
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	// The ones over the share are reset at once (the reset may even beat
	// connect's return); the others wait for a request that never comes.
	var held, reset atomic.Int32
	for i := range flood {
		c, err := client.Dial("tcp", "10.96.0.11:80")
		if errors.Is(err, syscall.ECONNRESET) {
			reset.Add(1)
			continue
		}
		if err != nil {
			t.Fatalf("connect %d: %v", i, err)
		}
		conns = append(conns, c)
	}
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() {
			c.SetReadDeadline(time.Now().Add(3 * time.Second))
			_, err := c.Read(make([]byte, 1))
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded):
				held.Add(1)
			case errors.Is(err, syscall.ECONNRESET):
				reset.Add(1)
			}
		})
	}
	wg.Wait()
	if held.Load() != share || reset.Load() != flood-share {
		t.Errorf("of %d connections to one Service: %d held, %d reset; want %d held (the port's share), %d reset", flood, held.Load(), reset.Load(), share, flood-share)
	}

	// A new Service while the flood holds its share.
	second := strings.Replace(lab.FirstStory().Manifest(), "name: svc-test-1", "name: svc-test-2", 1)
	second = strings.Replace(second, "clusterIP: 10.96.0.11", "clusterIP: 10.96.0.12", 1)
	second = strings.Replace(second, "nodePort: 30080", "nodePort: 30082", 1)
	if !strings.Contains(second, "10.96.0.12") {
		t.Fatal("could not make a second Service from the story's manifest")
	}
	if err := os.WriteFile(manifest, []byte(lab.FirstStory().Manifest()+"---\n"+serviceOnly(second)), 0o644); err != nil {
		t.Fatal(err)
	}
	logField(t, proxy, "Added service port", map[string]string{"service": "default/svc-test-2:http"}, "listener")
	want := lab.FirstStory().Pods[0].Greeting()
	if got, err := client.Curl(ctx, "http://10.96.0.12/"); err != nil || got != want {
		t.Errorf("the new Service during the flood: %q, %v; want %q", got, err, want)
	}
	if got, err := l.Node.Curl(ctx, "http://127.0.0.1:10256/healthz"); err != nil || !strings.Contains(got, "lastUpdated") {
		t.Errorf("/healthz during the flood: %q, %v", got, err)
	}
}

// serviceOnly keeps the Service document of a story manifest.
func serviceOnly(manifest string) string {
	for doc := range strings.SplitSeq(manifest, "\n---\n") {
		if strings.Contains(doc, "kind: Service") {
			return doc + "\n"
		}
	}
	return ""
}

// TestTwoProxiesOnOneNode: two proxies on one node, the default one and one
// with --service-proxy-name blue, each serve their own Services from one
// manifest, in chains of their own, and cleaning one up leaves the other
// working.
func TestTwoProxiesOnOneNode(t *testing.T) {
	ctx := context.Background()
	blue := strings.NewReplacer("name: svc-test-1", "name: svc-blue\n  labels: {service.kubernetes.io/service-proxy-name: blue}",
		"clusterIP: 10.96.0.11", "clusterIP: 10.96.0.12", "nodePort: 30080", "nodePort: 30082").Replace(serviceOnly(lab.FirstStory().Manifest()))
	l, client, manifest := firstStoryLab(t, "---\n"+blue)
	if _, err := l.StartProxy(tools, manifest); err != nil {
		t.Fatal(err)
	}
	second, err := l.StartProxy(tools, manifest, "--service-proxy-name", "blue",
		"--healthz-bind-address", "0.0.0.0:10266", "--metrics-bind-address", "127.0.0.1:10259")
	if err != nil {
		t.Fatal(err)
	}
	want := lab.FirstStory().Pods[0].Greeting()
	serves := func(url string) error {
		got, err := client.Curl(ctx, url)
		if err == nil && got != want {
			err = fmt.Errorf("answered %q, want %q", got, want)
		}
		return err
	}
	for _, url := range []string{"http://10.96.0.11/", "http://10.96.0.12/"} {
		if err := serves(url); err != nil {
			t.Errorf("curl %s with both proxies: %v", url, err)
		}
	}
	rules, err := l.OurRules(ctx)
	if err != nil {
		t.Fatal(err)
	}
	token := iptables.Token("blue")
	for _, r := range []string{
		"-A KUP-PORTALS-CONTAINER -d 10.96.0.11/32",
		"-A KUP-PORTALS-CONTAINER-" + token + " -d 10.96.0.12/32",
	} {
		if !strings.Contains(rules, r) {
			t.Errorf("rules lack %q:\n%s", r, rules)
		}
	}
	for _, r := range []string{"-A KUP-PORTALS-CONTAINER -d 10.96.0.12/32", "-A KUP-PORTALS-CONTAINER-" + token + " -d 10.96.0.11/32"} {
		if strings.Contains(rules, r) {
			t.Errorf("a proxy serves the other's Service: %q in\n%s", r, rules)
		}
	}

	second.Signal(syscall.SIGTERM)
	if out, err := l.Node.Run(ctx, tools.Proxy, "--cleanup", "--service-proxy-name", "blue"); err != nil {
		t.Fatalf("--cleanup of blue: %v\n%s", err, out)
	}
	rules, err = l.OurRules(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(rules, token) || !strings.Contains(rules, "-A KUP-PORTALS-CONTAINER -d 10.96.0.11/32") {
		t.Errorf("after blue's cleanup, want blue's chains gone and the default proxy's kept:\n%s", rules)
	}
	if err := serves("http://10.96.0.11/"); err != nil {
		t.Errorf("the default proxy's Service after blue's cleanup: %v", err)
	}
}

// downKubeconfig writes a kubeconfig for an API server that is down:
// nothing listens on 127.0.0.1:1 in the namespace the proxy runs in.
func downKubeconfig(tb testing.TB) string {
	kubeconfig := filepath.Join(tb.TempDir(), "down.kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: down, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: c, context: {cluster: down, user: u}}]
current-context: c
`), 0o600); err != nil {
		tb.Fatal(err)
	}
	return kubeconfig
}

// BenchmarkAPIOutageLoad measures what one proxy asks of an API server that
// is down: connection attempts per second, counted by the kernel (an
// iptables rule on the SYNs to the dead port) over 10s, with the proxy
// watching Services, EndpointSlices and its Node. Multiply by the number of
// nodes for what a control plane meets when it comes back.
//
//	go test -run '^$' -bench APIOutageLoad -benchtime 1x ./integration/
func BenchmarkAPIOutageLoad(b *testing.B) {
	ctx := context.Background()
	l, err := lab.New()
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	if _, err := l.Node.Run(ctx, "iptables", "-A", "OUTPUT", "-p", "tcp", "--dport", "1", "--syn", "-j", "ACCEPT"); err != nil {
		b.Fatal(err)
	}
	syns := func() float64 {
		out, err := l.Node.Run(ctx, "iptables", "-L", "OUTPUT", "-v", "-n", "-x")
		if err != nil {
			b.Fatal(err)
		}
		for line := range strings.Lines(string(out)) {
			if f := strings.Fields(line); len(f) > 2 && strings.Contains(line, "dpt:1") {
				var n float64
				fmt.Sscan(f[0], &n)
				return n
			}
		}
		b.Fatalf("no counting rule in:\n%s", out)
		return 0
	}
	var perSecond float64
	for range b.N {
		proxy, err := l.Start(l.Node, tools.Proxy, "--log-format", "json", "--kubeconfig", downKubeconfig(b), "--hostname-override", "node-1")
		if err != nil {
			b.Fatal(err)
		}
		if _, err := proxy.WaitFor(0, 15*time.Second, lab.LogMessage("Waiting for the first lists of Services and EndpointSlices")); err != nil {
			b.Fatal(err)
		}
		time.Sleep(3 * time.Second) // past the first, quicker retries
		before, start := syns(), time.Now()
		time.Sleep(10 * time.Second)
		perSecond = (syns() - before) / time.Since(start).Seconds()
		proxy.Signal(syscall.SIGKILL)
	}
	b.ReportMetric(perSecond, "connects/s")
}

// TestSIGTERMDrains: on SIGTERM the proxy stops accepting at once, lets a
// request in flight that finishes within --shutdown-grace-period complete,
// resets one that does not, and exits 0.
func TestSIGTERMDrains(t *testing.T) {
	l, client, manifest := firstStoryLab(t, "")
	proxy, err := l.StartProxy(tools, manifest, "--shutdown-grace-period", "2s")
	if err != nil {
		t.Fatal(err)
	}
	// Two uploads to the web server's echo, each begun before SIGTERM: one
	// finishes during the grace period, one never does.
	begin := func() net.Conn {
		c, err := client.Dial("tcp", "10.96.0.11:80")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n\r\nhello")
		return c
	}
	finishing, stalled := begin(), begin()
	// Both are proxied: the web server has their headers. Wait until the
	// proxy counts two connections.
	waitActive := func(want string) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			m, _ := l.Node.Curl(context.Background(), "http://127.0.0.1:10249/metrics")
			if strings.Contains(m, `kube_userspace_proxy_active_connections{protocol="TCP"} `+want) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("active TCP connections never became %s", want)
			}
		}
	}
	waitActive("2")
	if err := proxy.Signal(syscall.SIGINT); err != nil { // SIGINT: same path, and Signal does not wait for it
		t.Fatal(err)
	}
	if _, err := proxy.WaitFor(0, 10*time.Second, lab.LogMessage("Stopping: letting established connections finish")); err != nil {
		t.Fatal(err)
	}
	// New connections are refused at once.
	if c, err := client.Dial("tcp", "10.96.0.11:80"); err == nil {
		c.Close()
		t.Error("a new connection was accepted after the signal")
	}
	io.WriteString(finishing, "world")
	got, err := io.ReadAll(finishing)
	if err != nil || !strings.HasSuffix(string(got), "helloworld") {
		t.Errorf("the upload that finished during the grace period: %q, %v; want its whole echo", got, err)
	}
	stalled.SetReadDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.ReadAll(stalled); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the upload still running when the grace period ended: %v; want ECONNRESET", err)
	}
	select {
	case <-proxy.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the proxy did not exit after the grace period")
	}
	if _, err := proxy.WaitFor(0, time.Second, lab.LogMessage("Grace period over: reset the connections still open")); err != nil {
		t.Error(err)
	}
	if err := proxy.Signal(syscall.SIGTERM); err != nil { // already gone: how it exited
		t.Errorf("the proxy's exit after the signal: %v; want 0", err)
	}
}
