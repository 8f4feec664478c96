// Package node tests the proxy where it is meant to run: its image, built
// here, as the DaemonSet of deploy/ on a real kubelet with containerd
// (package kubenode), with real pods made by Deployments, reached by
// ClusterIP and by name; and an upgrade of the DaemonSet under load that
// must drop nothing. It needs root, the node's build (KUBE_TESTENV_BIN)
// and the images (KUP_IMAGE_ARCHIVE, KUP_NODE_IMAGES): make test provides
// all three. docs/node.md explains it.
package node

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/kubenode"
)

// clusterDomain is the seed's: pods' names end in .svc.k8s.cluster.local.
const clusterDomain = "k8s.cluster.local"

// TestRealNode brings up one node and runs, in order, the DaemonSet, the
// Service story with kubectl, and an upgrade under load, each needing the
// ones before.
func TestRealNode(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root: it runs a kubelet and containerd in namespaces of its own (make test runs as root in CI)")
	}
	images := os.Getenv("KUP_NODE_IMAGES")
	proxyImage := os.Getenv("KUP_IMAGE_ARCHIVE")
	if images == "" || proxyImage == "" {
		t.Fatal("KUP_NODE_IMAGES or KUP_IMAGE_ARCHIVE is not set: make test builds the images (make image node-images)")
	}
	bin, err := kubenodeBin()
	if err != nil {
		t.Fatal(err)
	}
	n, err := kubenode.Start(kubenode.Options{
		Bin:           bin,
		Dir:           t.TempDir(),
		ClusterDomain: clusterDomain,
		SandboxImage:  "docker.io/kup/pause:test",
		Images: []string{filepath.Join(images, "pause.tar"), filepath.Join(images, "lab.tar"),
			proxyImage, filepath.Join(images, "kube-userspace-proxy-v2.tar")},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the proxy's containers:\n%s", n.ContainerLogs("kube-system", "kube-userspace-proxy"))
			if d := os.Getenv("KUBENODE_DEBUG_DIR"); d != "" {
				exec.Command("cp", "-r", n.Env.Path("logs"), d).Run()
			}
			for _, name := range []string{"kubelet", "containerd"} {
				if log, err := os.ReadFile(n.Env.Path("logs/" + name + ".log")); err == nil {
					t.Logf("%s's log ends:\n%s", name, tail(string(log), 3000))
				}
			}
		}
		if err := n.Close(); err != nil {
			t.Errorf("tear the node down: %v", err)
		}
	})
	t.Run("Image", func(t *testing.T) { testImage(t, n) })
	ok := t.Run("DaemonSet", func(t *testing.T) { testDaemonSet(t, n) }) &&
		t.Run("Story", func(t *testing.T) { testStory(t, n) })
	if ok {
		t.Run("Upgrade", func(t *testing.T) { testUpgrade(t, n) })
	}
}

func kubenodeBin() (string, error) {
	dir := os.Getenv("KUBE_TESTENV_BIN")
	if dir == "" {
		return "", fmt.Errorf("KUBE_TESTENV_BIN is not set: make test builds the node (hack/kube-testenv)")
	}
	for _, b := range []string{"kubelet", "kube-scheduler", "kubectl", "containerd", "containerd-shim-runc-v2", "ctr"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			return "", fmt.Errorf("the node's build lacks %s (make kube-testenv): %w", b, err)
		}
	}
	return dir, nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// smokeScript runs in the proxy's image, in a network namespace of its
// own with NET_ADMIN: the proxy serves a manifest and programs its rules,
// which the script shows; then, stopped, --cleanup removes them.
const smokeScript = `set -e
# ctr gives containers an open file limit of 1024, which leaves the proxy
# no room for connections by its budget: say how many instead.
kube-userspace-proxy --manifests /smoke/web.yaml --healthz-bind-address= --metrics-bind-address= \
  --tcp-max-connections=64 --udp-max-sessions=64 &
pid=$!
for i in $(seq 100); do
  if iptables-save -t nat | grep -q 'default/web:http'; then break; fi
  sleep 0.1
done
echo "rules while serving: $(iptables-save -t nat | grep -c 'default/web:http')"
kill -TERM $pid
wait $pid
kube-userspace-proxy --cleanup
echo "our chains after --cleanup: $(iptables-save | grep -c KUP || true)"
`

const smokeManifest = `apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.0.9], conditions: {ready: true}}]
`

// testImage is the image's smoke test in containerd, outside Kubernetes:
// it runs --version, and in a network namespace of its own with NET_ADMIN
// it programs its rules and --cleanup removes them.
func testImage(t *testing.T, n *kubenode.Node) {
	image := "docker.io/library/kube-userspace-proxy:dev"
	out, err := n.Ctr("run", "--rm", "--cgroup", n.CgroupParent()+"/smoke-version", image, "smoke-version",
		"/usr/local/bin/kube-userspace-proxy", "--version")
	if err != nil || !regexp.MustCompile(`(?m)^kube-userspace-proxy \S+$`).Match(out) {
		t.Fatalf("--version in the image: %v\n%s", err, out)
	}
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "web.yaml"), []byte(smokeManifest), 0o644)
	out, err = n.Ctr("run", "--rm", "--cap-add", "CAP_NET_ADMIN", "--cgroup", n.CgroupParent()+"/smoke-rules",
		"--mount", "type=bind,src="+dir+",dst=/smoke,options=rbind:ro", image, "smoke-rules",
		"/bin/sh", "-c", smokeScript)
	if err != nil {
		t.Fatalf("the image programming its rules: %v\n%s", err, out)
	}
	// Two rules per ClusterIP: PORTALS-CONTAINER (pods) and -HOST (the node).
	for _, want := range []string{"rules while serving: 2", "our chains after --cleanup: 0"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("the image's smoke test lacks %q:\n%s", want, out)
		}
	}
}

// testDaemonSet applies deploy/ with the API server's address, and, as
// this node has no CoreDNS, the DNS stub's two flags; the DaemonSet's pod
// must be Ready with no restart, answer /livez on the node, and run as its
// ServiceAccount, bound to system:node-proxier and nothing else.
func testDaemonSet(t *testing.T, n *kubenode.Node) {
	manifest, err := kubenode.DeployManifest("../../deploy/kube-userspace-proxy.yaml", clusterDomain)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "kube-userspace-proxy.yaml")
	os.WriteFile(path, []byte(manifest), 0o644)
	if out, err := n.Kubectl("apply", "-f", path).CombinedOutput(); err != nil {
		t.Fatalf("kubectl apply: %v\n%s", err, out)
	}
	if out, err := n.Kubectl("-n", "kube-system", "rollout", "status", "daemonset/kube-userspace-proxy", "--timeout=180s").CombinedOutput(); err != nil {
		t.Fatalf("the DaemonSet never became ready: %v\n%s\n%s", err, out, describe(n))
	}
	pod := proxyPod(t, n)
	for _, cs := range pod.Status.ContainerStatuses {
		if !cs.Ready || cs.RestartCount != 0 {
			t.Errorf("container %s: ready %v, %d restarts; want ready, none", cs.Name, cs.Ready, cs.RestartCount)
		}
	}
	if pod.Spec.ServiceAccountName != "kube-userspace-proxy" {
		t.Errorf("the pod runs as ServiceAccount %q", pod.Spec.ServiceAccountName)
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: n.Dial}, Timeout: 5 * time.Second}
	resp, err := hc.Get("http://" + kubenode.NodeIP.String() + ":10256/livez")
	if err != nil {
		t.Fatalf("/livez on the node: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("/livez: %s", resp.Status)
	}
	// Its rights: those of system:node-proxier, kube-proxy's, alone.
	sa := "system:serviceaccount:kube-system:kube-userspace-proxy"
	for _, c := range []struct {
		verb, resource string
		want           string
	}{
		{"list", "services", "yes"}, {"watch", "endpointslices.discovery.k8s.io", "yes"}, {"get", "nodes", "yes"},
		{"list", "secrets", "no"}, {"list", "pods", "no"}, {"create", "services", "no"},
	} {
		out, _ := n.Kubectl("auth", "can-i", c.verb, c.resource, "--all-namespaces", "--as="+sa).CombinedOutput()
		if got := strings.TrimSpace(string(out)); got != c.want {
			t.Errorf("can %s %s %s: %q, want %q", sa, c.verb, c.resource, got, c.want)
		}
	}
	crbs, err := n.Env.Admin.RbacV1().ClusterRoleBindings().List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var roles []string
	for _, b := range crbs.Items {
		for _, s := range b.Subjects {
			if s.Kind == "ServiceAccount" && s.Name == "kube-userspace-proxy" {
				roles = append(roles, b.RoleRef.Name)
			}
		}
	}
	if len(roles) != 1 || roles[0] != "system:node-proxier" {
		t.Errorf("the ServiceAccount is bound to %v; want system:node-proxier alone", roles)
	}
}

// proxyPod is the DaemonSet's one running pod.
func proxyPod(t *testing.T, n *kubenode.Node) corev1.Pod {
	t.Helper()
	pods, err := n.Env.Admin.CoreV1().Pods("kube-system").List(context.Background(), metav1.ListOptions{LabelSelector: "k8s-app=kube-userspace-proxy"})
	if err != nil {
		t.Fatal(err)
	}
	var running []corev1.Pod
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning {
			running = append(running, p)
		}
	}
	if len(running) != 1 {
		t.Fatalf("%d running proxy pods; want 1", len(running))
	}
	return running[0]
}

func describe(n *kubenode.Node) string {
	out, _ := n.Kubectl("describe", "pods", "--all-namespaces").CombinedOutput()
	return tail(string(out), 6000)
}

// testStory runs the Service story, every step checked.
func testStory(t *testing.T, n *kubenode.Node) {
	s := &kubenode.Story{Node: n, Dir: "../../docs/examples/node"}
	for _, step := range kubenode.Steps() {
		_, shown := s.Command(step)
		start := time.Now()
		out, err := s.Run(context.Background(), step)
		if err != nil {
			t.Fatalf("%v\n%s", err, describe(n))
		}
		t.Logf("%s (%s)\n%s", shown, time.Since(start).Round(time.Millisecond), strings.TrimSpace(out))
	}
}

var loadResult = regexp.MustCompile(`sent (\d+) failed (\d+)`)

// testUpgrade: kubectl set image moves the DaemonSet to a second image
// tag while the client pod sends 50 requests a second through the
// ClusterIP and holds a long download: no request fails, the download
// arrives whole, and the new pod took the sockets over.
func testUpgrade(t *testing.T, n *kubenode.Node) {
	ctx := context.Background()
	old := proxyPod(t, n)
	type result struct {
		out []byte
		err error
	}
	run := func(args ...string) chan result {
		ch := make(chan result, 1)
		go func() {
			out, err := n.Kubectl(append([]string{"exec", "client", "--", "/kup-lab"}, args...)...).CombinedOutput()
			ch <- result{out, err}
		}()
		return ch
	}
	// The upgrade begins once the load runs through the proxy: its
	// metrics, on the node's loopback, count the connections carried.
	hc := &http.Client{Transport: &http.Transport{DialContext: n.Dial}, Timeout: 2 * time.Second}
	before := proxiedConnections(hc)
	if before < 0 {
		t.Fatal("the proxy's metrics cannot be read on the node")
	}
	load := run("load", "--rate", "50", "--duration", "25s", "http://svc-test-1/")
	download := run("download", "http://svc-test-1/bytes?n=20000000&rate=1000000")
	err := wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, 30*time.Second, true, func(context.Context) (bool, error) {
		return proxiedConnections(hc) >= before+50, nil
	})
	if err != nil {
		t.Fatalf("the load never reached the proxy: %v", err)
	}
	if out, err := n.Kubectl("-n", "kube-system", "set", "image", "daemonset/kube-userspace-proxy", "kube-userspace-proxy=kube-userspace-proxy:v2").CombinedOutput(); err != nil {
		t.Fatalf("kubectl set image: %v\n%s", err, out)
	}
	if out, err := n.Kubectl("-n", "kube-system", "rollout", "status", "daemonset/kube-userspace-proxy", "--timeout=120s").CombinedOutput(); err != nil {
		t.Fatalf("the upgrade did not finish: %v\n%s\n%s", err, out, describe(n))
	}
	// The old pod is gone once it drained.
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
		_, err := n.Env.Admin.CoreV1().Pods("kube-system").Get(ctx, old.Name, metav1.GetOptions{})
		return err != nil, nil
	})
	if err != nil {
		t.Errorf("the old proxy pod %s is still there", old.Name)
	}
	pod := proxyPod(t, n)
	if pod.Spec.Containers[0].Image != "kube-userspace-proxy:v2" {
		t.Errorf("the proxy pod runs %s", pod.Spec.Containers[0].Image)
	}
	if rc := pod.Status.ContainerStatuses[0].RestartCount; rc != 0 {
		prev, _ := n.Kubectl("-n", "kube-system", "logs", "--previous", pod.Name).CombinedOutput()
		t.Errorf("the new proxy restarted %d times; its previous log:\n%s", rc, tail(string(prev), 4000))
	}
	logs, _ := n.Kubectl("-n", "kube-system", "logs", pod.Name).CombinedOutput()
	if !strings.Contains(string(logs), "Took the listening sockets over from the running proxy") {
		t.Errorf("the new proxy did not take the sockets over; its log:\n%s", tail(string(logs), 3000))
	}
	l := <-load
	m := loadResult.FindSubmatch(l.out)
	if l.err != nil || m == nil || string(m[2]) != "0" {
		t.Errorf("the load across the upgrade: %v\n%s", l.err, l.out)
	} else {
		t.Logf("across the upgrade: %s", l.out)
	}
	d := <-download
	if d.err != nil || strings.TrimSpace(string(d.out)) != "ok 20000000 bytes" {
		t.Errorf("the download across the upgrade: %v\n%s", d.err, d.out)
	}
}

// proxiedConnections is the TCP connections the node's proxy has carried,
// from its metrics; -1 when they cannot be read.
func proxiedConnections(hc *http.Client) float64 {
	resp, err := hc.Get("http://127.0.0.1:10249/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	const series = `kube_userspace_proxy_connections_total{protocol="TCP",result="ok"} `
	for line := range strings.Lines(string(body)) {
		if v, ok := strings.CutPrefix(line, series); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil {
				return f
			}
		}
	}
	return -1
}
