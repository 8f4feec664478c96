package integration

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

// frontendsManifest is a LoadBalancer Service with an external IP, a
// load-balancer ingress IP and ClientIP affinity, in front of two pods.
const frontendsManifest = `apiVersion: v1
kind: Service
metadata: {name: front}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  externalIPs: [203.0.113.10]
  selector: {app: front}
  sessionAffinity: ClientIP
  ports:
  - {name: http, port: 80, targetPort: web-port, nodePort: 30081}
  - {name: echo, port: 5353, protocol: UDP, targetPort: udp-echo}
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.10}]
`

func frontPod(w lab.WebPod) string {
	return fmt.Sprintf(`---
apiVersion: v1
kind: Pod
metadata: {name: %s, labels: {app: front}}
spec:
  containers:
  - name: web
    ports:
    - {name: web-port, containerPort: %d}
    - {name: udp-echo, containerPort: %d, protocol: UDP}
status:
  podIP: %s
  conditions: [{type: Ready, status: "True"}]
`, w.Name, w.WebPort, lab.UDPTargetPort, w.IP)
}

// TestFrontends reaches one Service at every kind of address it has, with
// REDIRECT rules (the default) and with DNAT rules (--bind-address set to
// the node's address), from the node and from another host, and checks
// that ClientIP affinity keeps a client on one pod.
func TestFrontends(t *testing.T) {
	for _, tt := range []struct {
		name string
		args []string
		rule string
	}{
		{"redirect", nil, "-j REDIRECT --to-ports"},
		{"dnat to --bind-address", []string{"--bind-address", lab.NodeIP.String()}, "-j DNAT --to-destination " + lab.NodeIP.String() + ":"},
		// Bind mode, NodePorts only on the node's address towards ext.
		{"bind", []string{"--mode", "bind", "--nodeport-addresses", "10.200.0.0/24"}, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			l := newLab(t)
			manifest := frontendsManifest
			for n := 1; n <= 2; n++ {
				w := lab.NewWebPod(n, "v1", 8080)
				if _, err := l.AddWeb(tools, w); err != nil {
					t.Fatal(err)
				}
				manifest += frontPod(w)
			}
			path := filepath.Join(t.TempDir(), "front.yaml")
			if err := os.WriteFile(path, []byte(manifest), 0o644); err != nil {
				t.Fatal(err)
			}
			// The other host routes the external and load-balancer IPs to
			// the node, as a router in front of a cluster would.
			for _, cidr := range []string{"203.0.113.0/24", "198.51.100.0/24"} {
				if _, err := l.Ext.Run(ctx, "ip", "route", "add", cidr, "via", lab.NodeIP.String()); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := l.StartProxy(tools, path, tt.args...); err != nil {
				t.Fatal(err)
			}
			rules, err := l.OurRules(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if tt.rule == "" {
				noNetfilter(t, l)
			} else if !strings.Contains(rules, tt.rule) {
				t.Errorf("rules lack %q:\n%s", tt.rule, rules)
			}

			nodePort := fmt.Sprintf("http://%s:30081/", lab.NodeIP)
			for _, c := range []struct {
				from *lab.NS
				url  string
			}{
				{l.Node, "http://10.96.0.20/"},
				{l.Node, "http://198.51.100.10/"},
				{l.Node, nodePort},
				{l.Ext, "http://203.0.113.10/"},
				{l.Ext, "http://198.51.100.10/"},
				{l.Ext, nodePort},
			} {
				// ClientIP affinity: one client address, one pod, every time.
				tally, failures, err := c.from.Tally(ctx, tools, c.url, 10)
				if err != nil {
					t.Fatal(err)
				}
				if failures != 0 || len(tally) != 1 {
					t.Errorf("10 requests from %s to %s: %v, %d failures; want all from one pod (ClientIP affinity)", c.from.Name, c.url, tally, failures)
				}
			}
			if tt.name == "bind" {
				// --nodeport-addresses 10.200.0.0/24: not on the pods' side.
				const url = "http://10.244.1.1:30081/"
				if got, err := l.Pods[0].Curl(ctx, url); err == nil {
					t.Errorf("curl %s from a pod = %q; want refused (outside --nodeport-addresses)", url, got)
				}
			}
			for _, ns := range []*lab.NS{l.Node, l.Ext} {
				for _, addr := range []string{"10.96.0.20:5353", "198.51.100.10:5353"} {
					if ns == l.Ext && strings.HasPrefix(addr, "10.96.") {
						continue // ClusterIPs are not routed to the cluster from outside
					}
					got, err := ns.UDP(ctx, tools, netip.MustParseAddrPort(addr), 1200)
					if err != nil || !strings.HasPrefix(got, "This is Web Server") {
						t.Errorf("UDP from %s to %s = %q, %v", ns.Name, addr, got, err)
					}
				}
			}
		})
	}
}
