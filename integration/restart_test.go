package integration

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

// clientLoad starts, in the client pod, the load of the restart tests:
// 50 requests a second on new connections for duration, and a 3 MB
// download paced over about 3 seconds, both through svc-test-1.
func clientLoad(t *testing.T, l *lab.Lab, client *lab.Pod, duration time.Duration) (load, download *lab.Proc) {
	t.Helper()
	load, err := l.Start(&client.NS, tools.Helper, "load", "--rate", "50", "--duration", duration.String(), "http://10.96.0.11/")
	if err != nil {
		t.Fatal(err)
	}
	download, err = l.Start(&client.NS, tools.Helper, "download", "http://10.96.0.11/bytes?n=3000000&rate=1000000")
	if err != nil {
		t.Fatal(err)
	}
	return load, download
}

var loadResult = regexp.MustCompile(`^sent (\d+) failed (\d+)$`)

// loadFailures waits for the load to end and returns its counts.
func loadFailures(t *testing.T, load *lab.Proc) (sent, failed int) {
	t.Helper()
	n, err := load.WaitFor(0, time.Minute, loadResult.MatchString)
	if err != nil {
		t.Fatal(err)
	}
	m := loadResult.FindStringSubmatch(load.Lines(n)[0])
	sent, _ = strconv.Atoi(m[1])
	failed, _ = strconv.Atoi(m[2])
	return sent, failed
}

// listenerOf is the listener port a proxy's log gives svc-test-1's http
// port.
func listenerOf(t *testing.T, p *lab.Proc) string {
	t.Helper()
	for _, line := range p.Lines(0) {
		e := lab.LogEntry(line)
		if e["msg"] == "Added service port" && e["service"] == "default/svc-test-1:http" {
			return e["listener"].(string)
		}
	}
	t.Fatalf("no listener logged for default/svc-test-1:http:\n%s", p.Output())
	return ""
}

// waitProxied waits until the proxy in the lab's node has proxied n TCP
// connections (its metrics, on the node's loopback).
func waitProxied(t *testing.T, l *lab.Lab, n float64) {
	t.Helper()
	err := wait.PollUntilContextTimeout(t.Context(), 20*time.Millisecond, 20*time.Second, true, func(ctx context.Context) (bool, error) {
		m, _ := l.Node.Curl(ctx, "http://127.0.0.1:10249/metrics")
		return metricValue(m, `kube_userspace_proxy_connections_total{protocol="TCP",result="ok"}`) >= n, nil
	})
	if err != nil {
		t.Fatalf("the proxy never carried %v connections: %v", n, err)
	}
}

// dnsListenOf is where a proxy's log says its DNS stub listens.
func dnsListenOf(t *testing.T, p *lab.Proc) string {
	t.Helper()
	for _, line := range p.Lines(0) {
		if e := lab.LogEntry(line); e["msg"] == "DNS stub answers the cluster domain" {
			return e["listen"].(string)
		}
	}
	t.Fatalf("no DNS stub logged:\n%s", p.Output())
	return ""
}

// TestHandOverDropsNothing is an upgrade: a second proxy takes the
// listening sockets of the running one over (--handoff-socket), the first
// is stopped with SIGTERM, and a client that sends 50 requests a second on
// new connections, and holds a long download, sees no failure and every
// byte.
func TestHandOverDropsNothing(t *testing.T) {
	l, client, manifest := firstStoryLab(t, "")
	dir := t.TempDir()
	sock := filepath.Join(dir, "handoff.sock")
	flags := []string{"--handoff-socket", sock, "--shutdown-grace-period", "20s"}
	oldReady, nextReady := filepath.Join(dir, "old.ready"), filepath.Join(dir, "next.ready")
	old, err := l.StartProxy(tools, manifest, append(flags, "--ready-file", oldReady)...)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := old.WaitFor(0, 10*time.Second, lab.LogMessage("Serving the hand-over socket: a new proxy takes the listeners from here")); err != nil {
		t.Fatal(err)
	}
	load, download := clientLoad(t, l, client, 5*time.Second)
	waitProxied(t, l, 20) // the hand-over happens under the load
	next, err := l.StartProxy(tools, manifest, append(flags, "--ready-file", nextReady)...)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := next.WaitFor(0, 10*time.Second, lab.LogMessage("Took the listening sockets over from the running proxy")); err != nil {
		t.Fatal(err)
	}
	if _, err := old.WaitFor(0, 10*time.Second, lab.LogMessage("Handed the listening sockets over to a new proxy: writing no more rules, serving what is established")); err != nil {
		t.Fatal(err)
	}
	if a, b := listenerOf(t, old), listenerOf(t, next); a != b {
		t.Errorf("the new proxy listens on %s, the old one on %s: the rules would have changed", b, a)
	}
	if err := old.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-old.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("the old proxy did not exit")
	}
	// --ready-file: there once synced, gone once stopping.
	if _, err := os.Stat(oldReady); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the stopped proxy's ready file: %v; want it removed", err)
	}
	if _, err := os.Stat(nextReady); err != nil {
		t.Errorf("the serving proxy's ready file: %v", err)
	}
	if sent, failed := loadFailures(t, load); failed != 0 || sent < 200 {
		t.Errorf("%d of %d requests failed across the hand-over; want none\n%s", failed, sent, load.Output())
	}
	if _, err := download.WaitFor(0, time.Minute, func(s string) bool { return s == "ok 3000000 bytes" }); err != nil {
		t.Errorf("the download across the hand-over: %v", err)
	}
	// The new proxy serves on its own, and writes the rules now.
	if body, err := client.Curl(t.Context(), "http://10.96.0.11/"); err != nil {
		t.Errorf("after the old proxy exited: %q, %v", body, err)
	}
}

// TestCrashRestartReopensListeners: a proxy killed with SIGKILL and
// started again at once reopens the listeners its rules point at before
// it has loaded a Service, on the same ports. The requests that fail are
// those that arrive while no process holds the sockets; the test reports
// them (docs/node.md has the figures).
func TestCrashRestartReopensListeners(t *testing.T) {
	l, client, manifest := firstStoryLab(t, "")
	// With the DNS stub: its two sockets are reopened on their port too.
	flags := []string{"--cluster-dns", "10.96.0.10"}
	old, err := l.StartProxy(tools, manifest, flags...)
	if err != nil {
		t.Fatal(err)
	}
	load, _ := clientLoad(t, l, client, 4*time.Second)
	waitProxied(t, l, 20) // the load runs through the proxy before the crash
	old.Signal(syscall.SIGKILL)
	<-old.Done()
	next, err := l.StartProxy(tools, manifest, flags...)
	if err != nil {
		t.Fatal(err)
	}
	if a, b := dnsListenOf(t, old), dnsListenOf(t, next); a != b {
		t.Errorf("after the crash the DNS stub listens on %s, before it on %s", b, a)
	}
	if _, err := next.WaitFor(0, time.Second, lab.LogMessage("Reopened the listeners the rules of the proxy before still point at: their clients wait for the first sync instead of being refused")); err != nil {
		t.Fatal(err)
	}
	if a, b := listenerOf(t, old), listenerOf(t, next); a != b {
		t.Errorf("after the crash the proxy listens on %s, before it on %s", b, a)
	}
	sent, failed := loadFailures(t, load)
	t.Logf("SIGKILL and an immediate restart: %d of %d requests failed (50/s)\n%s", failed, sent, load.Output())
	if body, err := client.Curl(t.Context(), "http://10.96.0.11/"); err != nil {
		t.Errorf("after the restart: %q, %v", body, err)
	}
}
