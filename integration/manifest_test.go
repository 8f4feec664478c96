package integration

import (
	"os"
	"testing"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/manifest"
)

// TestShippedManifest: docs/examples/lab.yaml, the manifest `make demo`
// starts from, is the story's first step exactly, and loads cleanly.
func TestShippedManifest(t *testing.T) {
	const path = "../docs/examples/lab.yaml"
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if want := lab.FirstStory().Manifest(); string(got) != want {
		t.Errorf("%s differs from lab.FirstStory().Manifest(); regenerate it with: go run ./cmd/kup-lab manifest > %s", path, path)
	}
	if _, err := manifest.Load(path); err != nil {
		t.Errorf("%s does not load: %v", path, err)
	}
}
