package integration

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

// TestServiceStory tells the story of svc-test-1 against the real binary:
// a pod and the node reach the ClusterIP, the Service scales, loses a pod,
// moves to v2 by a selector change, is reached through its NodePort, and
// leaves nothing behind after --cleanup. It is told twice: in redirect mode
// (iptables rules) and in bind mode, where after every step the node must
// have no netfilter rule or chain at all.
func TestServiceStory(t *testing.T) {
	for _, mode := range []string{"redirect", "bind"} {
		t.Run(mode, func(t *testing.T) { serviceStory(t, mode) })
	}
}

func serviceStory(t *testing.T, mode string) {
	ctx := context.Background()
	l := newLab(t)
	// check runs after every step: in bind mode, no netfilter anywhere.
	check := func(t *testing.T) {
		t.Helper()
		if mode == "bind" {
			noNetfilter(t, l)
			if addrs := ourAddresses(t, l); !strings.Contains(addrs, lab.ClusterIP.String()+"/32") {
				t.Errorf("bind mode: the ClusterIP is not among our addresses:\n%s", addrs)
			}
		}
	}
	client, err := l.AddPod("client", lab.ClientPod)
	if err != nil {
		t.Fatal(err)
	}
	story := lab.Story{}
	webs := map[string]*lab.Proc{}
	addWeb := func(w lab.WebPod) {
		t.Helper()
		proc, err := l.AddWeb(tools, w)
		if err != nil {
			t.Fatal(err)
		}
		webs[w.Name] = proc
		story.Pods = append(story.Pods, w)
	}
	first := lab.FirstStory()
	story.Selector = first.Selector
	for _, w := range first.Pods {
		addWeb(w)
	}

	manifest := filepath.Join(t.TempDir(), "lab.yaml")
	if err := story.Write(manifest); err != nil {
		t.Fatal(err)
	}
	proxy, err := l.StartProxy(tools, manifest, "--mode", mode)
	if err != nil {
		t.Fatal(err)
	}
	// apply rewrites the manifest and waits for the proxy to apply it.
	apply := func() time.Time {
		t.Helper()
		from := proxy.NumLines()
		if err := story.Write(manifest); err != nil {
			t.Fatal(err)
		}
		written := time.Now()
		changed, err := proxy.WaitFor(from, 5*time.Second, lab.LogMessage("Manifest changed; applying it"))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := proxy.WaitFor(changed, 5*time.Second, lab.LogMessage("Synced")); err != nil {
			t.Fatal(err)
		}
		return written
	}
	clusterURL := fmt.Sprintf("http://%s/", lab.ClusterIP)
	udpAddr := netip.AddrPortFrom(lab.ClusterIP, lab.UDPPort)

	t.Run("1 pod curls the ClusterIP", func(t *testing.T) {
		got, err := client.Curl(ctx, clusterURL)
		if want := "This is Web Server 1 running on 8080!"; err != nil || got != want {
			t.Fatalf("curl %s from a pod = %q, %v; want %q", clusterURL, got, err, want)
		}
		check(t)
	})

	t.Run("2 the node reaches the ClusterIP over TCP and UDP", func(t *testing.T) {
		got, err := l.Node.Curl(ctx, clusterURL)
		if want := "This is Web Server 1 running on 8080!"; err != nil || got != want {
			t.Errorf("curl %s from the node = %q, %v; want %q", clusterURL, got, err, want)
		}
		for _, size := range []int{16, 9000} {
			got, err := l.Node.UDP(ctx, tools, udpAddr, size)
			if want := "This is Web Server 1 running on 8080!"; err != nil || got != want {
				t.Errorf("UDP %d bytes to %s from the node = %q, %v; want %q", size, udpAddr, got, err, want)
			}
			got, err = client.UDP(ctx, tools, udpAddr, size)
			if want := "This is Web Server 1 running on 8080!"; err != nil || got != want {
				t.Errorf("UDP %d bytes to %s from a pod = %q, %v; want %q", size, udpAddr, got, err, want)
			}
		}
		check(t)
	})

	t.Run("3 scale to 3 pods: round robin splits 300 connections evenly", func(t *testing.T) {
		addWeb(lab.NewWebPod(2, "v1", 8080))
		addWeb(lab.NewWebPod(3, "v1", 8080))
		apply()
		tally, failures, err := client.Tally(ctx, tools, clusterURL, 300)
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]int{
			"This is Web Server 1 running on 8080!": 100,
			"This is Web Server 2 running on 8080!": 100,
			"This is Web Server 3 running on 8080!": 100,
		}
		if failures != 0 || !equalTally(tally, want) {
			t.Fatalf("300 requests: %v with %d failures; want %v", tally, failures, want)
		}
		check(t)
	})

	t.Run("metrics and health after the 300 connections", func(t *testing.T) {
		out, err := l.Node.Curl(ctx, "http://127.0.0.1:10249/metrics")
		if err != nil {
			t.Fatal(err)
		}
		ok := metricValue(out, `kube_userspace_proxy_connections_total{protocol="TCP",result="ok"}`)
		if ok < 300 {
			t.Errorf("connections_total ok = %v, want at least the 300 just made", ok)
		}
		if metricValue(out, "kubeproxy_sync_proxy_rules_duration_seconds_count") < 1 || metricValue(out, `kube_userspace_proxy_bytes_total{direction="from_backend",protocol="TCP"}`) <= 0 {
			t.Errorf("no sync or no bytes counted:\n%s", out)
		}
		for _, path := range []string{"healthz", "livez"} {
			body, err := l.Node.Curl(ctx, "http://127.0.0.1:10256/"+path)
			if err != nil || !strings.Contains(body, `"lastUpdated"`) || (path == "healthz") != strings.Contains(body, `"nodeEligible":true`) {
				t.Errorf("/%s = %q, %v", path, body, err)
			}
		}
		check(t)
	})

	t.Run("6 one of 3 backends dies: failover, no failed request", func(t *testing.T) {
		// The pod's server is killed but the manifest still lists it as
		// ready, as in the seconds before a kubelet notices: the proxy
		// must find out by dialing and move on to the next endpoint.
		if err := webs["web-3"].Signal(syscall.SIGKILL); err == nil {
			t.Log("web-3 exited cleanly after SIGKILL?")
		}
		tally, failures, err := client.Tally(ctx, tools, clusterURL, 200)
		if err != nil {
			t.Fatal(err)
		}
		if failures != 0 || tally["This is Web Server 3 running on 8080!"] != 0 ||
			tally["This is Web Server 1 running on 8080!"]+tally["This is Web Server 2 running on 8080!"] != 200 {
			t.Fatalf("200 requests after web-3 died: %v with %d failures; want all 200 from servers 1 and 2", tally, failures)
		}
		// Now the kubelet would mark it not ready; the story drops it.
		story.Pods = story.Pods[:2]
		apply()
		check(t)
	})

	t.Run("4 a v2 pod on 9090 joins: both versions answer", func(t *testing.T) {
		addWeb(lab.NewWebPod(4, "v2", 9090))
		apply()
		tally, failures, err := client.Tally(ctx, tools, clusterURL, 30)
		if err != nil {
			t.Fatal(err)
		}
		v2 := "This is Web Server 4 running on 9090!"
		if failures != 0 || tally[v2] != 10 || tally["This is Web Server 1 running on 8080!"] != 10 {
			t.Fatalf("30 requests: %v with %d failures; want 10 each from servers 1, 2 and the v2 server", tally, failures)
		}
		check(t)
	})

	t.Run("5 selector moves to version=v2: within 2s only 9090 answers", func(t *testing.T) {
		story.Selector = map[string]string{"app": "web-front-end", "version": "v2"}
		written := apply()
		elapsed := time.Since(written)
		t.Logf("the selector change was applied %s after the manifest was written", elapsed.Round(time.Millisecond))
		if elapsed > 2*time.Second {
			t.Errorf("the selector change took %s to apply; want under 2s", elapsed)
		}
		tally, failures, err := client.Tally(ctx, tools, clusterURL, 20)
		if err != nil {
			t.Fatal(err)
		}
		v2 := "This is Web Server 4 running on 9090!"
		if failures != 0 || tally[v2] != 20 {
			t.Fatalf("20 requests after the selector change: %v with %d failures; want all from %q", tally, failures, v2)
		}
		check(t)
	})

	t.Run("7 NodePort from another host", func(t *testing.T) {
		url := fmt.Sprintf("http://%s:%d/", lab.NodeIP, lab.NodePort)
		got, err := l.Ext.Curl(ctx, url)
		if !strings.HasSuffix(got, "running on 9090!") || err != nil {
			t.Errorf("curl %s from ext = %q, %v; want the v2 server", url, got, err)
		}
		got, err = l.Node.Curl(ctx, url)
		if !strings.HasSuffix(got, "running on 9090!") || err != nil {
			t.Errorf("curl %s from the node = %q, %v; want the v2 server", url, got, err)
		}
		check(t)
	})

	t.Run("8 SIGTERM, then --cleanup leaves none of our chains or addresses", func(t *testing.T) {
		if err := proxy.Signal(syscall.SIGTERM); err != nil {
			t.Fatalf("proxy exit after SIGTERM: %v", err)
		}
		for range 2 { // twice: cleaning a clean node is fine
			if out, err := l.Node.Run(ctx, tools.Proxy, "--cleanup"); err != nil {
				t.Fatalf("--cleanup: %v\n%s", err, out)
			}
		}
		for _, save := range []string{"iptables-legacy-save", "iptables-nft-save", "ip6tables-legacy-save", "ip6tables-nft-save"} {
			out, err := l.Node.Run(ctx, save)
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(string(out), "KUP-") {
				t.Errorf("%s after --cleanup still shows our chains:\n%s", save, out)
			}
		}
		if addrs := ourAddresses(t, l); addrs != "" {
			t.Errorf("our Service addresses survived --cleanup:\n%s", addrs)
		}
	})
}

func equalTally(got, want map[string]int) bool {
	if len(got) != len(want) {
		return false
	}
	for k, v := range want {
		if got[k] != v {
			return false
		}
	}
	return true
}

// noNetfilter fails t if the node has any iptables (legacy or nft) or
// nftables rule or chain.
func noNetfilter(t *testing.T, l *lab.Lab) {
	t.Helper()
	for _, cmd := range [][]string{{"iptables-legacy-save"}, {"iptables-nft-save"}, {"nft", "list", "ruleset"}} {
		out, err := l.Node.Run(context.Background(), cmd[0], cmd[1:]...)
		if err != nil {
			t.Errorf("%s: %v", cmd, err)
			continue
		}
		for line := range strings.Lines(string(out)) {
			if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
				t.Errorf("%s in bind mode shows netfilter state:\n%s", strings.Join(cmd, " "), out)
				break
			}
		}
	}
}

// ourAddresses lists the node's addresses that carry our label.
func ourAddresses(t *testing.T, l *lab.Lab) string {
	t.Helper()
	out, err := l.Node.Run(context.Background(), "ip", "-4", "-o", "addr", "show")
	if err != nil {
		t.Fatal(err)
	}
	var ours []string
	for line := range strings.Lines(string(out)) {
		if strings.Contains(line, ":kup") {
			ours = append(ours, strings.TrimSpace(line))
		}
	}
	return strings.Join(ours, "\n")
}

// metricValue finds the value of one series in Prometheus text output; -1
// when it is not there.
func metricValue(text, series string) float64 {
	for line := range strings.Lines(text) {
		if name, value, ok := strings.Cut(strings.TrimSpace(line), " "); ok && name == series {
			var v float64
			if _, err := fmt.Sscan(value, &v); err == nil {
				return v
			}
		}
	}
	return -1
}
