package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

// TestHeadlessDNSThroughTheAPI: with the DNS stub on, the proxy also
// watches the EndpointSlices of headless Services (kube-proxy leaves them
// out, they have nothing to proxy), so a headless Service's name answers
// with its pods' addresses; a ClusterIP Service's name with its ClusterIP.
func TestHeadlessDNSThroughTheAPI(t *testing.T) {
	env, l, client, k := apiLab(t, "dns")
	ctx, c, ns := context.Background(), env.Admin, k.ns
	w := lab.NewWebPod(7, "v1", 8080)
	if _, err := l.AddWeb(tools, w); err != nil {
		t.Fatal(err)
	}
	k.run(w, map[string]string{"app": "db"})
	for _, svc := range []*v1.Service{
		{ObjectMeta: metav1.ObjectMeta{Name: "db", Namespace: ns}, Spec: v1.ServiceSpec{ClusterIP: v1.ClusterIPNone,
			Selector: map[string]string{"app": "db"}, Ports: []v1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: ns}, Spec: v1.ServiceSpec{ClusterIP: "10.96.0.77",
			Selector: map[string]string{"app": "db"}, Ports: []v1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}}}},
	} {
		if _, err := c.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	k.waitSlices(t, "db", w.IP.String())

	startAPIProxy(t, env, l, l.Node, "node-1", "--cluster-dns", clusterDNS, "--dns-upstream", lab.ExtIP.String())
	for name, want := range map[string]string{
		"db." + ns + ".svc.cluster.local":  w.IP.String(),
		"web." + ns + ".svc.cluster.local": "10.96.0.77",
	} {
		var out []byte
		var err error
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			if out, err = client.Run(ctx, "dig", "+short", "+tries=1", "+time=1", "@"+clusterDNS, name); err == nil && strings.TrimSpace(string(out)) == want {
				break
			}
		}
		if got := strings.TrimSpace(string(out)); got != want {
			t.Errorf("dig %s: %q, %v; want %s", name, got, err, want)
		}
	}
}
