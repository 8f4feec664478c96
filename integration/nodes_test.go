package integration

import (
	"context"
	"fmt"
	"testing"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

// TestThreeNodes: three nodes, each with its own proxy against the same API
// server, a web pod on each and a client pod on each. Every client reaches
// a Service whose pods are spread over the nodes, round robin across all
// three; a Service with internalTrafficPolicy Local keeps each node's
// traffic on that node's own pod.
func TestThreeNodes(t *testing.T) {
	env := controlPlane(t)
	ctx := context.Background()
	c := env.Admin
	ns := apiNamespace(t, c, "nodes")

	l := newLab(t)
	names := []string{"node-a", "node-b", "node-c"}
	nodes := []*lab.NS{l.Node}
	for _, name := range names[1:] {
		n, err := l.AddNode(name)
		if err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, n)
	}
	var clients []*lab.Pod
	for i, name := range names {
		ensureNode(t, c, name)
		w := lab.NewWebPod(i+1, "v1", 8080) // web-1 on node-a, web-2 on node-b, web-3 on node-c
		if _, err := l.AddWebOn(nodes[i], tools, w); err != nil {
			t.Fatal(err)
		}
		(&kubelet{t: t, c: c, ns: ns, node: name}).run(w, map[string]string{"app": "web-front-end"})
		client, err := l.AddPodOn(nodes[i], "client-"+name, 101+i)
		if err != nil {
			t.Fatal(err)
		}
		clients = append(clients, client)
	}
	local := v1.ServiceInternalTrafficPolicyLocal
	for _, svc := range []*v1.Service{
		{ObjectMeta: metav1.ObjectMeta{Name: "spread", Namespace: ns}, Spec: v1.ServiceSpec{ClusterIP: "10.96.0.31",
			Selector: map[string]string{"app": "web-front-end"}, Ports: []v1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("web-port")}}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "local", Namespace: ns}, Spec: v1.ServiceSpec{ClusterIP: "10.96.0.32", InternalTrafficPolicy: &local,
			Selector: map[string]string{"app": "web-front-end"}, Ports: []v1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("web-port")}}}},
	} {
		if _, err := c.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	k := &kubelet{t: t, c: c, ns: ns}
	k.waitSlices(t, "spread", "10.244.1.2", "10.244.2.2", "10.244.3.2")

	for i, name := range names {
		startAPIProxy(t, env, l, nodes[i], name)
	}

	for i, client := range clients {
		tally, failures, err := client.Tally(ctx, tools, "http://10.96.0.31/", 30)
		if err != nil || failures != 0 || len(tally) != 3 {
			t.Errorf("client on %s to the spread Service: %v, %d failures, %v; want all three pods", names[i], tally, failures, err)
		}
		for body, n := range tally {
			if n != 10 {
				t.Errorf("client on %s: %q answered %d of 30; want 10 (round robin)", names[i], body, n)
			}
		}
		want := fmt.Sprintf("This is Web Server %d running on 8080!", i+1)
		tally, failures, err = client.Tally(ctx, tools, "http://10.96.0.32/", 10)
		if err != nil || failures != 0 || tally[want] != 10 {
			t.Errorf("client on %s to the Local Service: %v, %d failures, %v; want only %q", names[i], tally, failures, err, want)
		}
	}
}
