package integration

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/kubetestenv"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

// BenchmarkFirstSyncFromAPI measures how long the proxy takes from its
// start to every service port programmed (listeners open, rules in place)
// when the API server already holds 1,000 or 10,000 Services, and its peak
// memory then. Each op starts a proxy in a fresh node namespace; the
// Services are created once, before the clock starts.
//
//	make bench-sync
func BenchmarkFirstSyncFromAPI(b *testing.B) {
	env := controlPlane(b)
	ensureNode(b, env.Admin, "node-1")
	ns := apiNamespace(b, env.Admin, "sync")
	cfg := env.AdminConfig()
	cfg.QPS, cfg.Burst = 2000, 4000
	cfg.ContentType = "application/vnd.kubernetes.protobuf" // as the proxy's client
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		b.Fatal(err)
	}
	// A sub-benchmark's function may run more than once (b.N = 1 first),
	// so the Services are made here, once: 1,000, then 9,000 more.
	created := 0
	for _, n := range []int{1000, 10000} {
		createServices(b, c, ns, created, n)
		created = n
		b.Run(fmt.Sprintf("servicePorts=%d", n), func(b *testing.B) {
			var total, list time.Duration
			var peakMB float64
			for range b.N {
				// The baseline, in the same run: one bare List of
				// every Service from the API server's cache, as the
				// proxy's first list does, and nothing else.
				start := time.Now()
				if _, err := c.CoreV1().Services(metav1.NamespaceAll).List(context.Background(), metav1.ListOptions{ResourceVersion: "0"}); err != nil {
					b.Fatal(err)
				}
				list += time.Since(start)
				took, mb := firstSync(b, env, n)
				total += took
				peakMB = max(peakMB, mb)
			}
			b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms/sync")
			b.ReportMetric(float64(list.Milliseconds())/float64(b.N), "ms/bare-list")
			b.ReportMetric(peakMB, "peak-RSS-MB")
		})
	}
}

// createServices creates single-port Services svc-<from> to svc-<to-1> in
// ns, 16 at a time; the API server allocates their ClusterIPs.
func createServices(b *testing.B, c kubernetes.Interface, ns string, from, to int) {
	b.Helper()
	var g errgroup.Group
	g.SetLimit(16)
	for i := from; i < to; i++ {
		g.Go(func() error {
			_, err := c.CoreV1().Services(ns).Create(context.Background(), &v1.Service{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("svc-%05d", i), Namespace: ns},
				Spec:       v1.ServiceSpec{Ports: []v1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}}},
			}, metav1.CreateOptions{})
			return err
		})
	}
	if err := g.Wait(); err != nil {
		b.Fatal(err)
	}
}

// firstSync starts a proxy in a fresh lab against the API server, waits for
// its first sync that covers at least n service ports, and returns how long
// that took from the process start, and the proxy's peak RSS in MB.
func firstSync(b *testing.B, env *kubetestenv.Env, n int) (time.Duration, float64) {
	b.Helper()
	b.StopTimer()
	l, err := lab.New()
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	kubeconfig := apiKubeconfig(b, env, l, l.Node)
	b.StartTimer()
	start := time.Now()
	b.Logf("%s start", start.UTC().Format(time.RFC3339Nano))
	proxy, err := l.Start(l.Node, tools.Proxy, "--log-format", "json", "-v", "3", "--kubeconfig", kubeconfig, "--hostname-override", "node-1")
	if err != nil {
		b.Fatal(err)
	}
	synced, err := proxy.WaitFor(0, 60*time.Second, func(line string) bool {
		e := lab.LogEntry(line)
		ports, _ := e["servicePorts"].(float64)
		return e["msg"] == "Synced" && int(ports) >= n
	})
	if err != nil {
		b.Fatal(err)
	}
	took := time.Since(start)
	b.StopTimer()
	// Where the time went: the apply loop's own part is in the Synced
	// line; the rest is the process start and the lists.
	lines := proxy.Lines(0)
	for _, line := range lines[:synced+1] {
		if e := lab.LogEntry(line); e["msg"] == "Waiting for the first lists of Services and EndpointSlices" || e["msg"] == "Synced" {
			b.Logf("%s %v %v (listeners %v, rules %v)", e["time"], e["msg"], e["duration"], e["listenersDuration"], e["pointDuration"])
		}
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", proxy.PID()))
	if err != nil {
		b.Fatal(err)
	}
	var kb float64
	for line := range strings.Lines(string(status)) {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
			kb, _ = strconv.ParseFloat(f[1], 64)
		}
	}
	b.StartTimer()
	return took, kb / 1024
}
