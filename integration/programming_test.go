package integration

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

var benchRuns int

// BenchmarkNetworkProgramming measures network programming latency: from an
// EndpointSlice change in the API (the real controller's write, seen by a
// watch in this test) to traffic through the ClusterIP following it. Each
// op flips web-2 between not ready and ready, 1.1s after the previous one;
// p50 and p99 are reported.
//
//	make bench-programming
func BenchmarkNetworkProgramming(b *testing.B) {
	// The benchmark function runs more than once (b.N = 1 first): each run
	// has a Service address of its own.
	benchRuns++
	vip := fmt.Sprintf("10.96.0.%d", 40+benchRuns)
	env := controlPlane(b)
	ctx := context.Background()
	c := env.Admin
	ns := apiNamespace(b, c, "latency")
	ensureNode(b, c, "node-1")
	l, client := benchLab(b)
	tb := &kubelet{t: b, c: c, ns: ns, node: "node-1"}
	for n := 1; n <= 2; n++ {
		w := lab.NewWebPod(n, "v1", 8080)
		if _, err := l.AddWeb(tools, w); err != nil {
			b.Fatal(err)
		}
		tb.run(w, map[string]string{"app": "web"})
	}
	svc := &v1.Service{ObjectMeta: metav1.ObjectMeta{Name: "lat", Namespace: ns}, Spec: v1.ServiceSpec{ClusterIP: vip,
		Selector: map[string]string{"app": "web"}, Ports: []v1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080)}}}}
	if _, err := c.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	startAPIProxy(b, env, l, l.Node, "node-1")
	// who asks the Service once, on a new connection, and says which
	// server answered.
	who := func() string {
		conn, err := client.Dial("tcp", vip+":80")
		if err != nil {
			return ""
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(2 * time.Second))
		io.WriteString(conn, "GET / HTTP/1.0\r\n\r\n")
		body, _ := io.ReadAll(conn)
		if i := strings.Index(string(body), "This is Web Server "); i >= 0 {
			return string(body[i+19 : i+20])
		}
		return ""
	}
	sliceReady := func(want int) time.Time {
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
			list, _ := c.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: "kubernetes.io/service-name=lat"})
			n := 0
			for _, s := range list.Items {
				for _, e := range s.Endpoints {
					if e.Conditions.Ready == nil || *e.Conditions.Ready {
						n++
					}
				}
			}
			if n == want {
				return time.Now()
			}
		}
		b.Fatalf("EndpointSlice never showed %d ready endpoints", want)
		return time.Time{}
	}
	sliceReady(2)
	var lat []time.Duration
	b.ResetTimer()
	for i := range b.N {
		// Space the changes beyond --iptables-min-sync-period (1s): changes
		// closer together are rate-limited on purpose (as kube-proxy's
		// are), and that wait is not programming latency.
		time.Sleep(1100 * time.Millisecond)
		ready := i%2 == 1
		pod, err := c.CoreV1().Pods(ns).Get(ctx, "web-2", metav1.GetOptions{})
		if err != nil {
			b.Fatal(err)
		}
		for j := range pod.Status.Conditions {
			if pod.Status.Conditions[j].Type == v1.PodReady {
				pod.Status.Conditions[j].Status = map[bool]v1.ConditionStatus{true: v1.ConditionTrue, false: v1.ConditionFalse}[ready]
				pod.Status.Conditions[j].LastTransitionTime = metav1.Now()
			}
		}
		if _, err := c.CoreV1().Pods(ns).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
			b.Fatal(err)
		}
		want := map[bool]int{true: 2, false: 1}[ready]
		changed := sliceReady(want)
		for deadline := time.Now().Add(10 * time.Second); ; {
			// Two new connections in a row reach both pods exactly when
			// both are endpoints (round robin), and only web-1 otherwise.
			got := []string{who(), who()}
			slices.Sort(got)
			if (ready && slices.Equal(got, []string{"1", "2"})) || (!ready && slices.Equal(got, []string{"1", "1"})) {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("change %d not reflected in traffic after 10s: %v", i, got)
			}
		}
		lat = append(lat, time.Since(changed))
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
}
