package integration

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

// serviceWithPod is a Service NAME at CLUSTERIP with a TCP and a UDP
// port, and its one pod, lab web pod INDEX at 10.244.INDEX.2.
const serviceWithPod = `---
apiVersion: v1
kind: Service
metadata: {name: NAME, namespace: default}
spec:
  clusterIP: CLUSTERIP
  selector: {app: NAME}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: echo, port: 5353, protocol: UDP, targetPort: 5353}
---
apiVersion: v1
kind: Pod
metadata: {name: web-INDEX, namespace: default, labels: {app: NAME}}
spec: {containers: [{name: web}]}
status: {podIP: 10.244.INDEX.2, conditions: [{type: Ready, status: "True"}]}
`

// sourceIPManifest: "near" is served by web-1 on the client's node, "far"
// by web-2 on another node.
var sourceIPManifest = strings.NewReplacer("NAME", "near", "CLUSTERIP", "10.96.0.40", "INDEX", "1").Replace(serviceWithPod) +
	strings.NewReplacer("NAME", "far", "CLUSTERIP", "10.96.0.41", "INDEX", "2").Replace(serviceWithPod)

// peerSeen waits for web to print the peer of a request over proto
// ("tcp" or "udp") after line from, and returns it.
func peerSeen(web *lab.Proc, from int, proto string) (string, error) {
	i, err := web.WaitFor(from, 10*time.Second, func(s string) bool { return strings.HasPrefix(s, "peer "+proto+" ") })
	if err != nil {
		return "", err
	}
	return strings.TrimPrefix(web.Lines(i)[0], "peer "+proto+" "), nil
}

// peerLab is a lab with the client pod and web pod 1, whose server logs
// its peers (kup-lab web --log-peers, and extra flags).
func peerLab(t *testing.T, extra ...string) (*lab.Lab, *lab.Pod, *lab.Proc) {
	t.Helper()
	l := newLab(t)
	client, err := l.AddPod("client", lab.ClientPod)
	if err != nil {
		t.Fatal(err)
	}
	w := lab.NewWebPod(1, "v1", 8080)
	p, err := l.AddPod(w.Name, w.Index)
	if err != nil {
		t.Fatal(err)
	}
	web, err := l.StartWeb(p, tools, w, append([]string{"--log-peers"}, extra...)...)
	if err != nil {
		t.Fatal(err)
	}
	return l, client, web
}

// TestPreserveSourceIP: upstream's e2e "should preserve source pod IP for
// traffic thru service cluster IP". With --preserve-source-ip the endpoint
// sees the client pod's own address and port, over TCP and UDP, whether
// it runs on the client's node or on another; without it, the node's. The
// node's own connections are dialed from the node either way, and counted.
func TestPreserveSourceIP(t *testing.T) {
	for _, preserve := range []bool{true, false} {
		t.Run(fmt.Sprintf("preserve=%v", preserve), func(t *testing.T) {
			l := newLab(t)
			nodeB, err := l.AddNode("node-b")
			if err != nil {
				t.Fatal(err)
			}
			client, err := l.AddPod("client", lab.ClientPod)
			if err != nil {
				t.Fatal(err)
			}
			webs := map[string]*lab.Proc{}
			for _, w := range []struct {
				svc  string
				node *lab.NS
				pod  lab.WebPod
			}{{"near", l.Node, lab.NewWebPod(1, "v1", 8080)}, {"far", nodeB, lab.NewWebPod(2, "v1", 8080)}} {
				p, err := l.AddPodOn(w.node, w.pod.Name, w.pod.Index)
				if err != nil {
					t.Fatal(err)
				}
				if webs[w.svc], err = l.StartWeb(p, tools, w.pod, "--log-peers"); err != nil {
					t.Fatal(err)
				}
			}
			manifest := filepath.Join(t.TempDir(), "lab.yaml")
			if err := os.WriteFile(manifest, []byte(sourceIPManifest), 0o644); err != nil {
				t.Fatal(err)
			}
			var args []string
			if preserve {
				args = []string{"--preserve-source-ip", "--local-pod-cidrs", fmt.Sprintf("10.244.%d.0/24", lab.ClientPod)}
			}
			if _, err := l.StartProxy(tools, manifest, args...); err != nil {
				t.Fatal(err)
			}
			for _, svc := range []struct{ name, ip string }{{"near", "10.96.0.40"}, {"far", "10.96.0.41"}} {
				for _, proto := range []string{"tcp", "udp"} {
					port := map[string]string{"tcp": "80", "udp": "5353"}[proto]
					from := webs[svc.name].NumLines()
					me, err := exchange(&client.NS, proto, net.JoinHostPort(svc.ip, port))
					if err != nil {
						t.Errorf("%s %s from the client pod: %v", svc.name, proto, err)
						continue
					}
					peer, err := peerSeen(webs[svc.name], from, proto)
					if err != nil {
						t.Errorf("%s %s: %v", svc.name, proto, err)
						continue
					}
					t.Logf("%s over %s: client %s, the pod saw %s", svc.name, proto, me, peer)
					if kept := peer == me; kept != preserve {
						t.Errorf("%s over %s: the pod saw %s, the client was %s; want the client's address kept: %v", svc.name, proto, peer, me, preserve)
					}
				}
			}
			// The node's own connection: from the node, whatever the flag.
			from := webs["near"].NumLines()
			if _, err := exchange(l.Node, "tcp", "10.96.0.40:80"); err != nil {
				t.Fatal(err)
			}
			if peer, err := peerSeen(webs["near"], from, "tcp"); err != nil || !strings.HasPrefix(peer, "10.244.1.1:") {
				t.Errorf("the node's connection reached the pod from %s, %v; want the node's 10.244.1.1", peer, err)
			}
			metrics, err := l.Node.Curl(context.Background(), "http://127.0.0.1:10249/metrics")
			if err != nil {
				t.Fatal(err)
			}
			for _, series := range []string{
				`kube_userspace_proxy_source_ip_total{protocol="TCP",result="preserved"} 2`,
				`kube_userspace_proxy_source_ip_total{protocol="UDP",result="preserved"} 2`,
				`kube_userspace_proxy_source_ip_total{protocol="TCP",result="not_local_pod"} 1`,
			} {
				if strings.Contains(metrics, series) != preserve {
					t.Errorf("metrics have %s: %v; want %v", series, !preserve, preserve)
				}
			}
			if !preserve {
				return
			}
			// --cleanup takes the mangle chain, the rule and the route away.
			ctx := context.Background()
			if out, err := l.Node.Run(ctx, "sh", "-c", "iptables-save -t mangle; ip rule; ip route show table 27509"); err != nil ||
				!strings.Contains(string(out), "KUP-REPLIES") || !strings.Contains(string(out), "lookup 27509") || !strings.Contains(string(out), "local default dev lo") {
				t.Errorf("while serving, the node lacks the mangle chain, rule or route (%v):\n%s", err, out)
			}
			if out, err := l.Node.Run(ctx, tools.Proxy, "--cleanup"); err != nil {
				t.Fatalf("--cleanup: %v\n%s", err, out)
			}
			if out, err := l.Node.Run(ctx, "sh", "-c", "iptables-save -t mangle; ip rule; ip route show table 27509"); err != nil ||
				strings.Contains(string(out), "KUP-REPLIES") || strings.Contains(string(out), "27509") || strings.Contains(string(out), "local default") {
				t.Errorf("after --cleanup (%v):\n%s", err, out)
			}
		})
	}
}

// TestProxyProtocol: a Service annotated for PROXY protocol v2 sends its
// endpoint, ahead of the client's bytes, a header naming the client and
// the address the client connected to: the ClusterIP, or the node's
// address and NodePort, as conntrack kept them. The endpoint requires the
// header, so a connection without it would fail. Both modes.
func TestProxyProtocol(t *testing.T) {
	const manifest = `apiVersion: v1
kind: Service
metadata:
  name: pp
  namespace: default
  annotations: {kube-userspace-proxy.io/proxy-protocol: v2}
spec:
  type: NodePort
  clusterIP: 10.96.0.42
  selector: {app: pp}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30086}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: pp}}
spec: {containers: [{name: web}]}
status: {podIP: 10.244.1.2, conditions: [{type: Ready, status: "True"}]}
`
	for _, mode := range []string{"redirect", "bind"} {
		t.Run(mode, func(t *testing.T) {
			l, client, web := peerLab(t, "--proxy-protocol")
			path := filepath.Join(t.TempDir(), "lab.yaml")
			if err := os.WriteFile(path, []byte(manifest), 0o644); err != nil {
				t.Fatal(err)
			}
			if _, err := l.StartProxy(tools, path, "--mode", mode); err != nil {
				t.Fatal(err)
			}
			for _, to := range []string{"10.96.0.42:80", lab.NodeIP.String() + ":30086"} {
				from := web.NumLines()
				me, err := exchange(&client.NS, "tcp", to)
				if err != nil {
					t.Fatalf("to %s: %v", to, err)
				}
				peer, err := peerSeen(web, from, "tcp")
				if err != nil {
					t.Fatal(err)
				}
				dst, err := web.WaitFor(from, 5*time.Second, func(s string) bool { return strings.HasPrefix(s, "dst tcp ") })
				if err != nil {
					t.Fatal(err)
				}
				if got := strings.TrimPrefix(web.Lines(dst)[0], "dst tcp "); peer != me || got != to {
					t.Errorf("to %s from %s: the header said client %s, destination %s", to, me, peer, got)
				}
			}
		})
	}
}

// TestPreserveSourceIPFromTheNode: in a cluster --preserve-source-ip needs
// no --local-pod-cidrs: the proxy takes this node's pod CIDRs from its Node
// (spec.podCIDRs), through the real API server, under kube-proxy's own
// identity.
func TestPreserveSourceIPFromTheNode(t *testing.T) {
	env := controlPlane(t)
	ctx, c := context.Background(), env.Admin
	ns := apiNamespace(t, c, "srcip")
	const nodeName = "node-srcip"
	cidr := fmt.Sprintf("10.244.%d.0/24", lab.ClientPod) // the client pod's
	node := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName}, Spec: v1.NodeSpec{PodCIDR: cidr, PodCIDRs: []string{cidr}}}
	if _, err := c.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	l, client, web := peerLab(t)
	w := lab.NewWebPod(1, "v1", 8080)
	k := &kubelet{t: t, c: c, ns: ns, node: nodeName}
	k.run(w, map[string]string{"app": "srcip"})
	// The API server picks the ClusterIP: namespaces of earlier runs
	// against the same control plane may still hold a fixed one.
	svc := &v1.Service{ObjectMeta: metav1.ObjectMeta{Name: "srcip", Namespace: ns}, Spec: v1.ServiceSpec{
		Selector: map[string]string{"app": "srcip"}, Ports: []v1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("web-port")}}}}
	svc, err := c.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	clusterIP := svc.Spec.ClusterIP
	k.waitSlices(t, "srcip", w.IP.String())
	proxy := startAPIProxy(t, env, l, l.Node, nodeName, "--preserve-source-ip")
	if _, err := proxy.WaitFor(0, 10*time.Second, lab.LogMessage("This node's pod CIDRs (from its Node): their clients keep their address")); err != nil {
		t.Fatal(err)
	}
	_, err = within(10*time.Second, func() error {
		from := web.NumLines()
		me, err := exchange(&client.NS, "tcp", net.JoinHostPort(clusterIP, "80"))
		if err != nil {
			return err
		}
		peer, err := peerSeen(web, from, "tcp")
		if err == nil && peer != me {
			err = fmt.Errorf("the pod saw %s, the client was %s", peer, me)
		}
		return err
	})
	if err != nil {
		t.Errorf("with the Node's pod CIDR %s: %v", cidr, err)
	}
}
