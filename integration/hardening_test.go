package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/integration/lab"
)

// logField returns field of the first JSON log line of proc, from line
// from on, whose msg is msg and whose fields include match.
func logField(t *testing.T, proc *lab.Proc, msg string, match map[string]string, field string) string {
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

	// An API server that is down: nothing listens on its port.
	kubeconfig := filepath.Join(t.TempDir(), "down.kubeconfig")
	os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: down, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: c, context: {cluster: down, user: u}}]
current-context: c
`), 0o600)
	second, err := l.Start(l.Node, tools.Proxy, "--log-format", "json", "-v", "3", "--mode", "auto", "--kubeconfig", kubeconfig)
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
