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

const (
	clusterDNS    = "10.11.12.254"
	clusterDomain = "k8s.cluster.local"
)

// kubeDNS is a kube-dns Service that owns the cluster DNS IP, as in a real
// cluster. Its pod is a web server that speaks no DNS: if the Service won
// port 53, names would not resolve. Its metrics port must keep working.
const kubeDNS = `---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: ` + clusterDNS + `
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 8080}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 8080}
  - {name: metrics, port: 9153, protocol: TCP, targetPort: 8080}
---
apiVersion: v1
kind: Pod
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec: {containers: [{name: c}]}
status:
  podIP: 10.244.9.2
  conditions: [{type: Ready, status: "True"}]
`

// unreadyWeb is a pod of svc-test-1 that is not ready: an endpoint the
// Service lists, but not one DNS publishes.
const unreadyWeb = `---
apiVersion: v1
kind: Pod
metadata: {name: web-unready, namespace: default, labels: {app: web-front-end}}
spec: {containers: [{name: web, ports: [{name: web-port, containerPort: 8080}]}]}
status:
  podIP: 10.244.8.2
  conditions: [{type: Ready, status: "False"}]
`

// TestDNSInTheLab: a pod configured as kubelet configures it (search path,
// ndots:5, the cluster DNS IP as its nameserver) resolves Services by short
// name through the stub on its node, in both modes; outside names are
// forwarded to an upstream server in another namespace; when that server is
// down the pod gets SERVFAIL in under 3s.
func TestDNSInTheLab(t *testing.T) {
	for _, mode := range []string{"redirect", "bind"} {
		t.Run(mode, func(t *testing.T) { dnsInTheLab(t, mode) })
	}
}

func dnsInTheLab(t *testing.T, mode string) {
	ctx := context.Background()
	l, client, manifest := firstStoryLab(t, kubeDNS+unreadyWeb)
	coredns := lab.NewWebPod(9, "v1", 8080) // 10.244.9.2, the kube-dns Service's pod
	if _, err := l.AddWeb(tools, coredns); err != nil {
		t.Fatal(err)
	}
	// What kubelet writes for a pod in namespace default.
	resolv := fmt.Sprintf("search default.svc.%[1]s svc.%[1]s %[1]s\nnameserver %[2]s\noptions ndots:5\n", clusterDomain, clusterDNS)
	for _, ns := range []*lab.NS{&client.NS, l.Node} {
		if err := l.SetResolvConf(ns, resolv); err != nil {
			t.Fatal(err)
		}
	}
	upstream, err := l.Start(l.Ext, tools.Helper, "dns", "--listen", lab.ExtIP.String()+":53", "--answer", "www.example.org=192.0.2.80")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := upstream.WaitFor(0, 10*time.Second, func(s string) bool { return strings.HasPrefix(s, "serving DNS") }); err != nil {
		t.Fatal(err)
	}
	if _, err := l.StartProxy(tools, manifest, "--mode", mode, "--cluster-dns", clusterDNS,
		"--cluster-domain", clusterDomain, "--dns-upstream", lab.ExtIP.String()); err != nil {
		t.Fatal(err)
	}

	t.Run("curl by short name", func(t *testing.T) {
		for _, ns := range []*lab.NS{&client.NS, l.Node} {
			got, err := ns.Curl(ctx, "http://svc-test-1/")
			if want := "This is Web Server 1 running on 8080!"; err != nil || got != want {
				t.Errorf("curl http://svc-test-1 from %s = %q, %v; want %q", ns.Name, got, err, want)
			}
		}
	})
	t.Run("nslookup", func(t *testing.T) {
		out, err := client.Run(ctx, "nslookup", "svc-test-1")
		got := string(out)
		if err != nil || !strings.Contains(got, "svc-test-1.default.svc."+clusterDomain) || !strings.Contains(got, lab.ClusterIP.String()) {
			t.Errorf("nslookup svc-test-1: %v\n%s", err, got)
		}
		// Over TCP too.
		out, err = client.Run(ctx, "dig", "+tcp", "+short", "svc-test-1.default.svc."+clusterDomain)
		if err != nil || strings.TrimSpace(string(out)) != lab.ClusterIP.String() {
			t.Errorf("dig +tcp: %q, %v", out, err)
		}
	})
	t.Run("the stub wins port 53 of the cluster DNS IP; the Service keeps its other ports", func(t *testing.T) {
		got, err := client.Curl(ctx, fmt.Sprintf("http://%s:9153/", clusterDNS))
		if err != nil || !strings.HasPrefix(got, "This is Web Server 9") {
			t.Errorf("kube-dns metrics port through the Service: %q, %v", got, err)
		}
	})
	t.Run("outside names are forwarded", func(t *testing.T) {
		out, err := client.Run(ctx, "nslookup", "www.example.org")
		if err != nil || !strings.Contains(string(out), "192.0.2.80") {
			t.Errorf("nslookup www.example.org: %v\n%s", err, out)
		}
	})
	t.Run("pod records", func(t *testing.T) {
		// kubeadm's CoreDNS (pods insecure), which upstream's DNS
		// conformance probes expect.
		out, err := client.Run(ctx, "dig", "+short", "10-244-1-2.default.pod."+clusterDomain)
		if err != nil || strings.TrimSpace(string(out)) != "10.244.1.2" {
			t.Errorf("dig 10-244-1-2.default.pod: %q, %v; want 10.244.1.2", out, err)
		}
	})
	t.Run("reverse lookups of a not-ready endpoint and of an unknown address alike", func(t *testing.T) {
		// Both are forwarded (kubeadm's fallthrough in-addr.arpa): the
		// lab's upstream answers NXDOMAIN, without the AA bit the stub's
		// own answers carry.
		summary := func(ip string) string {
			out, _ := client.Run(ctx, "dig", "-x", ip)
			var status, flags string
			for line := range strings.Lines(string(out)) {
				if _, rest, ok := strings.Cut(line, "status: "); ok {
					status, _, _ = strings.Cut(rest, ",")
				}
				if _, rest, ok := strings.Cut(line, ";; flags: "); ok {
					flags, _, _ = strings.Cut(rest, ";")
				}
			}
			return status + " (" + flags + ")"
		}
		unready, unknown := summary("10.244.8.2"), summary("10.244.77.77")
		if unready != unknown || unready != "NXDOMAIN (qr rd ra)" {
			t.Errorf("dig -x: not-ready endpoint %s, unknown address %s; want both NXDOMAIN from upstream (qr rd ra)", unready, unknown)
		}
		if ours := summary(lab.ClusterIP.String()); !strings.HasPrefix(ours, "NOERROR (qr aa") {
			t.Errorf("dig -x %s (the ClusterIP): %s, want the stub's own answer", lab.ClusterIP, ours)
		}
	})
	t.Run("upstream down: SERVFAIL in under 3s", func(t *testing.T) {
		upstream.Signal(syscall.SIGKILL)
		start := time.Now()
		out, _ := client.Run(ctx, "dig", "+tries=1", "+time=5", "www.example.org")
		if took := time.Since(start); !strings.Contains(string(out), "status: SERVFAIL") || took > 3*time.Second {
			t.Errorf("with the upstream down, after %s:\n%s\nwant SERVFAIL in under 3s", took, out)
		}
	})
	if mode == "bind" {
		noNetfilter(t, l)
	}
}
