package integration

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

// TestBindModeReconcile: in bind mode the proxy's addresses survive a crash
// correctly. An address somebody else put in the service range is never
// touched; a stale address of ours (left by a crash) is removed; after kill
// -9 and a restart the addresses are reconciled, not duplicated, and traffic
// is back within 2s; --cleanup removes ours and only ours, and puts the ARP
// settings back as they were before the first start.
func TestBindModeReconcile(t *testing.T) {
	ctx := context.Background()
	l, client, manifest := firstStoryLab(t, "")
	arp := func() string {
		out, err := l.Node.Run(ctx, "sysctl", "-n", "net.ipv4.conf.all.arp_ignore", "net.ipv4.conf.all.arp_announce")
		if err != nil {
			t.Fatal(err)
		}
		return strings.Join(strings.Fields(string(out)), " ")
	}
	// The node's own, unusual choice, which cleanup must restore.
	if _, err := l.Node.Run(ctx, "sysctl", "-w", "net.ipv4.conf.all.arp_ignore=2", "net.ipv4.conf.all.arp_announce=1"); err != nil {
		t.Fatal(err)
	}
	const foreign, stale = "10.96.0.99/32", "10.96.0.77/32"
	for _, args := range [][]string{
		{"addr", "add", foreign, "dev", "lo"},                  // an administrator's
		{"addr", "add", stale, "dev", "lo", "label", "lo:kup"}, // ours, from a crashed run
	} {
		if _, err := l.Node.Run(ctx, "ip", args...); err != nil {
			t.Fatal(err)
		}
	}
	loAddrs := func() string {
		out, err := l.Node.Run(ctx, "ip", "-4", "-o", "addr", "show", "dev", "lo")
		if err != nil {
			t.Fatal(err)
		}
		return string(out)
	}
	url := fmt.Sprintf("http://%s/", lab.ClusterIP)

	proxy, err := l.StartProxy(tools, manifest, "--mode", "bind")
	if err != nil {
		t.Fatal(err)
	}
	if got := arp(); got != "1 2" {
		t.Errorf("arp_ignore, arp_announce in bind mode = %s; want 1 2", got)
	}
	addrs := loAddrs()
	if !strings.Contains(addrs, foreign) || strings.Contains(addrs, stale) || strings.Count(addrs, lab.ClusterIP.String()+"/32") != 1 {
		t.Fatalf("after start, lo has:\n%s\nwant %s kept, %s removed, %s once", addrs, foreign, stale, lab.ClusterIP)
	}
	if got, err := client.Curl(ctx, url); err != nil || !strings.HasPrefix(got, "This is Web Server 1") {
		t.Fatalf("curl %s = %q, %v", url, got, err)
	}

	// A crash: no chance to clean anything up.
	if err := proxy.Signal(syscall.SIGKILL); err == nil {
		t.Log("proxy exited cleanly on SIGKILL?")
	}
	restarted := time.Now()
	if _, err := l.StartProxy(tools, manifest, "--mode", "bind"); err != nil {
		t.Fatal(err)
	}
	var got string
	for time.Since(restarted) < 2*time.Second {
		if got, err = client.Curl(ctx, url); err == nil {
			break
		}
	}
	if err != nil || !strings.HasPrefix(got, "This is Web Server 1") {
		t.Fatalf("2s after the restart, curl %s = %q, %v", url, got, err)
	}
	t.Logf("traffic back %s after the restart", time.Since(restarted).Round(time.Millisecond))
	addrs = loAddrs()
	if n := strings.Count(addrs, lab.ClusterIP.String()+"/32"); n != 1 || !strings.Contains(addrs, foreign) {
		t.Errorf("after the restart lo has:\n%s\nwant %s once and %s kept", addrs, lab.ClusterIP, foreign)
	}

	if out, err := l.Node.Run(ctx, tools.Proxy, "--cleanup"); err != nil {
		t.Fatalf("--cleanup: %v\n%s", err, out)
	}
	addrs = loAddrs()
	if strings.Contains(addrs, lab.ClusterIP.String()) || !strings.Contains(addrs, foreign) {
		t.Errorf("after --cleanup lo has:\n%s\nwant ours gone and %s kept", addrs, foreign)
	}
	if got := arp(); got != "2 1" {
		t.Errorf("arp_ignore, arp_announce after --cleanup = %s; want the node's own 2 1 back", got)
	}
}

// TestAutoModeChoosesRedirectWhenNATWorks: the lab's kernel can NAT, so
// auto mode must say so and behave as redirect mode.
func TestAutoModeChoosesRedirectWhenNATWorks(t *testing.T) {
	ctx := context.Background()
	l, _, manifest := firstStoryLab(t, "")
	proxy, err := l.StartProxy(tools, manifest, "--mode", "auto")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := proxy.WaitFor(0, time.Second, lab.LogMessage("Mode auto chose redirect: the kernel can NAT")); err != nil {
		t.Error(err)
	}
	if got, err := l.Node.Curl(ctx, fmt.Sprintf("http://%s/", lab.ClusterIP)); err != nil || !strings.HasPrefix(got, "This is Web Server 1") {
		t.Errorf("curl from the node = %q, %v", got, err)
	}
	if got, err := l.Node.Curl(ctx, "http://127.0.0.1:10249/proxyMode"); err != nil || got != "userspace" {
		t.Errorf("/proxyMode = %q, %v; want userspace", got, err)
	}
}

// TestAutoModeFallsBackToBind: where iptables cannot be used (here: no
// iptables program on the proxy's PATH, as on a node without it), auto mode
// says why and serves in bind mode, touching no netfilter.
func TestAutoModeFallsBackToBind(t *testing.T) {
	ctx := context.Background()
	l, client, manifest := firstStoryLab(t, "")
	proxy, err := l.Start(l.Node, "env", "PATH=/nonexistent", tools.Proxy, "--manifests", manifest, "--mode", "auto", "--log-format", "json", "-v", "3")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := proxy.WaitFor(0, 10*time.Second, lab.LogMessage("Mode auto chose bind: the kernel cannot NAT (creating our nat chain failed)")); err != nil {
		t.Fatal(err)
	}
	if _, err := proxy.WaitFor(0, 10*time.Second, lab.LogMessage("Synced")); err != nil {
		t.Fatal(err)
	}
	if got, err := client.Curl(ctx, fmt.Sprintf("http://%s/", lab.ClusterIP)); err != nil || !strings.HasPrefix(got, "This is Web Server 1") {
		t.Errorf("curl from a pod = %q, %v", got, err)
	}
	noNetfilter(t, l)
	if got, err := l.Node.Curl(ctx, "http://127.0.0.1:10249/proxyMode"); err != nil || got != "bind" {
		t.Errorf("/proxyMode = %q, %v; want bind", got, err)
	}
}

// TestBindModePortClash: in bind mode a Service's port must be free on the
// node; one that a node server already holds on every address is reported
// clearly and counted, and every other Service is served all the same.
func TestBindModePortClash(t *testing.T) {
	ctx := context.Background()
	clash := strings.NewReplacer("name: svc-test-1", "name: clash", "clusterIP: 10.96.0.11", "clusterIP: 10.96.0.22",
		"port: 80\n", "port: 2222\n", "nodePort: 30080", "nodePort: 30082").Replace(serviceOnly(lab.FirstStory().Manifest()))
	l, client, manifest := firstStoryLab(t, "---\n"+clash)
	server, err := l.Start(l.Node, tools.Helper, "web", "--listen", "0.0.0.0", "--port", "2222", "--udp-port", "2223", "--text", "node server")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := server.WaitFor(0, 10*time.Second, func(s string) bool { return strings.HasPrefix(s, "serving") }); err != nil {
		t.Fatal(err)
	}
	proxy, err := l.StartProxy(tools, manifest, "--mode", "bind")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := proxy.WaitFor(0, 15*time.Second, func(s string) bool {
		return strings.Contains(s, "10.96.0.22:2222") && strings.Contains(s, "already holds port 2222/TCP on every address")
	}); err != nil {
		t.Error(err)
	}
	if got, err := client.Curl(ctx, "http://10.96.0.11/"); err != nil || !strings.HasPrefix(got, "This is Web Server") {
		t.Errorf("the other Service beside the clash: %q, %v", got, err)
	}
	metrics, err := l.Node.Curl(ctx, "http://127.0.0.1:10249/metrics")
	if err != nil || !strings.Contains(metrics, `kube_userspace_proxy_listen_failures_total{protocol="TCP",reason="port_in_use"}`) {
		t.Errorf("metrics lack the port_in_use failure (%v)", err)
	}
}
