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

// dualStackManifest is a dual-stack NodePort Service (IPv4 first) in front
// of web-1, which has both families, and web-2, which has IPv4 only.
const dualStackManifest = `apiVersion: v1
kind: Service
metadata: {name: ds}
spec:
  type: NodePort
  clusterIP: 10.96.0.30
  clusterIPs: [10.96.0.30, "fd00:96::30"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  selector: {app: ds}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30090}
  - {name: echo, port: 5353, protocol: UDP, targetPort: %d}
`

func dualStackPod(w lab.WebPod, ips ...string) string {
	var podIPs []string
	for _, ip := range ips {
		podIPs = append(podIPs, fmt.Sprintf("{ip: %q}", ip))
	}
	return fmt.Sprintf(`---
apiVersion: v1
kind: Pod
metadata: {name: %s, labels: {app: ds}}
spec: {containers: [{name: web}]}
status:
  podIP: %s
  podIPs: [%s]
  conditions: [{type: Ready, status: "True"}]
`, w.Name, ips[0], strings.Join(podIPs, ", "))
}

// TestDualStack: the IPv6 half of a dual-stack Service works from a pod,
// from the node and, on its NodePort, from another host, over TCP and UDP,
// through ip6tables /128 rules, and goes only to endpoints of its family;
// the IPv4 half goes to both pods. --cleanup removes the IPv6 rules too.
func TestDualStack(t *testing.T) {
	ctx := context.Background()
	l := newLab(t)
	client, err := l.AddPod("client", lab.ClientPod)
	if err != nil {
		t.Fatal(err)
	}
	manifest := fmt.Sprintf(dualStackManifest, lab.UDPTargetPort)
	w1, w2 := lab.NewWebPod(1, "v1", 8080), lab.NewWebPod(2, "v1", 8080)
	for _, w := range []lab.WebPod{w1, w2} {
		if _, err := l.AddWeb(tools, w); err != nil {
			t.Fatal(err)
		}
	}
	manifest += dualStackPod(w1, w1.IP.String(), lab.PodIP6(1).String()) + dualStackPod(w2, w2.IP.String())
	path := filepath.Join(t.TempDir(), "ds.yaml")
	if err := os.WriteFile(path, []byte(manifest), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := l.StartProxy(tools, path); err != nil {
		t.Fatal(err)
	}
	out, err := l.Node.Run(ctx, "ip6tables-save", "-t", "nat")
	if err != nil || !strings.Contains(string(out), "-A KUP-PORTALS-CONTAINER -d fd00:96::30/128 -p tcp") {
		t.Fatalf("ip6tables has no /128 rule for the IPv6 ClusterIP (%v):\n%s", err, out)
	}

	only1 := map[string]int{w1.Greeting(): 10}
	for _, c := range []struct {
		from *lab.NS
		url  string
		want map[string]int
	}{
		{&client.NS, "http://[fd00:96::30]/", only1},
		{l.Node, "http://[fd00:96::30]/", only1},
		{l.Ext, fmt.Sprintf("http://[%s]:30090/", lab.NodeIP6), only1},
		{&client.NS, "http://10.96.0.30/", map[string]int{w1.Greeting(): 5, w2.Greeting(): 5}},
	} {
		tally, failures, err := c.from.Tally(ctx, tools, c.url, 10)
		if err != nil || failures != 0 || fmt.Sprint(tally) != fmt.Sprint(c.want) {
			t.Errorf("10 requests from %s to %s: %v, %d failures, %v; want %v", c.from.Name, c.url, tally, failures, err, c.want)
		}
	}
	for _, from := range []*lab.NS{&client.NS, l.Node} {
		got, err := from.UDP(ctx, tools, netip.MustParseAddrPort("[fd00:96::30]:5353"), 1200)
		if err != nil || got != w1.Greeting() {
			t.Errorf("UDP from %s to [fd00:96::30]:5353 = %q, %v; want web-1", from.Name, got, err)
		}
	}

	t.Run("--cleanup removes the IPv6 rules too", func(t *testing.T) {
		// The proxy is still running: --cleanup from another process
		// removes its chains all the same, as on a node being reset.
		if out, err := l.Node.Run(ctx, tools.Proxy, "--cleanup"); err != nil {
			t.Fatalf("--cleanup: %v\n%s", err, out)
		}
		for _, save := range []string{"ip6tables-legacy-save", "ip6tables-nft-save"} {
			out, err := l.Node.Run(ctx, save)
			if err != nil || strings.Contains(string(out), "KUP-") {
				t.Errorf("%s after --cleanup (%v):\n%s", save, err, out)
			}
		}
	})
}
