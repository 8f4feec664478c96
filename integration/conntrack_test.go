package integration

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

// udpNodePort is a Service with a UDP NodePort, in front of the first
// story's pods.
const udpNodePort = `---
apiVersion: v1
kind: Service
metadata: {name: echo-np, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.23
  selector: {app: web-front-end}
  ports:
  - {name: echo, port: 5353, protocol: UDP, targetPort: udp-echo, nodePort: 30053}
`

// TestUDPFlowFromBeforeTheRules: a UDP client that started sending to a
// Service before the proxy was up (a pod's resolver while the node boots),
// and keeps sending from the same socket, is answered once the proxy is
// up, at the ClusterIP and at a NodePort alike. Without clearing
// conntrack, the kernel would keep treating that flow as it did before our
// rule existed (routed towards the ClusterIP; refused at the NodePort, where
// nothing listened), for as long as it sends.
func TestUDPFlowFromBeforeTheRules(t *testing.T) {
	for _, tt := range []struct{ name, addr string }{
		{"ClusterIP", fmt.Sprintf("%s:%d", lab.ClusterIP, lab.UDPPort)},
		{"NodePort", fmt.Sprintf("%s:30053", lab.NodeIP)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			l, client, manifest := firstStoryLab(t, udpNodePort)
			story := lab.FirstStory() // what the manifest holds
			// As on any node, the nat table is in use before we are (here
			// a CNI-like masquerade rule): the kernel settles each new
			// flow's NAT on its first packet, once.
			if _, err := l.Node.Run(context.Background(), "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.244.0.0/16", "-d", "192.0.2.0/24", "-j", "MASQUERADE"); err != nil {
				t.Fatal(err)
			}
			resolver, err := l.Start(&client.NS, tools.Helper, "udp", tt.addr, "--timeout", "200ms", "--retry-for", "30s")
			if err != nil {
				t.Fatal(err)
			}
			// Let the flow exist, unanswered, before any rule of ours does.
			time.Sleep(time.Second)
			select {
			case <-resolver.Done():
				t.Fatalf("the client got an answer before the proxy started:\n%s", resolver.Output())
			default:
			}
			if _, err := l.StartProxy(tools, manifest); err != nil {
				t.Fatal(err)
			}
			started := time.Now()
			if _, err := resolver.WaitFor(0, 10*time.Second, func(line string) bool { return strings.HasPrefix(line, story.Pods[0].Greeting()) }); err != nil {
				t.Fatalf("the flow that began before the proxy was never answered: %v", err)
			}
			t.Logf("answered %s after the proxy's first sync", time.Since(started).Round(time.Millisecond))
		})
	}
}
