package integration

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

// heldConnections is how many proxied connections BenchmarkHeldConnections
// holds at once.
const heldConnections = 10000

// heldFDLimit is the open file limit the proxy runs with: 10,000
// connections, two sockets each, must fit with room to spare.
const heldFDLimit = 21000

// BenchmarkHeldConnections opens 10,000 connections from a pod through the
// Service to the web pods, each with one HTTP request answered, and holds
// them all; then it reads what the proxy process holds: descriptors (its
// open file limit is 21,000, so a proxy that needed more would refuse
// connections and the benchmark would fail) and resident memory, before
// and with the connections. Run: make bench-held.
func BenchmarkHeldConnections(b *testing.B) {
	// The limit may be raised only as far as this machine's hard limit
	// (CAP_SYS_RESOURCE could go beyond; a container may not have it);
	// then as many connections as fit are held, and the log says so.
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		b.Fatal(err)
	}
	limit := min(heldFDLimit, int(lim.Max))
	want := min(heldConnections, (limit-300)/2) // 300 for the proxy's own
	if want < heldConnections {
		b.Logf("this machine allows %d descriptors per process: holding %d connections, not %d", lim.Max, want, heldConnections)
	}
	l, client, manifest := firstStoryLab(b, "")
	proxy, err := l.Start(l.Node, "prlimit", fmt.Sprintf("--nofile=%d:%d", limit, limit), tools.Proxy,
		"--log-format", "json", "-v", "3", "--manifests", manifest,
		"--tcp-max-connections", fmt.Sprint(want+100), "--tcp-max-connections-per-service-port", fmt.Sprint(want+100),
		"--udp-max-sessions", "100")
	if err != nil {
		b.Fatal(err)
	}
	if _, err := proxy.WaitFor(0, 15*time.Second, lab.LogMessage("Synced")); err != nil {
		b.Fatal(err)
	}
	addr := net.JoinHostPort(lab.ClusterIP.String(), "80")
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	// One request through, so the proxy's first connection state and
	// buffers exist before the baseline.
	conns = append(conns, holdOne(b, client, addr))
	fdsBefore, rssBefore := procHolds(b, proxy.PID())
	for range b.N {
		for len(conns) < want {
			conns = append(conns, holdOne(b, client, addr))
		}
	}
	fds, rss := procHolds(b, proxy.PID())
	n := float64(len(conns) - 1)
	b.ReportMetric(float64(fds), "fds")
	b.ReportMetric(float64(fds-fdsBefore)/n, "fds/conn")
	b.ReportMetric(float64(rss)/(1<<20), "RSS-MB")
	b.ReportMetric(float64(rss-rssBefore)/n, "RSS-B/conn")
	b.Logf("%d connections held: the proxy holds %d descriptors (%d before) and %.1f MB resident (%.1f MB before), limit %d descriptors",
		len(conns), fds, fdsBefore, float64(rss)/(1<<20), float64(rssBefore)/(1<<20), limit)
}

// holdOne opens a connection to addr from pod p, makes one request on it
// and returns it, open.
func holdOne(b *testing.B, p *lab.Pod, addr string) net.Conn {
	c, err := p.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		b.Fatalf("connection to hold: %v", err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: svc-test-1\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err == nil {
		_, err = resp.Body.Read(make([]byte, 64))
	}
	if err != nil && !strings.Contains(err.Error(), "EOF") {
		c.Close()
		b.Fatalf("request on a connection to hold: %v", err)
	}
	c.SetDeadline(time.Time{})
	return c
}

// procHolds is the number of descriptors process pid has open and its
// resident memory in bytes.
func procHolds(b *testing.B, pid int) (fds int, rss int64) {
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		b.Fatal(err)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			rss = kb << 10
		}
	}
	return len(entries), rss
}
