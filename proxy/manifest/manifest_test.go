package manifest

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	discovery "k8s.io/api/discovery/v1"
)

const goodService = `apiVersion: v1
kind: Service
metadata:
  name: svc-test-1
spec:
  clusterIP: 10.96.0.11
  selector: {app: web-front-end}
  ports:
  - {name: http, port: 80, targetPort: web-port}
  - {name: echo, port: 5353, protocol: UDP, targetPort: udp-echo}
`

func pod(name, ip, webPort, ready string, labels string) string {
	return `apiVersion: v1
kind: Pod
metadata: {name: ` + name + `, labels: {` + labels + `}}
spec:
  containers:
  - name: web
    ports:
    - {name: web-port, containerPort: ` + webPort + `}
    - {name: udp-echo, containerPort: 5353, protocol: UDP}
status:
  podIP: ` + ip + `
  conditions: [{type: Ready, status: "` + ready + `"}]
`
}

func write(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestLoadGood(t *testing.T) {
	path := write(t, "lab.yaml", goodService+"---\n"+
		pod("web-1", "10.244.1.2", "8080", "True", "app: web-front-end")+"---\n"+
		"# a comment-only document\n---\n"+
		"apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: ignored}\n")
	objs, err := Load(path)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if len(objs.Services) != 1 || len(objs.Pods) != 1 {
		t.Fatalf("Load = %d services, %d pods; want 1, 1", len(objs.Services), len(objs.Pods))
	}
	s := objs.Services[0]
	if s.Namespace != "default" || s.Spec.Ports[0].Protocol != "TCP" || s.Spec.SessionAffinity != "None" {
		t.Errorf("defaults not applied: namespace %q, protocol %q, affinity %q", s.Namespace, s.Spec.Ports[0].Protocol, s.Spec.SessionAffinity)
	}
	if len(objs.Ignored) != 1 || !strings.Contains(objs.Ignored[0], "Deployment") {
		t.Errorf("Ignored = %q, want the Deployment", objs.Ignored)
	}
}

func TestLoadDirectoryAndJSONList(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "a-service.yaml"), []byte(goodService), 0o644)
	os.WriteFile(filepath.Join(dir, "b-slices.json"), []byte(`{"apiVersion":"v1","kind":"List","items":[
	  {"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"manual-1","labels":{"kubernetes.io/service-name":"manual"}},
	   "addressType":"IPv4","endpoints":[{"addresses":["10.244.5.2"]}],"ports":[{"port":9376}]}]}`), 0o644)
	os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("not a manifest"), 0o644)
	objs, err := Load(dir)
	if err != nil {
		t.Fatalf("Load(dir): %v", err)
	}
	if len(objs.Services) != 1 || len(objs.EndpointSlices) != 1 {
		t.Errorf("Load(dir) = %d services, %d slices; want 1, 1", len(objs.Services), len(objs.EndpointSlices))
	}
}

// TestLoadBad: every mistake is reported with its file, document, object
// and field.
func TestLoadBad(t *testing.T) {
	tests := []struct {
		name, doc string
		want      []string
	}{
		{"typo in a field", strings.Replace(goodService, "selector:", "selectr:", 1),
			[]string{"document 1 (Service)", `unknown field "spec.selectr"`}},
		{"port out of range", strings.Replace(goodService, "port: 80,", "port: 0,", 1),
			[]string{"(Service default/svc-test-1)", "spec.ports[0].port: Invalid value: 0"}},
		{"no cluster IP", strings.Replace(goodService, "  clusterIP: 10.96.0.11\n", "", 1),
			[]string{"spec.clusterIP: Required value"}},
		{"bad cluster IP", strings.Replace(goodService, "10.96.0.11", "10.96.0.300", 1),
			[]string{`spec.clusterIP: Invalid value: "10.96.0.300"`}},
		{"clusterIPs not starting with clusterIP", strings.Replace(goodService, "  clusterIP: 10.96.0.11\n", "  clusterIP: 10.96.0.11\n  clusterIPs: [\"fd00::11\", 10.96.0.11]\n", 1),
			[]string{`spec.clusterIPs[0]: Invalid value: "fd00::11": must be equal to spec.clusterIP (10.96.0.11)`}},
		{"two IPv4 clusterIPs", strings.Replace(goodService, "  clusterIP: 10.96.0.11\n", "  clusterIP: 10.96.0.11\n  clusterIPs: [10.96.0.11, 10.96.0.12]\n", 1),
			[]string{`spec.clusterIPs[1]: Invalid value: "10.96.0.12": must be of the other IP family`}},
		{"pod with a bad second IP", strings.Replace(pod("web-1", "10.244.1.2", "8080", "True", "app: x"), "  podIP: 10.244.1.2\n", "  podIP: 10.244.1.2\n  podIPs: [{ip: 10.244.1.2}, {ip: \"fd00::x\"}]\n", 1),
			[]string{`status.podIPs[1].ip: Invalid value: "fd00::x"`}},
		{"unnamed ports", strings.Replace(goodService, "name: http, ", "", 1),
			[]string{"spec.ports[0].name: Required value"}},
		{"bad protocol", strings.Replace(goodService, "protocol: UDP", "protocol: ICMP", 1),
			[]string{`spec.ports[1].protocol: Unsupported value: "ICMP"`}},
		{"nodePort on ClusterIP", strings.Replace(goodService, "targetPort: web-port}", "targetPort: web-port, nodePort: 30080}", 1),
			[]string{"spec.ports[0].nodePort: Forbidden"}},
		{"bad affinity timeout", goodService + "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n",
			[]string{"spec.sessionAffinityConfig.clientIP.timeoutSeconds: Invalid value: 0"}},
		{"bad name", strings.Replace(goodService, "svc-test-1", "Svc_Test", 1),
			[]string{`metadata.name: Invalid value: "Svc_Test"`}},
		{"wrong apiVersion", strings.Replace(goodService, "apiVersion: v1", "apiVersion: v2", 1),
			[]string{`apiVersion: Unsupported value: "v2"`}},
		{"no kind", "apiVersion: v1\nmetadata: {name: x}\n",
			[]string{"kind: Required value"}},
		{"not YAML", "apiVersion: v1\nkind: Service\n  bad: [indent\n",
			[]string{"document 1"}},
		{"duplicate", goodService + "---\n" + goodService,
			[]string{"document 2 (Service default/svc-test-1): metadata.name: Duplicate value", "already defined at"}},
		{"slice without service label", "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]\n",
			[]string{"metadata.labels[kubernetes.io/service-name]: Required value"}},
		{"slice address of the wrong family", "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: x}}\naddressType: IPv4\nendpoints: [{addresses: [\"fd00::1\"]}]\n",
			[]string{`endpoints[0].addresses[0]: Invalid value: "fd00::1"`}},
		{"pod with a bad IP", pod("web-1", "10.244.1", "8080", "True", "app: x"),
			[]string{`status.podIP: Invalid value: "10.244.1"`}},
		{"pod port out of range", pod("web-1", "10.244.1.2", "70000", "True", "app: x"),
			[]string{"containerPort: Invalid value: 70000"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := write(t, "bad.yaml", tt.doc)
			_, err := Load(path)
			if err == nil {
				t.Fatalf("Load accepted:\n%s", tt.doc)
			}
			msg := err.Error()
			for _, want := range append(tt.want, path) {
				if !strings.Contains(msg, want) {
					t.Errorf("error %q does not mention %q", msg, want)
				}
			}
		})
	}
}

func TestConflictsAcrossServices(t *testing.T) {
	other := strings.Replace(goodService, "svc-test-1", "svc-test-2", 1)
	path := write(t, "lab.yaml", goodService+"---\n"+other)
	_, err := Load(path)
	if err == nil || !strings.Contains(err.Error(), "spec.clusterIP: Duplicate value") {
		t.Errorf("two Services with one cluster IP: %v; want a duplicate clusterIP error", err)
	}
}

func TestPodSlicesResolveNamedPorts(t *testing.T) {
	path := write(t, "lab.yaml", strings.Join([]string{
		goodService,
		pod("web-1", "10.244.1.2", "8080", "True", "app: web-front-end, version: v1"),
		pod("web-2", "10.244.2.2", "8080", "False", "app: web-front-end, version: v1"),
		pod("web-v2", "10.244.3.2", "9090", "True", "app: web-front-end, version: v2"),
		pod("other", "10.244.4.2", "8080", "True", "app: other"),
		`apiVersion: v1
kind: Pod
metadata: {name: pending, labels: {app: web-front-end}}
spec: {containers: [{name: c}]}
`,
	}, "---\n"))
	objs, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	slices := PodSlices(objs.Services, objs.Pods)
	// Pods on 8080 and the pod on 9090 resolve web-port differently, so
	// they are in two slices, as the controller would group them.
	got := map[string]string{} // address -> "port ready"
	for _, s := range slices {
		if s.Labels[discovery.LabelServiceName] != "svc-test-1" {
			t.Errorf("slice %s names service %q", s.Name, s.Labels[discovery.LabelServiceName])
		}
		var web int32
		for _, p := range s.Ports {
			if *p.Name == "http" {
				web = *p.Port
			}
		}
		for _, ep := range s.Endpoints {
			got[ep.Addresses[0]] = fmt.Sprintf("%d %t", web, *ep.Conditions.Ready)
		}
	}
	want := map[string]string{
		"10.244.1.2": "8080 true",
		"10.244.2.2": "8080 false", // listed, not ready
		"10.244.3.2": "9090 true",
	}
	if len(got) != len(want) {
		t.Fatalf("endpoints = %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("endpoint %s = %q, want %q", k, got[k], v)
		}
	}
	if len(slices) != 2 {
		t.Errorf("%d slices, want 2 (one per resolved port set)", len(slices))
	}
}

// TestPodSlicesDualStack: a dual-stack Service gets a slice per family with
// each pod's address of that family; an IPv4-only Service only IPv4 ones.
func TestPodSlicesDualStack(t *testing.T) {
	dual := strings.Replace(goodService, "  clusterIP: 10.96.0.11\n", "  clusterIP: 10.96.0.11\n  clusterIPs: [10.96.0.11, \"fd00:96::11\"]\n", 1)
	v4only := strings.NewReplacer("svc-test-1", "v4-only", "10.96.0.11", "10.96.0.12").Replace(goodService)
	dualPod := strings.Replace(pod("web-1", "10.244.1.2", "8080", "True", "app: web-front-end"),
		"  podIP: 10.244.1.2\n", "  podIP: 10.244.1.2\n  podIPs: [{ip: 10.244.1.2}, {ip: \"fd00:244:1::2\"}]\n", 1)
	objs, err := Load(write(t, "lab.yaml", strings.Join([]string{dual, v4only, dualPod}, "---\n")))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string][]string{} // service -> "addressType address"
	for _, s := range PodSlices(objs.Services, objs.Pods) {
		for _, ep := range s.Endpoints {
			svc := s.Labels[discovery.LabelServiceName]
			got[svc] = append(got[svc], string(s.AddressType)+" "+ep.Addresses[0])
		}
	}
	if fmt.Sprint(got["svc-test-1"]) != "[IPv4 10.244.1.2 IPv6 fd00:244:1::2]" || fmt.Sprint(got["v4-only"]) != "[IPv4 10.244.1.2]" {
		t.Errorf("slices: %v", got)
	}
}
