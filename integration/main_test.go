// Package integration tests the real binary in a network-namespace lab: real
// sockets, real iptables, real processes. It needs root and the iproute2,
// iptables and curl packages; .ci/run installs them. Without root these tests
// fail rather than skip, so that a CI run can never pass without them.
package integration

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

var tools lab.Tools

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "kup-integration-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	tools = lab.Tools{Proxy: filepath.Join(dir, "kube-userspace-proxy"), Helper: filepath.Join(dir, "kup-lab")}
	for bin, pkg := range map[string]string{tools.Proxy: "../cmd/kube-userspace-proxy", tools.Helper: "../cmd/kup-lab"} {
		out, err := exec.Command("go", "build", "-o", bin, pkg).CombinedOutput()
		if err != nil {
			fmt.Fprintf(os.Stderr, "build %s: %v\n%s", pkg, err, out)
			os.RemoveAll(dir)
			os.Exit(1)
		}
	}
	code := m.Run()
	stopControlPlane()
	os.RemoveAll(dir)
	os.Exit(code)
}

// newLab builds a lab that is torn down when the test ends, pass or fail.
func newLab(t testing.TB) *lab.Lab {
	t.Helper()
	l, err := lab.New()
	if err != nil {
		t.Fatalf("build the lab: %v", err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("tear down the lab: %v", err)
		}
	})
	return l
}

// benchLab builds a lab with a client pod for a benchmark; it is torn
// down when the benchmark ends.
func benchLab(b *testing.B) (*lab.Lab, *lab.Pod) {
	b.Helper()
	l, err := lab.New()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	client, err := l.AddPod("client", lab.ClientPod)
	if err != nil {
		b.Fatal(err)
	}
	return l, client
}

// firstStoryLab builds a lab with a client pod and the web pods of the
// Service story's first step, and writes that step's manifest, followed by
// extra documents, to a file. It returns the lab, the client pod and the
// manifest's path.
func firstStoryLab(t testing.TB, extra string) (*lab.Lab, *lab.Pod, string) {
	t.Helper()
	l := newLab(t)
	client, err := l.AddPod("client", lab.ClientPod)
	if err != nil {
		t.Fatal(err)
	}
	story := lab.FirstStory()
	for _, w := range story.Pods {
		if _, err := l.AddWeb(tools, w); err != nil {
			t.Fatal(err)
		}
	}
	manifest := filepath.Join(t.TempDir(), "lab.yaml")
	if err := os.WriteFile(manifest, []byte(story.Manifest()+extra), 0o644); err != nil {
		t.Fatal(err)
	}
	return l, client, manifest
}

// TestBadInputExitsOne: the binary itself, given a bad flag or a bad
// configuration field, prints what to fix and exits with code 1.
func TestBadInputExitsOne(t *testing.T) {
	dir := t.TempDir()
	badConfig := filepath.Join(dir, "config.yaml")
	os.WriteFile(badConfig, []byte("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nportRange: 9-1\n"), 0o644)
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"--manifests", "x", "--bind-address", "127.0.0.1"}, "--bind-address 127.0.0.1: cannot proxy on a loopback"},
		{[]string{"--config", badConfig, "--manifests", "x"}, `--proxy-port-range "9-1"`},
		{[]string{"--mode", "ipvs", "--manifests", "x"}, `--mode "ipvs"`},
	} {
		out, err := exec.Command(tools.Proxy, tt.args...).CombinedOutput()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(string(out), tt.want) {
			t.Errorf("%q: exit %v, output %q; want exit code 1 and %q", tt.args, err, out, tt.want)
		}
	}
}
