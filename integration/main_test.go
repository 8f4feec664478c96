// Package integration tests the real binary in a network-namespace lab: real
// sockets, real iptables, real processes. It needs root and the iproute2,
// iptables and curl packages; .ci/run installs them. Without root these tests
// fail rather than skip, so that a CI run can never pass without them.
package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/integration/lab"
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
func newLab(t *testing.T) *lab.Lab {
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

// firstStoryLab builds a lab with a client pod and the web pods of the
// Service story's first step, and writes that step's manifest, followed by
// extra documents, to a file. It returns the lab, the client pod and the
// manifest's path.
func firstStoryLab(t *testing.T, extra string) (*lab.Lab, *lab.Pod, string) {
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
