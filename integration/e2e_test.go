package integration

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

// emptyService is a NodePort Service whose selector matches no pod, with a
// TCP and a UDP port. SELECTOR is replaced to give it pods.
const emptyService = `---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.24
  selector: {app: SELECTOR}
  ports:
  - {name: http, port: 80, targetPort: web-port, nodePort: 30084}
  - {name: echo, port: 5353, protocol: UDP, targetPort: udp-echo, nodePort: 30054}
`

// evictedService is upstream's "should be rejected for evicted pods": a
// Service that publishes not-ready addresses, whose only pod was evicted
// (phase Failed, its IP still in its status). The EndpointSlice controller
// lists no endpoint for a failed pod, and neither does the manifest source.
const evictedService = `---
apiVersion: v1
kind: Service
metadata: {name: evicted, namespace: default}
spec:
  clusterIP: 10.96.0.29
  publishNotReadyAddresses: true
  selector: {app: evicted}
  ports:
  - {name: http, port: 80, targetPort: 8080}
---
apiVersion: v1
kind: Pod
metadata: {name: evicted-pod, namespace: default, labels: {app: evicted}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}]}]}
status: {phase: Failed, reason: Evicted, podIP: 10.244.1.2}
`

// refusal reports how ns's attempt to reach addr over network ended: nil
// when something answered, else the error (for UDP, that of reading the
// reply to one datagram, which an ICMP port unreachable ends at once).
// It waits 300ms at most: within retries it, a refusal comes at once, and
// an attempt that began before a rule existed would otherwise wait for the
// client's retransmit (a second) and hide how soon the rule came.
func refusal(ns *lab.NS, network, addr string) error {
	_, err := exchangeWithin(ns, network, addr, 300*time.Millisecond)
	return err
}

// exchange sends one request to addr from ns (HTTP over TCP to the lab's
// web pods, a datagram over UDP to their echo), reads the answer, and
// returns the client's own address.
func exchange(ns *lab.NS, network, addr string) (string, error) {
	return exchangeWithin(ns, network, addr, 5*time.Second)
}

func exchangeWithin(ns *lab.NS, network, addr string, timeout time.Duration) (string, error) {
	c, err := ns.DialTimeout(network, addr, timeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	ask := "GET / HTTP/1.0\r\n\r\n"
	if network == "udp" {
		ask = "anyone?"
	}
	if _, err := c.Write([]byte(ask)); err != nil {
		return "", err
	}
	if _, err := c.Read(make([]byte, 512)); err != nil {
		return "", err
	}
	return c.LocalAddr().String(), nil
}

// TestNoEndpointsRefused: upstream's e2e "should be rejected when no
// endpoints exist". A connection to a Service with no endpoints fails at
// once with "connection refused", and a datagram draws ICMP port
// unreachable, at the ClusterIP and the NodePort, from a pod and from the
// node, in both modes. Given pods, the Service answers; without them again,
// it is refused again.
func TestNoEndpointsRefused(t *testing.T) {
	for _, mode := range []string{"redirect", "bind"} {
		t.Run(mode, func(t *testing.T) {
			l, client, manifest := firstStoryLab(t, strings.ReplaceAll(emptyService, "SELECTOR", "nobody")+evictedService)
			// The kernel sends a host at most one ICMP error a second
			// after a burst of six (net.ipv4.icmp_ratelimit), whoever
			// refuses: our REJECT rule, or the kernel for a port nobody
			// binds. A client's retries meet that pace; this test
			// probes every few milliseconds, so the node's limit is
			// lifted, or refusals would look like silence.
			if _, err := l.Node.Run(context.Background(), "sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"); err != nil {
				t.Fatal(err)
			}
			proxy, err := l.StartProxy(tools, manifest, "--mode", mode)
			if err != nil {
				t.Fatal(err)
			}
			frontends := []struct {
				from          *lab.NS
				network, addr string
			}{
				{&client.NS, "tcp", "10.96.0.24:80"},
				{&client.NS, "udp", "10.96.0.24:5353"},
				{&client.NS, "tcp", fmt.Sprintf("%s:30084", lab.NodeIP)},
				{&client.NS, "udp", fmt.Sprintf("%s:30054", lab.NodeIP)},
				{l.Node, "tcp", "10.96.0.24:80"},
				{l.Node, "udp", "10.96.0.24:5353"},
			}
			refused := func() error {
				var errs []error
				for _, f := range frontends {
					if err := refusal(f.from, f.network, f.addr); !errors.Is(err, syscall.ECONNREFUSED) {
						errs = append(errs, fmt.Errorf("%s %s from %s: %v, want connection refused", f.network, f.addr, f.from.Name, err))
					}
				}
				return errors.Join(errs...)
			}
			served := func() error {
				var errs []error
				for _, f := range frontends {
					if err := refusal(f.from, f.network, f.addr); err != nil {
						errs = append(errs, fmt.Errorf("%s %s from %s: %w", f.network, f.addr, f.from.Name, err))
					}
				}
				return errors.Join(errs...)
			}
			if _, err := within(5*time.Second, refused); err != nil {
				t.Fatal(err)
			}
			if err := refusal(&client.NS, "tcp", "10.96.0.29:80"); !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("the Service of an evicted pod: %v, want connection refused", err)
			}
			// Both ways, as quickly as an endpoint change is applied.
			for _, step := range []struct {
				selector string
				want     func() error
			}{{"web-front-end", served}, {"nobody", refused}, {"web-front-end", served}} {
				edit(t, manifest, lab.FirstStory().Manifest()+strings.ReplaceAll(emptyService, "SELECTOR", step.selector)+evictedService)
				took, err := within(5*time.Second, step.want)
				if err != nil {
					rules, _ := l.Node.Run(context.Background(), "sh", "-c", "iptables-save -c; cat /proc/net/nf_conntrack; ss -tlnp")
					t.Fatalf("selector app=%s: %v\nproxy:\n%s\nrules:\n%s", step.selector, err, proxy.Output(), rules)
				}
				t.Logf("selector app=%s took effect in %s", step.selector, took.Round(time.Millisecond))
			}
		})
	}
}

// edit replaces the manifest at path with text, atomically.
func edit(t *testing.T, path, text string) {
	t.Helper()
	tmp := filepath.Join(filepath.Dir(path), ".edit.tmp")
	if err := os.WriteFile(tmp, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// within retries f until it succeeds or timeout passes, and says how long
// it took; the error is f's last.
func within(timeout time.Duration, f func() error) (time.Duration, error) {
	start := time.Now()
	var last error
	err := wait.PollUntilContextTimeout(context.Background(), 20*time.Millisecond, timeout, true, func(context.Context) (bool, error) {
		last = f()
		return last == nil, nil
	})
	if err != nil {
		return time.Since(start), fmt.Errorf("not within %s: %w", timeout, last)
	}
	return time.Since(start), nil
}

// nodePortService is a NodePort Service NAME at CLUSTERIP, in front of the
// first story's pods, on nodePort 30085.
const nodePortService = `---
apiVersion: v1
kind: Service
metadata: {name: NAME, namespace: default}
spec:
  type: NodePort
  clusterIP: CLUSTERIP
  selector: {app: web-front-end}
  ports:
  - {name: http, port: 8085, targetPort: web-port, nodePort: 30085}
`

// TestNodePortChangesHands: one edit deletes a NodePort Service and gives
// its nodePort to a new one. The new Service is served at that NodePort at
// once, in both modes (in bind mode both are wildcard sockets on the same
// port: the old one must go before the new one can bind).
func TestNodePortChangesHands(t *testing.T) {
	service := func(name, ip string) string {
		return strings.NewReplacer("NAME", name, "CLUSTERIP", ip).Replace(nodePortService)
	}
	for _, mode := range []string{"redirect", "bind"} {
		t.Run(mode, func(t *testing.T) {
			l, client, manifest := firstStoryLab(t, service("np-old", "10.96.0.25"))
			proxy, err := l.StartProxy(tools, manifest, "--mode", mode)
			if err != nil {
				t.Fatal(err)
			}
			nodePort := fmt.Sprintf("%s:30085", lab.NodeIP)
			if _, err := within(5*time.Second, func() error { return refusal(&client.NS, "tcp", nodePort) }); err != nil {
				t.Fatalf("the first Service at its NodePort: %v", err)
			}
			edit(t, manifest, lab.FirstStory().Manifest()+service("np-new", "10.96.0.26"))
			took, err := within(5*time.Second, func() error {
				if err := refusal(&client.NS, "tcp", "10.96.0.26:8085"); err != nil {
					return fmt.Errorf("the new Service's ClusterIP: %w", err)
				}
				return refusal(&client.NS, "tcp", nodePort)
			})
			if err != nil {
				t.Fatalf("the new Service at the NodePort it took over: %v\nproxy:\n%s", err, proxy.Output())
			}
			t.Logf("served at the NodePort %s after the edit", took.Round(time.Millisecond))
			if strings.Contains(proxy.Output(), "listen for") {
				t.Errorf("a listener failed on the way:\n%s", proxy.Output())
			}
		})
	}
}

// TestManifestHonoursServiceLabels: kube-proxy never proxies a Service
// labelled service.kubernetes.io/headless, nor one that names another
// proxy in service.kubernetes.io/service-proxy-name; a manifest is read
// with the same filter as the API server is asked for.
func TestManifestHonoursServiceLabels(t *testing.T) {
	labelled := func(name, ip, label string) string {
		withLabel := strings.Replace(nodePortService, "namespace: default}", "namespace: default, labels: {"+label+"}}", 1)
		return strings.NewReplacer("NAME", name, "CLUSTERIP", ip).Replace(withLabel)
	}
	extra := labelled("headless-label", "10.96.0.27", "service.kubernetes.io/headless: \"\"") +
		strings.ReplaceAll(labelled("other-proxy", "10.96.0.28", "service.kubernetes.io/service-proxy-name: other"), "30085", "30087")
	l, client, manifest := firstStoryLab(t, extra)
	proxy, err := l.StartProxy(tools, manifest)
	if err != nil {
		t.Fatal(err)
	}
	out := proxy.Output()
	if !strings.Contains(out, `"service":"default/svc-test-1:http"`) {
		t.Fatalf("the story's Service was not served:\n%s", out)
	}
	for _, name := range []string{"headless-label", "other-proxy"} {
		if strings.Contains(out, "default/"+name) {
			t.Errorf("%s was served:\n%s", name, out)
		}
	}
	if err := refusal(&client.NS, "tcp", "10.96.0.27:8085"); err == nil {
		t.Error("the headless-labelled Service's ClusterIP answered")
	}
}

// secondPod is a pod of the lab's web pod 2, labelled app=second.
const secondPod = `---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: default, labels: {app: second}}
spec:
  containers:
  - name: web
    ports:
    - {name: web-port, containerPort: 8080}
    - {name: udp-echo, containerPort: 5353, protocol: UDP}
status: {podIP: 10.244.2.2, conditions: [{type: Ready, status: "True"}]}
`

// TestUDPClientSurvivesServerPodCycle: upstream's conntrack e2e "should be
// able to preserve UDP traffic when server pod cycles" (ClusterIP and
// NodePort). A client keeps sending from one socket while its Service's
// only pod goes away (the Service has no endpoints for a while: refused)
// and another takes its place: the client reaches the new pod.
func TestUDPClientSurvivesServerPodCycle(t *testing.T) {
	for _, to := range []string{"10.96.0.24:5353", lab.NodeIP.String() + ":30054"} {
		t.Run(to, func(t *testing.T) {
			manifest := func(selector string) string {
				return strings.ReplaceAll(emptyService, "SELECTOR", selector) + secondPod
			}
			l, client, path := firstStoryLab(t, manifest("web-front-end"))
			second := lab.NewWebPod(2, "v1", 8080)
			if _, err := l.AddWeb(tools, second); err != nil {
				t.Fatal(err)
			}
			if _, err := l.StartProxy(tools, path); err != nil {
				t.Fatal(err)
			}
			udp, err := l.Start(&client.NS, tools.Helper, "udp", to, "-n", "100000", "--timeout", "100ms", "--retry-for", "30s")
			if err != nil {
				t.Fatal(err)
			}
			first := lab.FirstStory().Pods[0].Greeting()
			if _, err := udp.WaitFor(0, 10*time.Second, func(s string) bool { return strings.HasPrefix(s, first) }); err != nil {
				t.Fatal(err)
			}
			// The pod goes; for a moment the Service has none.
			edit(t, path, lab.FirstStory().Manifest()+manifest("nobody"))
			if _, err := within(5*time.Second, func() error {
				if err := refusal(&client.NS, "udp", to); !errors.Is(err, syscall.ECONNREFUSED) {
					return fmt.Errorf("%v, want refused", err)
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			from := udp.NumLines()
			edit(t, path, lab.FirstStory().Manifest()+manifest("second"))
			if _, err := udp.WaitFor(from, 10*time.Second, func(s string) bool { return strings.HasPrefix(s, second.Greeting()) }); err != nil {
				t.Fatalf("the client, still sending from its socket, never reached the new pod: %v", err)
			}
		})
	}
}
