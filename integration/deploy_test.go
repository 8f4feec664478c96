package integration

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
)

// TestDeployManifestsApply applies deploy/kube-userspace-proxy.yaml to the
// real API server with server-side apply, as `kubectl apply --server-side`
// would, so every object in it is known to be valid; then feeds the
// ConfigMap's configuration to the binary's --config.
func TestDeployManifestsApply(t *testing.T) {
	env := controlPlane(t)
	ctx := context.Background()
	rc := env.AdminConfig()
	dc, err := discovery.NewDiscoveryClientForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile("../deploy/kube-userspace-proxy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	applied := 0
	var config string
	for {
		var obj unstructured.Unstructured
		if err := dec.Decode(&obj.Object); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		if obj.Object == nil {
			continue
		}
		gvk := obj.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			t.Fatalf("%s: %v", gvk, err)
		}
		r := dyn.Resource(m.Resource)
		var ri dynamic.ResourceInterface = r
		if obj.GetNamespace() != "" {
			ri = r.Namespace(obj.GetNamespace())
		}
		if _, err := ri.Apply(ctx, obj.GetName(), &obj, metav1.ApplyOptions{FieldManager: "kup-test", Force: true}); err != nil {
			t.Errorf("server-side apply of %s %s: %v", gvk.Kind, obj.GetName(), err)
		}
		applied++
		if gvk.Kind == "ConfigMap" {
			config, _, _ = unstructured.NestedString(obj.Object, "data", "config.conf")
		}
	}
	if applied != 4 || config == "" {
		t.Fatalf("applied %d objects, config %q; want the ServiceAccount, binding, ConfigMap and DaemonSet", applied, config)
	}
	path := filepath.Join(t.TempDir(), "config.conf")
	os.WriteFile(path, []byte(config), 0o644)
	out, err := exec.Command(tools.Proxy, "--config", path, "--write-config-to", filepath.Join(t.TempDir(), "effective.yaml")).CombinedOutput()
	if err != nil {
		t.Errorf("--config with the ConfigMap's config.conf: %v\n%s", err, out)
	}
}
