package integration

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/kubetestenv"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

var (
	apiOnce sync.Once
	apiEnv  *kubetestenv.Env
	apiErr  error
	apiDir  string
)

// controlPlane starts the package's real control plane on first use.
// Without the binaries the test fails: CI builds them (make test).
func controlPlane(t testing.TB) *kubetestenv.Env {
	t.Helper()
	apiOnce.Do(func() {
		bin, err := kubetestenv.BinDir()
		if err != nil {
			apiErr = err
			return
		}
		if apiDir, err = os.MkdirTemp("", "kup-controlplane-"); err != nil {
			apiErr = err
			return
		}
		apiEnv, apiErr = kubetestenv.Start(bin, apiDir)
	})
	if apiErr != nil {
		t.Fatalf("control plane: %v", apiErr)
	}
	return apiEnv
}

// apiNamespace creates a namespace named after prefix for one test, and
// deletes it when the test ends.
func apiNamespace(tb testing.TB, c kubernetes.Interface, prefix string) string {
	tb.Helper()
	ctx := context.Background()
	ns := fmt.Sprintf("%s-%d", prefix, time.Now().UnixNano()%1e9)
	if _, err := c.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{}) })
	return ns
}

// ensureNode makes sure a Node object called name exists: the EndpointSlice
// controller skips pods bound to nodes it does not know.
func ensureNode(tb testing.TB, c kubernetes.Interface, name string) {
	tb.Helper()
	if _, err := c.CoreV1().Nodes().Create(context.Background(), &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		tb.Fatal(err)
	}
}

// startAPIProxy starts the proxy in lab node node, as Node nodeName, under
// kube-proxy's identity, reaching the control plane through a forward into
// the node's namespace, with extra flags.
func startAPIProxy(tb testing.TB, env *kubetestenv.Env, l *lab.Lab, node *lab.NS, nodeName string, extra ...string) *lab.Proc {
	tb.Helper()
	args := append([]string{"--kubeconfig", apiKubeconfig(tb, env, l, node), "--hostname-override", nodeName}, extra...)
	proxy, err := l.StartProxyOn(node, tools, "", args...)
	if err != nil {
		tb.Fatal(err)
	}
	return proxy
}

// apiKubeconfig forwards a port in node to the API server and writes a
// kubeconfig for kube-proxy's identity that uses it.
func apiKubeconfig(tb testing.TB, env *kubetestenv.Env, l *lab.Lab, node *lab.NS) string {
	tb.Helper()
	port, err := l.Forward(node, fmt.Sprintf("127.0.0.1:%d", env.APIPort))
	if err != nil {
		tb.Fatal(err)
	}
	kubeconfig, err := env.Kubeconfig(node.Name+".kubeconfig", fmt.Sprintf("https://127.0.0.1:%d", port))
	if err != nil {
		tb.Fatal(err)
	}
	return kubeconfig
}

// stopControlPlane is called by TestMain after the tests.
func stopControlPlane() {
	if apiEnv != nil {
		apiEnv.Stop()
	}
	if apiDir != "" && os.Getenv("KUBETESTENV_KEEP") == "" {
		os.RemoveAll(apiDir)
	}
}

// kubelet plays the only part of a kubelet the tests need: it creates Pods
// bound to a Node and reports them running and ready at the lab's address.
type kubelet struct {
	t    testing.TB
	c    kubernetes.Interface
	ns   string
	node string
	// dualStack reports the pod's IPv6 address too, as a kubelet on a
	// dual-stack node does (status.podIPs).
	dualStack bool
}

func (k *kubelet) run(w lab.WebPod, labels map[string]string) {
	k.t.Helper()
	ctx := context.Background()
	pod := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: w.Name, Namespace: k.ns, Labels: labels},
		Spec: v1.PodSpec{NodeName: k.node, Containers: []v1.Container{{
			Name: "web", Image: "example.org/web:" + w.Version,
			Ports: []v1.ContainerPort{{Name: "web-port", ContainerPort: int32(w.WebPort)}, {Name: "udp-echo", ContainerPort: lab.UDPTargetPort, Protocol: v1.ProtocolUDP}},
		}}},
	}
	// Pods are refused until the namespace's default ServiceAccount exists;
	// the serviceaccount controller makes it within moments.
	var err error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if pod, err = k.c.CoreV1().Pods(k.ns).Create(ctx, pod, metav1.CreateOptions{}); err == nil {
			break
		}
	}
	if err != nil {
		k.t.Fatalf("create pod %s: %v", w.Name, err)
	}
	// A kubelet stamps each condition with when it last changed; the
	// EndpointSlice controller passes the Ready one on as the slice's
	// last-change-trigger-time.
	now := metav1.Now()
	podIPs := []v1.PodIP{{IP: w.IP.String()}}
	if k.dualStack {
		podIPs = append(podIPs, v1.PodIP{IP: lab.PodIP6(w.Index).String()})
	}
	pod.Status = v1.PodStatus{Phase: v1.PodRunning, PodIP: w.IP.String(), PodIPs: podIPs,
		Conditions: []v1.PodCondition{{Type: v1.PodReady, Status: v1.ConditionTrue, LastTransitionTime: now}, {Type: v1.ContainersReady, Status: v1.ConditionTrue, LastTransitionTime: now}}}
	if _, err := k.c.CoreV1().Pods(k.ns).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		k.t.Fatalf("report pod %s running: %v", w.Name, err)
	}
}

// waitSlices waits until the EndpointSlices of Service svc list exactly the
// ready addresses want, as the controller writes them, and returns when that
// was first seen.
func (k *kubelet) waitSlices(t *testing.T, svc string, want ...string) time.Time {
	t.Helper()
	ctx := context.Background()
	slices.Sort(want)
	var got []string
	for start := time.Now(); time.Since(start) < 40*time.Second; time.Sleep(20 * time.Millisecond) {
		list, err := k.c.DiscoveryV1().EndpointSlices(k.ns).List(ctx, metav1.ListOptions{LabelSelector: "kubernetes.io/service-name=" + svc})
		if err != nil {
			t.Fatal(err)
		}
		got = nil
		for _, s := range list.Items {
			for _, e := range s.Endpoints {
				if e.Conditions.Ready == nil || *e.Conditions.Ready {
					got = append(got, e.Addresses...)
				}
			}
		}
		slices.Sort(got)
		if slices.Equal(got, want) {
			return time.Now()
		}
	}
	pods, _ := k.c.CoreV1().Pods(k.ns).List(ctx, metav1.ListOptions{})
	var ps []string
	for _, p := range pods.Items {
		ps = append(ps, fmt.Sprintf("%s node=%s ip=%s phase=%s labels=%v rv=%s", p.Name, p.Spec.NodeName, p.Status.PodIP, p.Status.Phase, p.Labels, p.ResourceVersion))
	}
	t.Fatalf("EndpointSlices of %s list %v, want %v; pods: %v", svc, got, want, ps)
	return time.Time{}
}

// notReady reports pod name's Ready condition False.
func (k *kubelet) notReady(t *testing.T, name string) {
	t.Helper()
	ctx := context.Background()
	pod, err := k.c.CoreV1().Pods(k.ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range pod.Status.Conditions {
		if pod.Status.Conditions[i].Type == v1.PodReady {
			pod.Status.Conditions[i].Status = v1.ConditionFalse
			pod.Status.Conditions[i].LastTransitionTime = metav1.Now()
		}
	}
	if _, err := k.c.CoreV1().Pods(k.ns).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// apiLab is how a one-node API test starts: the control plane, a namespace
// of the test's own, the Node node-1, a lab with a client pod, and the
// kubelet of node-1 in that namespace.
func apiLab(t *testing.T, prefix string) (*kubetestenv.Env, *lab.Lab, *lab.Pod, *kubelet) {
	t.Helper()
	env := controlPlane(t)
	ns := apiNamespace(t, env.Admin, prefix)
	ensureNode(t, env.Admin, "node-1")
	l := newLab(t)
	client, err := l.AddPod("client", lab.ClientPod)
	if err != nil {
		t.Fatal(err)
	}
	return env, l, client, &kubelet{t: t, c: env.Admin, ns: ns, node: "node-1"}
}

// TestServiceStoryThroughTheAPI tells the Service story through a real API
// server (including terminating endpoints, which only a real EndpointSlice
// controller publishes as it does), as a user with kubectl would, with the proxy running under
// kube-proxy's own identity (system:kube-proxy, bound to
// system:node-proxier) and the real EndpointSlice controller writing the
// slices from the Pods.
func TestServiceStoryThroughTheAPI(t *testing.T) {
	env, l, client, k := apiLab(t, "story")
	ctx, c, ns := context.Background(), env.Admin, k.ns
	var err error
	v1Labels := map[string]string{"app": "web-front-end", "version": "v1"}
	for n := 1; n <= 1; n++ {
		w := lab.NewWebPod(n, "v1", 8080)
		if _, err := l.AddWeb(tools, w); err != nil {
			t.Fatal(err)
		}
		k.run(w, v1Labels)
	}
	svc := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: lab.ServiceName, Namespace: ns},
		Spec: v1.ServiceSpec{
			ClusterIP: lab.ClusterIP.String(),
			Selector:  map[string]string{"app": "web-front-end"},
			Ports:     []v1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("web-port")}},
		},
	}
	if svc, err = c.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// A Service for another proxy: ours must leave it alone.
	other := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "for-another-proxy", Namespace: ns, Labels: map[string]string{"service.kubernetes.io/service-proxy-name": "other"}},
		Spec:       v1.ServiceSpec{ClusterIP: "10.96.0.12", Selector: map[string]string{"app": "web-front-end"}, Ports: []v1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080)}}},
	}
	if _, err := c.CoreV1().Services(ns).Create(ctx, other, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	proxy := startAPIProxy(t, env, l, l.Node, "node-1")
	url := fmt.Sprintf("http://%s/", lab.ClusterIP)
	// eventually retries f until it succeeds or 5s pass (apimachinery's
	// poll); the API is asynchronous (controller, watch), so this is
	// waiting for a signal we cannot subscribe to from here.
	eventually := func(t *testing.T, what string, f func() error) time.Duration {
		t.Helper()
		start := time.Now()
		var err error
		if wait.PollUntilContextTimeout(ctx, 20*time.Millisecond, 5*time.Second, true, func(context.Context) (bool, error) {
			err = f()
			return err == nil, nil
		}) == nil {
			return time.Since(start)
		}
		slices, _ := c.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{})
		var eps []string
		for _, s := range slices.Items {
			for _, e := range s.Endpoints {
				eps = append(eps, fmt.Sprintf("%s/%v ready=%v", s.Name, e.Addresses, e.Conditions.Ready != nil && *e.Conditions.Ready))
			}
		}
		pods, _ := c.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		for _, p := range pods.Items {
			eps = append(eps, fmt.Sprintf("pod %s node=%s ip=%s phase=%s conds=%v labels=%v", p.Name, p.Spec.NodeName, p.Status.PodIP, p.Status.Phase, p.Status.Conditions, p.Labels))
		}
		out := proxy.Output()
		if len(out) > 30000 {
			out = out[len(out)-30000:]
		}
		t.Fatalf("%s: %v\nendpoint slices in the API: %v\nproxy log ends:\n%s", what, err, eps, out)
		return 0
	}

	t.Run("a pod curls the ClusterIP", func(t *testing.T) {
		eventually(t, "curl "+url, func() error {
			got, err := client.Curl(ctx, url)
			if err != nil || got != "This is Web Server 1 running on 8080!" {
				return fmt.Errorf("%q, %v", got, err)
			}
			return nil
		})
		rules, _ := l.OurRules(ctx)
		if strings.Contains(rules, "10.96.0.12") {
			t.Errorf("a Service labelled for another proxy got rules:\n%s", rules)
		}
	})
	t.Run("scale to 3: an even split", func(t *testing.T) {
		for n := 2; n <= 3; n++ {
			w := lab.NewWebPod(n, "v1", 8080)
			if _, err := l.AddWeb(tools, w); err != nil {
				t.Fatal(err)
			}
			k.run(w, v1Labels)
		}
		k.waitSlices(t, lab.ServiceName, "10.244.1.2", "10.244.2.2", "10.244.3.2")
		eventually(t, "three endpoints", func() error {
			tally, failures, err := client.Tally(ctx, tools, url, 30)
			if err != nil || failures != 0 || len(tally) != 3 {
				return fmt.Errorf("%v, %d failures, %v", tally, failures, err)
			}
			return nil
		})
		tally, failures, err := client.Tally(ctx, tools, url, 300)
		if err != nil || failures != 0 {
			t.Fatal(tally, failures, err)
		}
		for body, n := range tally {
			if n != 100 {
				t.Errorf("300 requests: %v; want 100 each (%s got %d)", tally, body, n)
			}
		}
	})
	t.Run("terminating endpoints serve only when no ready one is left", func(t *testing.T) {
		// Nothing plays the kubelet's part of a deletion, so web-3 stays
		// Terminating: the controller publishes it serving, not ready.
		if err := c.CoreV1().Pods(ns).Delete(ctx, "web-3", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		k.waitSlices(t, lab.ServiceName, "10.244.1.2", "10.244.2.2")
		eventually(t, "only the ready pods answer", func() error {
			tally, failures, err := client.Tally(ctx, tools, url, 20)
			if err != nil || failures != 0 || tally["This is Web Server 1 running on 8080!"]+tally["This is Web Server 2 running on 8080!"] != 20 {
				return fmt.Errorf("%v, %d failures, %v", tally, failures, err)
			}
			return nil
		})
		for _, name := range []string{"web-1", "web-2"} {
			k.notReady(t, name)
		}
		k.waitSlices(t, lab.ServiceName) // no ready endpoint left
		eventually(t, "the terminating pod answers", func() error {
			tally, failures, err := client.Tally(ctx, tools, url, 10)
			if err != nil || failures != 0 || tally["This is Web Server 3 running on 8080!"] != 10 {
				return fmt.Errorf("%v, %d failures, %v", tally, failures, err)
			}
			return nil
		})
	})
	t.Run("v2 on 9090, then the selector moves to v2 within 2s", func(t *testing.T) {
		w := lab.NewWebPod(4, "v2", 9090)
		if _, err := l.AddWeb(tools, w); err != nil {
			t.Fatal(err)
		}
		k.run(w, map[string]string{"app": "web-front-end", "version": "v2"})
		svc, err := c.CoreV1().Services(ns).Get(ctx, lab.ServiceName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		svc.Spec.Selector = map[string]string{"app": "web-front-end", "version": "v2"}
		if _, err := c.CoreV1().Services(ns).Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		// From the moment the API shows the change to the moment traffic
		// follows it: the proxy's part of network programming latency.
		seen := k.waitSlices(t, lab.ServiceName, "10.244.4.2")
		eventually(t, "only v2 answers", func() error {
			tally, failures, err := client.Tally(ctx, tools, url, 8)
			if err != nil || failures != 0 || len(tally) != 1 || tally["This is Web Server 4 running on 9090!"] != 8 {
				return fmt.Errorf("%v, %d failures, %v", tally, failures, err)
			}
			return nil
		})
		if took := time.Since(seen); took > 2*time.Second {
			t.Errorf("the selector change took %s from the API to the data path; want under 2s", took)
		}
		// The controller stamped the slices with when the change behind
		// them happened; the proxy measured from there to applied.
		eventually(t, "network programming latency observed", func() error {
			out, err := l.Node.Curl(ctx, "http://127.0.0.1:10249/metrics")
			if err != nil {
				return err
			}
			n, sum := metricValue(out, "kubeproxy_network_programming_duration_seconds_count"), metricValue(out, "kubeproxy_network_programming_duration_seconds_sum")
			if n < 1 || sum <= 0 || sum/n > 10 {
				return fmt.Errorf("count %v, sum %v: want at least one observation of a few seconds at most", n, sum)
			}
			// The selector change and the slices that followed were
			// counted as they came, and nothing waits any more.
			for series, least := range map[string]float64{
				"kubeproxy_sync_proxy_rules_service_changes_total":  2, // the first list, the selector
				"kubeproxy_sync_proxy_rules_endpoint_changes_total": 2,
			} {
				if v := metricValue(out, series); v < least {
					return fmt.Errorf("%s = %v, want at least %v", series, v, least)
				}
			}
			for _, series := range []string{"kubeproxy_sync_proxy_rules_service_changes_pending", "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
				`kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy="internal"}`} {
				if v := metricValue(out, series); v != 0 {
					return fmt.Errorf("%s = %v, want 0 once applied", series, v)
				}
			}
			return nil
		})
	})
	t.Run("a dual-stack Service: the API gives it an IPv6 ClusterIP, reached over IPv6", func(t *testing.T) {
		w := lab.NewWebPod(6, "v1", 8080)
		if _, err := l.AddWeb(tools, w); err != nil {
			t.Fatal(err)
		}
		dual := *k
		dual.dualStack = true
		dual.run(w, map[string]string{"app": "dual"})
		policy := v1.IPFamilyPolicyRequireDualStack
		ds, err := c.CoreV1().Services(ns).Create(ctx, &v1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "dual", Namespace: ns},
			Spec: v1.ServiceSpec{IPFamilyPolicy: &policy, Selector: map[string]string{"app": "dual"},
				Ports: []v1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("web-port")}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(ds.Spec.ClusterIPs) != 2 {
			t.Fatalf("the API server gave clusterIPs %v; want one of each family", ds.Spec.ClusterIPs)
		}
		dual.waitSlices(t, "dual", w.IP.String(), lab.PodIP6(6).String())
		for _, ip := range ds.Spec.ClusterIPs {
			// Connect only once the proxy has applied the Service: a
			// SYN sent before our rule existed has its NAT settled
			// already, and its retransmits would not be redirected.
			if _, err := proxy.WaitFor(0, 5*time.Second, func(line string) bool {
				e := lab.LogEntry(line)
				return e["msg"] == "Added service port" && e["clusterIP"] == ip && strings.HasSuffix(fmt.Sprint(e["service"]), "/dual:http")
			}); err != nil {
				t.Fatal(err)
			}
			u := "http://" + netip.AddrPortFrom(netip.MustParseAddr(ip), 80).String() + "/"
			eventually(t, "curl "+u, func() error {
				got, err := client.Curl(ctx, u)
				if err != nil || got != w.Greeting() {
					return fmt.Errorf("%q, %v", got, err)
				}
				return nil
			})
		}
		if err := c.CoreV1().Services(ns).Delete(ctx, "dual", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("API server outage: traffic flows on the last state, then changes apply again", func(t *testing.T) {
		v2 := "This is Web Server 4 running on 9090!"
		env.StopAPIServer()
		for start := time.Now(); time.Since(start) < 20*time.Second; time.Sleep(2 * time.Second) {
			tally, failures, err := client.Tally(ctx, tools, url, 5)
			if err != nil || failures != 0 || tally[v2] != 5 {
				t.Fatalf("%s into the outage: %v, %d failures, %v", time.Since(start).Round(time.Second), tally, failures, err)
			}
		}
		if err := env.StartAPIServer(); err != nil {
			t.Fatal(err)
		}
		// The controller manager's own watches back off for up to 30s
		// after an outage; restart it, as its static pod would be, so
		// that the slices follow at once and what is measured is ours.
		env.StopControllerManager()
		if err := env.StartControllerManager(); err != nil {
			t.Fatal(err)
		}
		w := lab.NewWebPod(5, "v2", 9090)
		if _, err := l.AddWeb(tools, w); err != nil {
			t.Fatal(err)
		}
		back := time.Now()
		k.run(w, map[string]string{"app": "web-front-end", "version": "v2"})
		seen := k.waitSlices(t, lab.ServiceName, "10.244.4.2", "10.244.5.2")
		// The proxy's reflectors retry at least once every 1.2s however
		// long the outage was, so the new pod is served within 2s of
		// the slice that lists it.
		var answered time.Time
		for deadline := time.Now().Add(30 * time.Second); answered.IsZero(); time.Sleep(20 * time.Millisecond) {
			tally, failures, err := client.Tally(ctx, tools, url, 10)
			if err == nil && failures == 0 && tally["This is Web Server 5 running on 9090!"] > 0 {
				answered = time.Now()
			} else if time.Now().After(deadline) {
				t.Fatalf("30s after the API showed the new pod, traffic does not reach it: %v, %d failures, %v", tally, failures, err)
			}
		}
		if took := answered.Sub(seen); took > 2*time.Second {
			t.Errorf("after the outage, traffic reached the new pod %s after its slice; want under 2s", took.Round(time.Millisecond))
		}
		t.Logf("after the API server came back: slice updated in %s, traffic followed %s later",
			seen.Sub(back).Round(time.Millisecond), answered.Sub(seen).Round(time.Millisecond))
	})
	t.Run("a node being drained fails /healthz, not /livez", func(t *testing.T) {
		node, err := c.CoreV1().Nodes().Get(ctx, "node-1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		node.Spec.Taints = append(node.Spec.Taints, v1.Taint{Key: "ToBeDeletedByClusterAutoscaler", Effect: v1.TaintEffectNoSchedule})
		if _, err := c.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		defer func() {
			node, err := c.CoreV1().Nodes().Get(ctx, "node-1", metav1.GetOptions{})
			if err == nil {
				node.Spec.Taints = nil
				c.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{})
			}
		}()
		eventually(t, "/healthz says the node is not eligible", func() error {
			body, err := l.Node.Curl(ctx, "http://127.0.0.1:10256/healthz")
			if err != nil || !strings.Contains(body, `"nodeEligible":false`) {
				return fmt.Errorf("%q, %v", body, err)
			}
			return nil
		})
		out, err := l.Node.Run(ctx, "curl", "-s", "-w", "%{http_code} ", "-o", "/dev/null", "http://127.0.0.1:10256/healthz", "-o", "/dev/null", "http://127.0.0.1:10256/livez")
		if err != nil || strings.TrimSpace(string(out)) != "503 200" {
			t.Errorf("/healthz and /livez answered %q, %v; want 503 and 200", out, err)
		}
	})
	t.Run("deleting the Service removes its rules and listener", func(t *testing.T) {
		if err := c.CoreV1().Services(ns).Delete(ctx, lab.ServiceName, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		eventually(t, "rules gone", func() error {
			if rules, _ := l.OurRules(ctx); strings.Contains(rules, lab.ServiceName) {
				return fmt.Errorf("rules still name the Service:\n%s", rules)
			}
			return nil
		})
		if _, err := proxy.WaitFor(0, 5*time.Second, func(line string) bool {
			e := lab.LogEntry(line)
			return e["msg"] == "Removed service port" && strings.HasSuffix(fmt.Sprint(e["service"]), "/"+lab.ServiceName+":http")
		}); err != nil {
			t.Error(err)
		}
	})
}
