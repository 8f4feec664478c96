package lab

import (
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// The Service story's fixed names and numbers.
const (
	ServiceName = "svc-test-1"
	NodePort    = 30080
	// UDPPort is the Service's UDP port, served by every web pod's echo on
	// container port UDPTargetPort.
	UDPPort       = 5353
	UDPTargetPort = 5353
)

// ClusterIP is svc-test-1's address in the lab's service range 10.96.0.0/16.
var ClusterIP = netip.MustParseAddr("10.96.0.11")

// WebPod is a pod of the story's web Deployment, as a manifest describes it.
type WebPod struct {
	Name    string
	Index   int // the lab pod number: the pod's address is 10.244.Index.2
	IP      netip.Addr
	Version string // the "version" label: v1 or v2
	WebPort int    // the container port named web-port
	Ready   bool
}

// Greeting is what the pod's web server answers: the story's well-known
// line, naming the server by its pod number, and its port.
func (p WebPod) Greeting() string {
	return fmt.Sprintf("This is Web Server %d running on %d!", p.Index, p.WebPort)
}

// Story is the state of the Service story at one step: svc-test-1 with its
// selector, and the web pods that exist.
type Story struct {
	// Selector is svc-test-1's spec.selector, such as
	// "app: web-front-end" or "app: web-front-end, version: v2".
	Selector map[string]string
	Pods     []WebPod
}

// Manifest renders the story as the manifest the proxy reads: one Service
// and its Pods, in the YAML a person would write.
func (s Story) Manifest() string {
	var b strings.Builder
	b.WriteString(`# The Service story: svc-test-1 in front of a set of web pods.
# kube-userspace-proxy --manifests reads this file and re-reads it on change.
apiVersion: v1
kind: Service
metadata:
  name: svc-test-1
  namespace: default
spec:
  type: NodePort
  clusterIP: ` + ClusterIP.String() + `
  selector:
`)
	for _, k := range slices.Sorted(maps.Keys(s.Selector)) {
		fmt.Fprintf(&b, "    %s: %s\n", k, s.Selector[k])
	}
	fmt.Fprintf(&b, `  ports:
  - name: http
    protocol: TCP
    port: 80
    targetPort: web-port   # a name: each pod says which number it means
    nodePort: %d
  - name: echo
    protocol: UDP
    port: %d
    targetPort: udp-echo
`, NodePort, UDPPort)
	for _, p := range s.Pods {
		ready := "True"
		if !p.Ready {
			ready = "False"
		}
		fmt.Fprintf(&b, `---
apiVersion: v1
kind: Pod
metadata:
  name: %s
  namespace: default
  labels:
    app: web-front-end
    version: %s
spec:
  containers:
  - name: web
    image: example.org/web:%s
    ports:
    - name: web-port
      containerPort: %d
    - name: udp-echo
      containerPort: %d
      protocol: UDP
status:
  phase: Running
  podIP: %s
  conditions:
  - type: Ready
    status: "%s"
`, p.Name, p.Version, p.Version, p.WebPort, UDPTargetPort, p.IP, ready)
	}
	return b.String()
}

// Write writes the manifest to path atomically (write, then rename), as an
// editor or a config-management tool would, so the proxy never reads half a
// file.
func (s Story) Write(path string) error {
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, []byte(s.Manifest()), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// ClientPod is the lab pod number of the story's client pod, out of the way
// of the web pods, which are numbered from 1.
const ClientPod = 100

// FirstStory is the story's first step: one v1 pod, selected by app label.
// docs/examples/lab.yaml is its manifest.
func FirstStory() Story {
	return Story{
		Selector: map[string]string{"app": "web-front-end"},
		Pods:     []WebPod{NewWebPod(1, "v1", 8080)},
	}
}

// NewWebPod is web pod number n of the story, at 10.244.n.2: named web-n for
// v1 and web-v2-n for v2.
func NewWebPod(n int, version string, webPort int) WebPod {
	name := fmt.Sprintf("web-%d", n)
	if version != "v1" {
		name = fmt.Sprintf("web-%s-%d", version, n)
	}
	return WebPod{Name: name, Index: n, IP: netip.AddrFrom4([4]byte{10, 244, byte(n), 2}), Version: version, WebPort: webPort, Ready: true}
}
